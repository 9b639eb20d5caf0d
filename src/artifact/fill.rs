//! Filling the node cache with a version, with no destination: what the
//! node agent (`modelcache node`) does for the pods of its node. The same
//! engine, checks, locks and quota as `modelcache fetch --cache-dir`; an
//! observer sees each file's transfer as it opens, so that the pods that
//! asked for the version can follow the download while it runs.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::fetch::{self, FetchError, FetchOptions};
use super::manifest::{ManifestFile, VerifiedManifest};
use super::node_cache::NodeCache;
use super::transfer::Observer;

/// What a fill did.
#[derive(Debug, Clone)]
pub struct FillSummary {
    /// The version's manifest, verified (and pinned, when a digest was given).
    pub manifest: VerifiedManifest,
    /// Bytes received from the origin.
    pub downloaded_bytes: u64,
    /// Requests made to the origin.
    pub requests: u64,
    /// Versions evicted to stay within the quota.
    pub evicted_versions: usize,
}

/// Puts every file of the version into `cache`, verified, and records the
/// version there. `opts` says what and how (location, source settings,
/// concurrency, deadline, retries, quota, pinned digest); its destination
/// and its own cache settings are not used. `manifest` is called once the
/// manifest is verified, before any file is downloaded.
pub async fn fill(
    opts: &FetchOptions,
    cache: &NodeCache,
    manifest: impl FnOnce(&VerifiedManifest),
    observer: &dyn Observer,
) -> Result<FillSummary, FetchError> {
    let started = Instant::now();
    super::check_names(&opts.model, &opts.version)?;
    let source_id = opts.location.to_string();
    let version_id = NodeCache::version_id(&source_id, &opts.model, &opts.version);
    let _version_lock = fetch::lock_version(Some(cache), &version_id).await?;
    let partial_dir = cache.partial_dir();
    let ctx = fetch::connect(
        opts,
        None,
        started,
        Some(cache.clone()),
        partial_dir.clone(),
    )
    .await?;
    let verified = fetch::version_manifest(&ctx, opts, &version_id).await?;
    manifest(&verified);

    let mut seen = BTreeSet::new();
    let missing: Vec<ManifestFile> = verified
        .manifest
        .files
        .iter()
        .filter(|f| seen.insert(f.sha256.as_str()) && !cache.has_blob(&f.sha256, f.size))
        .cloned()
        .collect();
    let need: u64 = missing.iter().map(|f| f.size).sum();
    let mut evicted = match opts.cache_quota {
        Some(quota) => cache.evict(quota, need, &version_id).evicted_versions.len(),
        None => 0,
    };
    fetch::check_space(opts, &partial_dir, fetch::to_finish(&missing, &partial_dir))?;
    ctx.engine.counters.total.store(need, Ordering::Relaxed);
    fetch::download_in_time(&ctx, opts, missing, observer).await?;
    evicted += fetch::record_version(cache, opts, &source_id, &version_id, &verified)?;
    let counters = &ctx.engine.counters;
    Ok(FillSummary {
        manifest: verified,
        downloaded_bytes: counters.done.load(Ordering::Relaxed),
        requests: counters.requests.load(Ordering::Relaxed),
        evicted_versions: evicted,
    })
}
