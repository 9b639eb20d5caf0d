//! The node-local cache (`--cache-dir`, e.g. a hostPath shared by the pods on
//! one node): verified files content-addressed by sha256, one record per
//! fetched version, a lock per version so that concurrent fetchers of one
//! version download it once, and a quota kept by evicting the least recently
//! used versions that no running pod pins.
//!
//! ```text
//! <root>/blobs/<sha256>           verified content, read-only (0444)
//! <root>/proofs/<sha256>          inode, size and mtime of the blob when it was last verified
//! <root>/partial/<sha256>[.parts] downloads in progress and their journals
//! <root>/versions/<id>.json       source, model, version, manifest digest; mtime = last use
//! <root>/manifests/<digest>.json  manifest bytes
//! <root>/locks/<id>.lock          held while a fetcher works on the version
//! <root>/evict.lock               held while one fetcher evicts
//! <root>/pins/<id>/<holder>       a pod the node agent served the version to
//! ```
//!
//! A version is pinned while any of its blobs has a hard link outside the
//! cache (a pod's destination on the same filesystem): evicting it would free
//! nothing, and the pod's files stay intact either way because the pod holds
//! its own link. Copies made across filesystems do not pin. A version is
//! also pinned while it has a pin file: the node agent's pods get copies over
//! HTTP, so the agent pins each version for the pods it served, and removes
//! the pin once the pod is gone.
//!
//! A pod's file is a hard link to the blob, so a pod able to write it (its
//! owner, or root) would change what the next pod gets. A hit is therefore
//! proven: the blob's inode, size and modification time must be those
//! recorded when its digest last matched, else it is hashed again, and a blob
//! that no longer matches is removed and downloaded again. A writer who also
//! puts the old modification time back is not caught by the proof; the blob's
//! mode (0444) and the pods' distinct users are what stop that one.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::disk::{is_file_of_size, lock_file, write_atomic};
use super::manifest::{self, VerifiedManifest};
use crate::digest::sha256_hex;

/// Why the node cache could not be used.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum NodeCacheError {
    #[error(
        "failed to use the node cache at {path}; check that --cache-dir is a writable directory"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeCacheError + '_ {
    move |source| NodeCacheError::Io {
        path: path.into(),
        source,
    }
}

/// What the cache remembers about a fetched version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionRecord {
    /// The source it came from, signatures redacted.
    pub source: String,
    /// The model.
    pub model: String,
    /// The version.
    pub version: String,
    /// The sha256 of its manifest.
    pub manifest_digest: String,
}

/// What one eviction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EvictReport {
    /// `model/version` of each version evicted.
    pub evicted_versions: Vec<String>,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Bytes in the cache after the pass; above the quota when pinned or busy
    /// versions hold the rest.
    pub used_bytes: u64,
}

#[derive(Debug, Clone)]
/// A node-local cache of verified blobs, by sha256, shared by the pods of a node.
pub struct NodeCache {
    root: PathBuf,
}

impl NodeCache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<NodeCache, NodeCacheError> {
        for sub in [
            "blobs",
            "proofs",
            "partial",
            "versions",
            "manifests",
            "locks",
        ] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(NodeCache { root: root.into() })
    }

    /// The cache's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this sha256 is kept.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    /// Where downloads in progress are written.
    pub fn partial_dir(&self) -> PathBuf {
        self.root.join("partial")
    }

    /// A blob of the right size and content is present: proven cheaply
    /// when the blob is as it was when last verified, else hashed again. A
    /// blob whose content changed is removed, so that it is downloaded again.
    pub fn has_blob(&self, sha256: &str, size: u64) -> bool {
        let path = self.blob_path(sha256);
        if !is_file_of_size(&path, size) {
            return false;
        }
        if std::fs::read_to_string(self.proof_path(sha256)).ok() == proof_of(&path) {
            return true;
        }
        let rehashed = File::open(&path).and_then(crate::digest::hash_reader);
        if matches!(&rehashed, Ok((n, digest)) if *n == size && digest == sha256) {
            return self.seal(sha256).is_ok();
        }
        tracing::warn!(
            sha256,
            "a node cache blob no longer matches its digest; it is fetched again"
        );
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(self.proof_path(sha256));
        false
    }

    /// Takes a verified file into the cache as the blob of `sha256`:
    /// read-only, with its proof.
    pub fn admit(&self, verified: &Path, sha256: &str) -> Result<(), NodeCacheError> {
        use std::os::unix::fs::PermissionsExt as _;
        let read_only = std::fs::Permissions::from_mode(0o444);
        std::fs::set_permissions(verified, read_only).map_err(io(verified))?;
        let blob = self.blob_path(sha256);
        std::fs::rename(verified, &blob).map_err(io(&blob))?;
        self.seal(sha256)
    }

    /// Makes the blob read-only and records its proof, after its digest matched.
    fn seal(&self, sha256: &str) -> Result<(), NodeCacheError> {
        use std::os::unix::fs::PermissionsExt as _;
        let blob = self.blob_path(sha256);
        let meta = std::fs::metadata(&blob).map_err(io(&blob))?;
        if meta.permissions().mode() & 0o222 != 0 {
            let read_only = std::fs::Permissions::from_mode(0o444);
            std::fs::set_permissions(&blob, read_only).map_err(io(&blob))?;
        }
        let proof = proof_of(&blob).unwrap_or_default();
        let path = self.proof_path(sha256);
        write_atomic(&path, proof.as_bytes()).map_err(io(&path))
    }

    fn proof_path(&self, sha256: &str) -> PathBuf {
        self.root.join("proofs").join(sha256)
    }

    /// The key of one version at one source.
    pub fn version_id(source: &str, model: &str, version: &str) -> String {
        sha256_hex(format!("{source}\n{model}\n{version}").as_bytes())[..32].to_string()
    }

    /// Block until this process is the only fetcher of the version on the node.
    pub fn lock_version(&self, id: &str) -> Result<File, NodeCacheError> {
        let path = self.lock_path(id);
        let file = lock_file(&path).map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(file)
    }

    /// Block until this process is the only one downloading the blob: two
    /// versions that share a file, fetched at once, would otherwise write the
    /// same partial file.
    pub fn lock_blob(&self, sha256: &str) -> Result<File, NodeCacheError> {
        let path = self.lock_path(&format!("blob-{sha256}"));
        let file = lock_file(&path).map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(file)
    }

    /// The version's record and manifest, when a complete fetch left them.
    pub fn lookup(&self, id: &str) -> Option<(VersionRecord, VerifiedManifest)> {
        let bytes = std::fs::read(self.record_path(id)).ok()?;
        let record: VersionRecord = serde_json::from_slice(&bytes).ok()?;
        let manifest_bytes = std::fs::read(self.manifest_path(&record.manifest_digest)).ok()?;
        if sha256_hex(&manifest_bytes) != record.manifest_digest {
            return None;
        }
        let verified = manifest::parse(
            "the node cache",
            manifest_bytes,
            Some((&record.model, &record.version)),
        )
        .ok()?;
        let complete = verified
            .manifest
            .files
            .iter()
            .all(|f| self.has_blob(&f.sha256, f.size));
        complete.then_some((record, verified))
    }

    /// Record a version whose blobs are all present; marks it used now.
    pub fn record(
        &self,
        id: &str,
        record: &VersionRecord,
        manifest: &VerifiedManifest,
    ) -> Result<(), NodeCacheError> {
        let mpath = self.manifest_path(&manifest.digest);
        write_atomic(&mpath, &manifest.bytes).map_err(io(&mpath))?;
        let rpath = self.record_path(id);
        let json = serde_json::to_vec_pretty(record).expect("records serialize");
        write_atomic(&rpath, &json).map_err(io(&rpath))
    }

    /// Mark the version used now (LRU order is the records' mtime).
    pub fn touch(&self, id: &str) {
        if let Ok(f) = File::options().write(true).open(self.record_path(id)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Bytes held by blobs.
    pub fn used_bytes(&self) -> u64 {
        std::fs::read_dir(self.root.join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Evict least recently used versions until the blobs plus `incoming`
    /// bytes fit in `quota`. Never evicts `keep`, a version another fetcher
    /// holds, or a pinned one. Another evictor at work means this pass is
    /// skipped: it will leave the cache within the quota too.
    pub fn evict(&self, quota: u64, incoming: u64, keep: &str) -> EvictReport {
        let mut report = EvictReport {
            used_bytes: self.used_bytes(),
            ..Default::default()
        };
        if report.used_bytes + incoming <= quota {
            return report;
        }
        let Ok(evict_lock) = lock_file(&self.root.join("evict.lock")) else {
            return report;
        };
        if evict_lock.try_lock().is_err() {
            return report;
        }
        let mut versions: Vec<(SystemTime, String)> = std::fs::read_dir(self.root.join("versions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                Some((e.metadata().ok()?.modified().ok()?, name))
            })
            .collect();
        versions.sort();
        for (_, id) in versions {
            if report.used_bytes + incoming <= quota {
                break;
            }
            if id == keep || self.pinned(&id) {
                continue;
            }
            let Ok(lock) = lock_file(&self.lock_path(&id)) else {
                continue;
            };
            if lock.try_lock().is_err() {
                continue;
            }
            let _ = std::fs::remove_file(self.record_path(&id));
            report.evicted_versions.push(id);
            report.freed_bytes += self.collect_garbage();
            report.used_bytes = self.used_bytes();
        }
        report
    }

    /// Remove blobs no record references and no one else links; returns the
    /// bytes freed. A fetcher that loses a blob to this between its lookup and
    /// its link downloads the file again.
    fn collect_garbage(&self) -> u64 {
        let mut referenced = BTreeSet::new();
        let mut digests = BTreeSet::new();
        for entry in std::fs::read_dir(self.root.join("versions"))
            .into_iter()
            .flatten()
            .flatten()
        {
            // A record whose manifest is gone or unreadable references nothing.
            if let Some((record, m)) = self.read_record(&entry.path()) {
                digests.insert(record.manifest_digest);
                referenced.extend(m.files.into_iter().map(|f| f.sha256));
            }
        }
        let mut freed = 0;
        for entry in std::fs::read_dir(self.root.join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if referenced.contains(&name) || meta.nlink() > 1 {
                continue;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                let _ = std::fs::remove_file(self.proof_path(&name));
                freed += meta.len();
            }
        }
        for entry in std::fs::read_dir(self.root.join("manifests"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !digests.contains(name.trim_end_matches(".json")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        freed
    }

    /// Pins version `id` for `holder` (a pod's uid: letters, digits and
    /// dashes), with `about` (what to look the holder up by) as the pin's
    /// content. Eviction leaves the version until every pin is removed.
    pub fn pin(&self, id: &str, holder: &str, about: &str) -> Result<(), NodeCacheError> {
        let safe =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let dir = self.root.join("pins").join(id);
        if !safe(id) || !safe(holder) {
            return Err(NodeCacheError::Io {
                path: dir,
                source: std::io::Error::other("a pin is named by letters, digits and dashes"),
            });
        }
        let path = dir.join(holder);
        // Asked on every request of the pod: once is enough.
        if path.is_file() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::write(&path, about).map_err(io(&path))
    }

    /// Removes `holder`'s pin of `id`.
    pub fn unpin(&self, id: &str, holder: &str) {
        let dir = self.root.join("pins").join(id);
        let _ = std::fs::remove_file(dir.join(holder));
        // Fails while other pins remain: that is the point.
        let _ = std::fs::remove_dir(&dir);
    }

    /// Every pin: (version id, holder, about).
    pub fn pins(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for version in std::fs::read_dir(self.root.join("pins"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = version.file_name().to_string_lossy().into_owned();
            for pin in std::fs::read_dir(version.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let holder = pin.file_name().to_string_lossy().into_owned();
                let about = std::fs::read_to_string(pin.path()).unwrap_or_default();
                out.push((id.clone(), holder, about));
            }
        }
        out.sort();
        out
    }

    fn pinned(&self, id: &str) -> bool {
        let held = std::fs::read_dir(self.root.join("pins").join(id))
            .is_ok_and(|mut d| d.next().is_some());
        held || self
            .read_record(&self.record_path(id))
            .is_some_and(|(_, m)| {
                m.files.iter().any(|f| {
                    std::fs::metadata(self.blob_path(&f.sha256)).is_ok_and(|meta| meta.nlink() > 1)
                })
            })
    }

    fn lock_path(&self, id: &str) -> PathBuf {
        self.root.join("locks").join(format!("{id}.lock"))
    }

    /// The record at `path` and the manifest it names, as stored (unchecked:
    /// for eviction's bookkeeping, not for serving).
    fn read_record(&self, path: &Path) -> Option<(VersionRecord, manifest::Manifest)> {
        let record: VersionRecord = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let bytes = std::fs::read(self.manifest_path(&record.manifest_digest)).ok()?;
        let m = serde_json::from_slice(&bytes).ok()?;
        Some((record, m))
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.root.join("versions").join(format!("{id}.json"))
    }

    fn manifest_path(&self, digest: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{digest}.json"))
    }
}

/// What a blob's proof records: its inode, size and modification time (ns).
/// Writing through any link to it changes the last two.
fn proof_of(blob: &Path) -> Option<String> {
    let meta = std::fs::metadata(blob).ok()?;
    Some(format!(
        "{} {} {}.{:09}\n",
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::manifest::{Manifest, ManifestFile};

    /// A cached version of `size` bytes of `fill`.
    fn cached(cache: &NodeCache, version: &str, fill: u8, size: usize) -> String {
        let data = vec![fill; size];
        let sha = sha256_hex(&data);
        std::fs::write(cache.blob_path(&sha), &data).unwrap();
        let m = Manifest {
            format_version: 1,
            model: "m".into(),
            version: version.into(),
            files: vec![ManifestFile {
                path: "w.bin".into(),
                size: size as u64,
                sha256: sha,
            }],
        };
        let verified = manifest::parse("t", m.to_bytes(), None).unwrap();
        let id = NodeCache::version_id("s3://b", "m", version);
        let record = VersionRecord {
            source: "s3://b".into(),
            model: "m".into(),
            version: version.into(),
            manifest_digest: verified.digest.clone(),
        };
        cache.record(&id, &record, &verified).unwrap();
        id
    }

    fn age(cache: &NodeCache, id: &str, secs_ago: u64) {
        let f = File::options()
            .write(true)
            .open(cache.record_path(id))
            .unwrap();
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(secs_ago))
            .unwrap();
    }

    #[test]
    fn lookup_needs_every_blob() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path()).unwrap();
        let id = cached(&cache, "v1", 1, 10);
        let (record, manifest) = cache.lookup(&id).unwrap();
        assert_eq!(record.version, "v1");
        std::fs::remove_file(cache.blob_path(&manifest.manifest.files[0].sha256)).unwrap();
        assert!(cache.lookup(&id).is_none());
    }

    #[test]
    fn a_pod_pin_keeps_a_version_until_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path()).unwrap();
        let v1 = cached(&cache, "v1", 1, 1000);
        let v2 = cached(&cache, "v2", 2, 1000);
        cache.pin(&v1, "pod-uid-1", "ml/chat-0").unwrap();
        cache.pin(&v1, "pod-uid-2", "ml/chat-1").unwrap();
        assert_eq!(cache.pins().len(), 2);
        assert!(
            cache.pin(&v1, "../escape", "x").is_err(),
            "names stay inside pins/"
        );
        let r = cache.evict(1000, 0, &v2);
        assert!(r.evicted_versions.is_empty(), "v1 is pinned by two pods");
        cache.unpin(&v1, "pod-uid-1");
        assert!(
            cache.evict(1000, 0, &v2).evicted_versions.is_empty(),
            "one pod still holds it"
        );
        cache.unpin(&v1, "pod-uid-2");
        assert!(cache.pins().is_empty());
        assert_eq!(cache.evict(1000, 0, &v2).evicted_versions, vec![v1]);
    }

    #[test]
    fn eviction_takes_least_recently_used_unpinned_versions_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path()).unwrap();
        let v1 = cached(&cache, "v1", 1, 100);
        let v2 = cached(&cache, "v2", 2, 100);
        let v3 = cached(&cache, "v3", 3, 100);
        age(&cache, &v1, 300);
        age(&cache, &v2, 200);
        age(&cache, &v3, 100);
        // A pod on this filesystem holds a link to v1's file: pinned.
        let (_, m1) = cache.lookup(&v1).unwrap();
        let pod_file = dir.path().join("pod-w.bin");
        std::fs::hard_link(cache.blob_path(&m1.manifest.files[0].sha256), &pod_file).unwrap();

        let report = cache.evict(250, 0, &v3);
        assert_eq!(
            report.evicted_versions,
            vec![v2.clone()],
            "v1 pinned, v3 kept"
        );
        assert_eq!(report.freed_bytes, 100);
        assert_eq!(report.used_bytes, 200);
        assert!(cache.lookup(&v2).is_none());
        assert!(cache.lookup(&v1).is_some());

        // Once the pod is gone, v1 is the oldest and goes.
        std::fs::remove_file(&pod_file).unwrap();
        let report = cache.evict(150, 0, &v3);
        assert_eq!(report.evicted_versions, vec![v1]);
        assert_eq!(report.used_bytes, 100);
    }

    #[test]
    fn a_version_another_fetcher_holds_is_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path()).unwrap();
        let v1 = cached(&cache, "v1", 1, 100);
        let v2 = cached(&cache, "v2", 2, 100);
        age(&cache, &v1, 100);
        let _held = cache.lock_version(&v1).unwrap();
        let report = cache.evict(0, 0, "none");
        assert_eq!(report.evicted_versions, vec![v2]);
        assert_eq!(report.used_bytes, 100);
    }

    #[test]
    fn blobs_shared_by_a_remaining_version_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path()).unwrap();
        let v1 = cached(&cache, "v1", 7, 100);
        let v2 = cached(&cache, "v2", 7, 100); // same bytes, same blob
        age(&cache, &v1, 100);
        let report = cache.evict(50, 0, &v2);
        assert_eq!(report.evicted_versions, vec![v1]);
        assert_eq!(report.freed_bytes, 0);
        assert!(cache.lookup(&v2).is_some());
    }
}
