//! Request headers for an origin (a CDN that wants a token, a tenant header),
//! from `--header` lines, a headers file and a mounted Secret directory.
//! Header values are often secrets: errors name the header or the file,
//! never a value.

use std::path::{Path, PathBuf};

/// Why request headers could not be read.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum HeaderError {
    #[error("failed to parse {origin}: a header must look like `Name: value`")]
    Malformed { origin: String },
    #[error("failed to read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to use {}: it is not a valid header name; name the Secret's keys after the headers to send",
        path.display()
    )]
    Name { path: PathBuf },
}

/// One `Name: value` line. `origin` names it in the error.
pub fn parse(line: &str, origin: impl FnOnce() -> String) -> Result<(String, String), HeaderError> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| HeaderError::Malformed { origin: origin() })?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

/// Headers from each source in turn: `--header` lines, then the non-empty
/// lines of a headers file, then a Secret directory.
pub fn collect(
    lines: &[String],
    file: Option<&Path>,
    dir: Option<&Path>,
) -> Result<Vec<(String, String)>, HeaderError> {
    let mut headers = Vec::new();
    // A line without a colon may be a bare secret: it is named by position.
    for (i, line) in lines.iter().enumerate() {
        headers.push(parse(line, || format!("--header number {}", i + 1))?);
    }
    if let Some(file) = file {
        let text = std::fs::read_to_string(file).map_err(|source| HeaderError::Read {
            what: "--headers-file",
            path: file.into(),
            source,
        })?;
        for (i, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                let origin = || format!("--headers-file {}, line {}", file.display(), i + 1);
                headers.push(parse(line, origin)?);
            }
        }
    }
    if let Some(dir) = dir {
        headers.extend(from_dir(dir)?);
    }
    Ok(headers)
}

/// Request headers from a mounted Secret: each regular file in `dir` is one
/// header, named by the file and valued by its content (trimmed). The
/// kubelet's `..data` links and other dot entries are skipped.
pub fn from_dir(dir: &Path) -> Result<Vec<(String, String)>, HeaderError> {
    let read_dir = |source| HeaderError::Read {
        what: "the headers directory",
        path: dir.into(),
        source,
    };
    let mut headers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let entry = entry.map_err(read_dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // Follows the kubelet's symlinks to the current files.
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
        if !valid {
            return Err(HeaderError::Name { path });
        }
        let value = std::fs::read_to_string(&path).map_err(|source| HeaderError::Read {
            what: "header file",
            path: path.clone(),
            source,
        })?;
        headers.push((name, value.trim().to_string()));
    }
    headers.sort();
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_come_from_a_mounted_secret_directory() {
        let dir = tempfile::tempdir().unwrap();
        // What the kubelet makes of a Secret volume: a timestamped directory,
        // ..data pointing to it, and one link per key.
        let data = dir.path().join("..2026_11_28_10_00_00.1");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("X-Origin-Token"), "s3cr3t\n").unwrap();
        std::fs::write(data.join("X-Tenant"), "acme").unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("..data")).unwrap();
        for key in ["X-Origin-Token", "X-Tenant"] {
            std::os::unix::fs::symlink(dir.path().join("..data").join(key), dir.path().join(key))
                .unwrap();
        }
        assert_eq!(
            from_dir(dir.path()).unwrap(),
            vec![
                ("X-Origin-Token".to_string(), "s3cr3t".to_string()),
                ("X-Tenant".to_string(), "acme".to_string())
            ]
        );
        std::fs::write(dir.path().join("bad name"), "v").unwrap();
        let err = from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("bad name") && !err.contains("s3cr3t"), "{err}");
        assert!(from_dir(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_malformed_line_is_named_without_its_value() {
        let lines = ["A: b".to_string(), "X-Token s3cr3t".to_string()];
        let text = collect(&lines, None, None).unwrap_err().to_string();
        assert!(text.contains("--header number 2"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        let ok = collect(&["X-Tenant: acme ".into()], None, None).unwrap();
        assert_eq!(ok, vec![("X-Tenant".to_string(), "acme".to_string())]);
    }
}
