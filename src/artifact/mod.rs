//! Versioned model artifacts: `modelcache publish` releases a directory as a
//! version (files plus a sha256 manifest), `modelcache fetch` pulls it into a
//! pod, verified, resumable and parallel, through a node-local cache.
//!
//! - [`manifest`]: the manifest, its checks, and its digest (the version's identity).
//! - [`source`]: S3, HTTP/CDN and local-directory locations, ranged reads.
//! - [`cloudfront`]: signed URLs and cookies.
//! - [`fetch`]: the fetcher; [`node_cache`]: the node-local cache; [`fill`]:
//!   filling it for the node agent.
//! - [`publish`]: building and uploading a version.

pub mod cloudfront;
pub mod disk;
pub mod fetch;
pub mod fill;
pub mod governor;
pub mod headers;
pub mod manifest;
pub mod node_cache;
pub mod progress;
pub mod publish;
pub mod retry;
pub mod source;
pub mod transfer;

/// A model or version name that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {value:?} is not valid: {why}")]
pub struct NameError {
    /// What the name is for (`model`, `version`).
    pub what: &'static str,
    /// The name given.
    pub value: String,
    /// Why it is refused.
    pub why: &'static str,
}

/// Check a model and a version name.
pub fn check_names(model: &str, version: &str) -> Result<(), NameError> {
    for (what, value) in [("model", model), ("version", version)] {
        check_name(value).map_err(|why| NameError {
            what,
            value: value.into(),
            why,
        })?;
    }
    Ok(())
}

/// Why a model or version name cannot be used, if it cannot: they are path
/// components at every source, so only `[A-Za-z0-9._-]`, and never `.`/`..`.
pub fn check_name(value: &str) -> Result<(), &'static str> {
    if value.is_empty() || value.len() > 128 {
        return Err("it must be 1 to 128 characters");
    }
    if value == "." || value == ".." {
        return Err("it must not be `.` or `..`");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("it may hold only letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_single_safe_path_components() {
        for good in ["llama-3.1-8b", "v1", "2026-11-28_a"] {
            assert_eq!(super::check_name(good), Ok(()));
        }
        for bad in ["", ".", "..", "a/b", "a b", "v1?x", &"x".repeat(129)] {
            assert!(super::check_name(bad).is_err(), "{bad:?}");
        }
    }
}
