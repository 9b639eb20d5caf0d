//! Filesystem helpers: free space, atomic writes, link-or-copy.

use std::io::Write as _;
use std::path::Path;

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Open (creating) the lock file at `path` without taking the lock.
pub fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// A regular file of exactly `size` bytes is at `path`.
pub fn is_file_of_size(path: &Path, size: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
}

/// Write `bytes` to `path` through a temporary file in the same directory and
/// a rename, so readers see the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Put a copy of `from` at `to`, through `tmp` and a rename, so that `to` is
/// never half-written.
pub fn copy_atomic(from: &Path, tmp: &Path, to: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(tmp);
    std::fs::copy(from, tmp)?;
    std::fs::rename(tmp, to)
}

/// Put a copy of `from` at `to`: a hard link when both are on one filesystem,
/// else a copy (copy_file_range where the kernel can). Atomic at `to`: through
/// `tmp`, then a rename. Returns whether it linked.
pub fn link_or_copy(from: &Path, tmp: &Path, to: &Path) -> std::io::Result<bool> {
    let _ = std::fs::remove_file(tmp);
    let linked = match std::fs::hard_link(from, tmp) {
        Ok(()) => true,
        Err(e)
            if e.raw_os_error() == Some(libc::EXDEV) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            std::fs::copy(from, tmp)?;
            false
        }
        Err(e) => return Err(e),
    };
    std::fs::rename(tmp, to)?;
    Ok(linked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_reported_and_atomic_writes_replace() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporaries left"
        );
    }

    #[test]
    fn links_on_one_filesystem() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let linked = link_or_copy(&a, &dir.path().join("t"), &dir.path().join("b")).unwrap();
        assert!(linked);
        assert_eq!(std::fs::metadata(&a).unwrap().nlink(), 2);
    }
}
