//! Our resources read from files, checked as the API server would check them
//! first ([`super::validate`]): `modelcache validate`'s report and
//! `modelcache check-redis --policy`'s CachePolicy.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::CachePolicy;
use super::cache_policy::CachePolicySpec;
use super::validate::{ValidateError, Validator};

/// Why a resource could not be read from a file.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum LoadError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Validate(#[from] ValidateError),
    #[error("{} is not a valid CachePolicy: {}", path.display(), violations.join("; "))]
    Invalid {
        path: PathBuf,
        violations: Vec<String>,
    },
    #[error("failed to read {} as a CachePolicy", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
}

/// A file's text; `-` reads standard input.
fn read(path: &Path) -> Result<String, LoadError> {
    let failed = |source| LoadError::Read {
        path: path.into(),
        source,
    };
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(failed)?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(failed)
}

/// A CachePolicy from a YAML file, refused unless it passes the CRD's schema
/// and rules (what `kubectl apply` would refuse).
pub fn cache_policy(path: &Path) -> Result<CachePolicySpec, LoadError> {
    let text = read(path)?;
    let report = Validator::new()?.validate_yaml(&path.display().to_string(), &text)?;
    if let Some(bad) = report.iter().find(|r| !r.violations.is_empty()) {
        return Err(LoadError::Invalid {
            path: path.into(),
            violations: bad.violations.iter().map(|v| v.to_string()).collect(),
        });
    }
    let policy: CachePolicy = serde_saphyr::from_str(&text).map_err(|e| LoadError::Parse {
        path: path.into(),
        source: Box::new(e),
    })?;
    Ok(policy.spec)
}

/// The verdict on every document of every file, as `modelcache validate`
/// prints it, and the number of invalid resources.
pub fn check_files(files: &[PathBuf]) -> Result<(String, usize), LoadError> {
    let validator = Validator::new()?;
    let mut out = String::new();
    let mut invalid = 0;
    for file in files {
        let name = file.display().to_string();
        for report in validator.validate_yaml(&name, &read(file)?)? {
            let verdict = if report.violations.is_empty() {
                "valid  "
            } else {
                invalid += 1;
                "INVALID"
            };
            let _ = writeln!(
                out,
                "{verdict}  {name}#{} {}",
                report.index, report.resource
            );
            for v in &report.violations {
                let _ = writeln!(out, "  - {v}");
            }
        }
    }
    Ok((out, invalid))
}
