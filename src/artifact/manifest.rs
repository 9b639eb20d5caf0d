//! A version's manifest: every file's path, size and sha256. The sha256 of the
//! manifest's own bytes is the version's identity; it is recorded with the
//! fetched files and salts everything derived from them.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::sha256_hex;

/// The manifest's file name beside the version's files.
pub const MANIFEST_NAME: &str = "manifest.json";

/// The only manifest format this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// A manifest larger than this is refused before it is parsed: a real one is a
/// few hundred bytes per file.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

/// Where modelcache keeps its own state inside a destination; manifest paths
/// may not use it.
pub const STATE_DIR: &str = ".modelcache";

/// Why a manifest was refused.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum ManifestError {
    #[error(
        "failed to parse manifest {origin}: {reason}; expected JSON with formatVersion, model, version and files[{{path, size, sha256}}]"
    )]
    Parse { origin: String, reason: String },
    #[error(
        "manifest {origin} is {size} bytes, more than the {max} this build reads; is it really a manifest?"
    )]
    TooLarge {
        origin: String,
        size: usize,
        max: usize,
    },
    #[error(
        "manifest {origin} has formatVersion {found}; this build reads {FORMAT_VERSION}; upgrade modelcache"
    )]
    Format { origin: String, found: u32 },
    #[error(
        "manifest {origin} names {model}/{version}, not the requested {want_model}/{want_version}; publish the version again or fix --model/--version"
    )]
    Identity {
        origin: String,
        model: String,
        version: String,
        want_model: String,
        want_version: String,
    },
    #[error(
        "manifest {origin}: file path {path:?} is not allowed: {why}; paths must be relative, use `/`, and stay inside the version"
    )]
    Path {
        origin: String,
        path: String,
        why: &'static str,
    },
    #[error(
        "manifest {origin}: file {path:?} has sha256 {sha256:?}; expected 64 lowercase hex digits"
    )]
    Digest {
        origin: String,
        path: String,
        sha256: String,
    },
    #[error("manifest {origin} lists no files; a version needs at least one")]
    Empty { origin: String },
    #[error(
        "manifest {origin}: its files add up to more than {max} bytes; no model is that large, so the manifest is wrong"
    )]
    Total { origin: String, max: u64 },
}

/// The most bytes a version's files may add up to (1 PiB): far above any
/// model, far below where sums of sizes could overflow.
pub const MAX_VERSION_BYTES: u64 = 1 << 50;

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Relative path with `/` separators.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    /// The manifest format; 1.
    pub format_version: u32,
    /// The model's name.
    pub model: String,
    /// The version.
    pub version: String,
    /// Sorted by path.
    pub files: Vec<ManifestFile>,
}

/// A parsed, checked manifest and the digest of the bytes it came from.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// The bytes it was parsed from.
    pub bytes: Vec<u8>,
    /// Their sha256: the version's identity.
    pub digest: String,
}

impl VerifiedManifest {
    /// Bytes of every file of the version.
    pub fn total_bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }
}

impl Manifest {
    /// The canonical bytes `publish` writes: pretty JSON with sorted files and
    /// a trailing newline, so that one directory always yields one digest.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut sorted = self.clone();
        sorted.files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut bytes = serde_json::to_vec_pretty(&sorted).expect("a manifest always serializes");
        bytes.push(b'\n');
        bytes
    }
}

/// Parse and check manifest bytes. `origin` names where they came from, for
/// messages; `want` is the model and version the caller asked for.
pub fn parse(
    origin: &str,
    bytes: Vec<u8>,
    want: Option<(&str, &str)>,
) -> Result<VerifiedManifest, ManifestError> {
    let origin = origin.to_string();
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            origin,
            size: bytes.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    // Plain data only: serde_json into fixed structs, never a code-bearing format.
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| ManifestError::Parse {
        origin: origin.clone(),
        reason: e.to_string(),
    })?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(ManifestError::Format {
            origin,
            found: manifest.format_version,
        });
    }
    if let Some((model, version)) = want
        && (manifest.model != model || manifest.version != version)
    {
        return Err(ManifestError::Identity {
            origin,
            model: manifest.model,
            version: manifest.version,
            want_model: model.into(),
            want_version: version.into(),
        });
    }
    check_files(&origin, &manifest.files)?;
    let digest = sha256_hex(&bytes);
    Ok(VerifiedManifest {
        manifest,
        bytes,
        digest,
    })
}

/// Every path relative, normal and unique, no file also used as a directory,
/// and every digest well-formed.
pub fn check_files(origin: &str, files: &[ManifestFile]) -> Result<(), ManifestError> {
    if files.is_empty() {
        return Err(ManifestError::Empty {
            origin: origin.into(),
        });
    }
    let bad = |path: &str, why| ManifestError::Path {
        origin: origin.into(),
        path: path.into(),
        why,
    };
    let total = files
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.size))
        .filter(|t| *t <= MAX_VERSION_BYTES);
    if total.is_none() {
        return Err(ManifestError::Total {
            origin: origin.into(),
            max: MAX_VERSION_BYTES,
        });
    }
    let mut seen = BTreeSet::new();
    for file in files {
        check_path(&file.path).map_err(|why| bad(&file.path, why))?;
        if !seen.insert(file.path.as_str()) {
            return Err(bad(&file.path, "it is listed twice"));
        }
        if !crate::digest::is_sha256_hex(&file.sha256) {
            return Err(ManifestError::Digest {
                origin: origin.into(),
                path: file.path.clone(),
                sha256: file.sha256.clone(),
            });
        }
    }
    // "a" as a file and "a/b" as another would need "a" to be both.
    for path in &seen {
        let mut prefix = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if seen.contains(prefix.as_str()) {
                return Err(bad(
                    path,
                    "a parent directory of it is also listed as a file",
                ));
            }
        }
    }
    Ok(())
}

/// Why a manifest path is refused, if it is.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("it is empty");
    }
    if path.starts_with('/') {
        return Err("it is absolute");
    }
    if path.contains('\\') {
        return Err("it contains a backslash");
    }
    if path.contains('\0') || path.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    if path.len() > 1024 {
        return Err("it is longer than 1024 bytes");
    }
    for part in path.split('/') {
        match part {
            "" => return Err("it has an empty component"),
            "." | ".." => return Err("it has a `.` or `..` component"),
            _ if part.len() > 255 => return Err("a component is longer than 255 bytes"),
            _ => {}
        }
    }
    if path.split('/').next() == Some(STATE_DIR) || path == MANIFEST_NAME {
        return Err("it is reserved for modelcache's own files");
    }
    // Belt and braces: whatever the checks above let through must still be a
    // plain relative path to std.
    if !Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err("it is not a plain relative path");
    }
    Ok(())
}

/// Build the manifest of every regular file under `dir` (symlinks and special
/// files are refused: a version is plain bytes). Hashes on every core.
pub fn build(dir: &Path, model: &str, version: &str) -> Result<Manifest, BuildError> {
    let mut paths = Vec::new();
    walk(dir, dir, &mut paths)?;
    paths.sort();
    if paths.is_empty() {
        return Err(BuildError::Empty { dir: dir.into() });
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<ManifestFile, BuildError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.min(paths.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(rel) = paths.get(i) else { break };
                        out.push((i, hash_file(dir, rel)));
                    }
                    out
                })
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("hash worker panicked"))
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    });
    let files = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    check_files(&dir.display().to_string(), &files).map_err(BuildError::Manifest)?;
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        model: model.into(),
        version: version.into(),
        files,
    })
}

fn hash_file(dir: &Path, rel: &str) -> Result<ManifestFile, BuildError> {
    let path = dir.join(rel);
    let io = |source| BuildError::Io {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(io)?;
    let (size, sha256) = crate::digest::hash_reader(file).map_err(io)?;
    Ok(ManifestFile {
        path: rel.into(),
        size,
        sha256,
    })
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), BuildError> {
    let io = |source| BuildError::Io {
        path: dir.into(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io)?;
        let rel = path
            .strip_prefix(root)
            .expect("walk stays under its root")
            .to_str()
            .ok_or_else(|| BuildError::NotUtf8 { path: path.clone() })?
            .to_string();
        if rel == STATE_DIR || rel == MANIFEST_NAME {
            continue;
        }
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() {
            out.push(rel);
        } else {
            return Err(BuildError::NotRegular { path });
        }
    }
    Ok(())
}

/// Why a manifest could not be built from a directory.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum BuildError {
    #[error("failed to read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to publish {path}: it is a symlink or special file; a version holds regular files only, so copy the target in"
    )]
    NotRegular { path: PathBuf },
    #[error("failed to publish {path}: its name is not UTF-8; rename it")]
    NotUtf8 { path: PathBuf },
    #[error("failed to publish {dir}: it holds no files")]
    Empty { dir: PathBuf },
    #[error(transparent)]
    Manifest(ManifestError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            size: 1,
            sha256: "a".repeat(64),
        }
    }

    #[test]
    fn paths_that_leave_the_destination_are_refused() {
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "",
            "a\\..\\b",
            ".modelcache/complete",
            "manifest.json",
            "a\nb",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} should be refused");
        }
        for good in ["model.safetensors", "a/b/c.bin", "..hidden", "a..b", "x/.y"] {
            assert_eq!(check_path(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn duplicates_and_file_directory_clashes_are_refused() {
        let err = check_files("m", &[file("a"), file("a")]).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        let err = check_files("m", &[file("a"), file("a/b")]).unwrap_err();
        assert!(err.to_string().contains("parent directory"), "{err}");
        check_files("m", &[file("a/b"), file("a/c"), file("ab")]).unwrap();
    }

    #[test]
    fn digests_must_be_lowercase_hex() {
        let mut f = file("a");
        f.sha256 = "A".repeat(64);
        assert!(matches!(
            check_files("m", &[f]),
            Err(ManifestError::Digest { .. })
        ));
    }

    #[test]
    fn parse_checks_identity_format_and_records_the_digest() {
        let m = Manifest {
            format_version: 1,
            model: "m".into(),
            version: "v1".into(),
            files: vec![file("b"), file("a")],
        };
        let bytes = m.to_bytes();
        let parsed = parse("x", bytes.clone(), Some(("m", "v1"))).unwrap();
        assert_eq!(parsed.digest, sha256_hex(&bytes));
        assert_eq!(
            parsed.manifest.files[0].path, "a",
            "canonical form is sorted"
        );
        let err = parse("x", bytes.clone(), Some(("m", "v2"))).unwrap_err();
        assert!(err.to_string().contains("not the requested m/v2"), "{err}");
        let mut v2 = m.clone();
        v2.format_version = 2;
        assert!(matches!(
            parse("x", v2.to_bytes(), None),
            Err(ManifestError::Format { found: 2, .. })
        ));
        let err = parse("x", b"{\"formatVersion\":1}".to_vec(), None).unwrap_err();
        assert!(
            err.to_string().starts_with("failed to parse manifest x"),
            "{err}"
        );
    }

    #[test]
    fn build_hashes_every_file_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), b"abc").unwrap();
        std::fs::write(dir.path().join("a.bin"), b"").unwrap();
        let m = build(dir.path(), "m", "v1").unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files[1].path, "sub/b.txt");
        assert_eq!(
            m.files[1].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            m.files[0].sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        assert!(matches!(
            build(dir.path(), "m", "v1"),
            Err(BuildError::NotRegular { .. })
        ));
    }
}
