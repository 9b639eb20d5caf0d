//! `modelcache fetch`: pull one version into a destination, verified against
//! its manifest, in parallel byte ranges, resumable after a kill, through an
//! optional node-local cache.
//!
//! Inside the destination, modelcache keeps its state in `.modelcache/`:
//!
//! ```text
//! partial/<sha256>.part   a file being downloaded (sparse, full size)
//! partial/<sha256>.parts  its journal: part size, then each finished part
//! partial/<sha256>        downloaded and verified, not yet in place
//! placed.log              files moved into place: digest, size, inode, mtime, path
//! manifest.json           the version's manifest
//! complete                written last: model, version, manifest digest
//! ```
//!
//! A file reaches its final path only by a rename after its digest matched,
//! so a wrong file never appears there; `complete` is removed before anything
//! changes and written after everything is in place, so a reader that checks it
//! sees either nothing or the whole verified version (in a pod, the main
//! container starts only after the init container succeeded anyway).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::disk::{available_bytes, copy_atomic, link_or_copy, write_atomic};
use super::governor::Concurrency;
use super::manifest::{
    self, MANIFEST_NAME, ManifestError, ManifestFile, STATE_DIR, VerifiedManifest,
};
use super::node_cache::{NodeCache, NodeCacheError, VersionRecord};
use super::progress::{Counters, ProgressMode, Reporter, human_bytes};
use super::retry::Backoff;
use super::source::{ConnectError, Failure, Location, Source, SourceConfig, SourceError};
use super::transfer::{Engine, Observer, Transfer, TransferError};

/// The request header naming the origin a node agent is asked to serve
/// from (`s3://bucket/prefix`, `https://cdn/prefix`).
pub const SOURCE_HEADER: &str = "x-modelcache-source";

/// Everything `modelcache fetch` takes.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Where the versions are.
    pub location: Location,
    /// How to reach the source (endpoint, headers, signing).
    pub source: SourceConfig,
    /// The model's name under the location.
    pub model: String,
    /// The version to fetch.
    pub version: String,
    /// The directory that receives the files.
    pub dest: PathBuf,
    /// The node cache shared by the node's pods, if any.
    pub cache_dir: Option<PathBuf>,
    /// Bytes the node cache may hold; unbounded when `None`.
    pub cache_quota: Option<u64>,
    /// Copies files out of the node cache instead of hard-linking them, so
    /// that nothing a pod does to its files reaches the cache (pods that do
    /// not trust each other).
    pub cache_copy: bool,
    /// Requests in flight at once.
    pub concurrency: Concurrency,
    /// Bytes per ranged request; adaptive when `None`.
    pub part_size: Option<u64>,
    /// The whole fetch must end within this.
    pub deadline: Duration,
    /// Attempts per request before a transient failure becomes final.
    pub max_attempts: u32,
    /// First retry delay (doubles up to 10 s, with full jitter).
    pub retry_base: Duration,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Seconds between progress log lines.
    pub progress_interval: Duration,
    /// The sha256 the version's manifest must have (the one the controller
    /// recorded): any other manifest is refused, wherever it came from.
    pub manifest_digest: Option<String>,
    /// The node agent to try before the origin.
    pub node_agent: Option<NodeAgent>,
}

/// The node agent (`modelcache node`) on this pod's node, and the pod's
/// projected service-account token for it.
#[derive(Clone)]
pub struct NodeAgent {
    /// Its base URL, e.g. `http://10.0.3.7:8095`.
    pub url: url::Url,
    /// The token, audience `modelcache-node`.
    pub token: String,
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never shown.
        f.debug_struct("NodeAgent").field("url", &self.url).finish()
    }
}

/// Attempts per request against the node agent: it is on the node, so a
/// failure that outlasts a few is a reason to go to the origin, not to wait.
const AGENT_ATTEMPTS: u32 = 3;

/// A node agent silent this long is given up for the origin.
const AGENT_IDLE: Duration = Duration::from_secs(10);

/// Bytes per request to the node agent: a whole file in one stream, which
/// follows the agent's download when it is still filling (splitting would
/// ask for bytes it does not have yet).
const AGENT_PART: u64 = 1 << 40;

impl FetchOptions {
    /// Options with the defaults of `modelcache fetch`.
    pub fn new(location: Location, model: &str, version: &str, dest: &Path) -> Self {
        FetchOptions {
            location,
            source: SourceConfig::default(),
            model: model.into(),
            version: version.into(),
            dest: dest.into(),
            cache_dir: None,
            cache_quota: None,
            cache_copy: false,
            concurrency: Concurrency::default(),
            part_size: None,
            deadline: Duration::from_secs(2 * 3600),
            max_attempts: 10,
            retry_base: Duration::from_millis(200),
            progress: ProgressMode::Off,
            progress_interval: Duration::from_secs(5),
            manifest_digest: None,
            node_agent: None,
        }
    }
}

/// The JSON printed at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FetchSummary {
    /// The model fetched.
    pub model: String,
    /// The version fetched.
    pub version: String,
    /// The sha256 of the version's manifest.
    pub manifest_digest: String,
    /// Where the files are.
    pub dest: PathBuf,
    /// Files and bytes of the version.
    pub files: usize,
    /// Bytes of the version.
    pub bytes: u64,
    /// Received from the origin in this run.
    pub downloaded_bytes: u64,
    /// Parts of interrupted downloads reused from an earlier run.
    pub resumed_bytes: u64,
    /// Files served by the node cache, and their bytes.
    pub cache_hits: usize,
    /// Bytes of the files the node cache served.
    pub cache_hit_bytes: u64,
    /// Files already in place and verified from an earlier run.
    pub reused_files: usize,
    /// Requests made to the origin.
    pub requests: u64,
    /// Requests retried after a transient failure.
    pub retries: u64,
    /// The most ranges downloaded at once (`--concurrency auto` finds it).
    pub peak_concurrency: u64,
    /// Wall time of the fetch.
    pub seconds: f64,
    /// Version bytes per second, MB/s (10^6).
    pub throughput_mbps: f64,
    /// Versions evicted from the node cache to stay within its quota.
    pub evicted_versions: usize,
    /// The node agent served the version (no request reached the origin).
    pub node_agent: bool,
    /// Why the node agent could not serve it, when one was given and the
    /// origin served instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_agent_fallback: Option<String>,
}

/// What `complete` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompleteMarker {
    /// The source, with any signature redacted.
    pub source: String,
    /// The model.
    pub model: String,
    /// The version.
    pub version: String,
    /// The sha256 of the version's manifest.
    pub manifest_digest: String,
    /// Files of the version.
    pub files: usize,
    /// Bytes of the version.
    pub bytes: u64,
}

/// Why a fetch failed; each kind has its exit code.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum FetchError {
    #[error("failed to fetch: {0}")]
    Name(#[from] super::NameError),
    #[error("failed to set up the source")]
    Connect(#[from] ConnectError),
    #[error("failed to read the manifest of {model}/{version}")]
    Manifest {
        model: String,
        version: String,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("failed to fetch {file}{}", hint(.source.failure))]
    Source {
        file: String,
        #[source]
        source: SourceError,
    },
    #[error(
        "failed to verify {file} from {url}: expected sha256 {expected}, got {actual} twice; the object at the origin does not match its manifest: publish the version again (as a new version) or repair the object"
    )]
    Integrity {
        file: String,
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "failed to fetch {model}/{version}: the manifest from {url} has sha256 {actual}, but {expected} is the one pinned (--manifest-digest); the version at the source was changed after it was recorded: publish changes as a new version"
    )]
    Pinned {
        model: String,
        version: String,
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "failed to fetch {model}/{version}: {need} more are needed at {path} but only {available} are free; free space, raise the volume's size limit, or use a smaller --cache-quota"
    )]
    Space {
        model: String,
        version: String,
        path: PathBuf,
        need: String,
        available: String,
    },
    #[error(
        "failed to place {file}: {path} is a symlink, and files must stay inside the destination {dest}; remove it"
    )]
    Escape {
        file: String,
        path: PathBuf,
        dest: PathBuf,
    },
    #[error(
        "failed to fetch {model}/{version} within the deadline of {seconds} s; raise --deadline, or check the origin's speed (the parts already written are kept for the next run)"
    )]
    Deadline {
        model: String,
        version: String,
        seconds: u64,
    },
    #[error("failed to {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    NodeCache(#[from] NodeCacheError),
}

fn hint(failure: Failure) -> &'static str {
    match failure {
        Failure::Transient => {
            " after retrying until the attempts ran out (the parts already written are kept for the next run)"
        }
        _ => "",
    }
}

impl From<TransferError> for FetchError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Source { file, source } => FetchError::Source { file, source },
            TransferError::Io { what, path, source } => FetchError::Io { what, path, source },
        }
    }
}

impl FetchError {
    /// The process exit code; documented in docs/cli.md.
    pub fn exit_code(&self) -> u8 {
        match self {
            FetchError::Name(_) | FetchError::Connect(_) => 2,
            FetchError::Source { source, .. } => match source.failure {
                Failure::Transient => 7,
                Failure::Mismatch => 5,
                _ => 4,
            },
            FetchError::Manifest { .. }
            | FetchError::Integrity { .. }
            | FetchError::Pinned { .. }
            | FetchError::Escape { .. } => 5,
            FetchError::Space { .. } => 6,
            FetchError::Deadline { .. } => 7,
            FetchError::Io { .. } | FetchError::NodeCache(_) => 1,
        }
    }
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// Where a file of the version comes from in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// In place from an earlier run, unchanged since.
    Reused,
    /// Verified in the partial area by an earlier run, or in the node cache.
    Verified,
    CacheHit,
    Download,
}

pub(super) struct Ctx {
    pub(super) engine: Arc<Engine>,
    partial_dir: PathBuf,
    cache: Option<NodeCache>,
    concurrency: Concurrency,
}

impl Ctx {
    /// Where a verified file waits: the node cache's blob, else the partial area.
    fn verified_path(&self, sha256: &str) -> PathBuf {
        match &self.cache {
            Some(cache) => cache.blob_path(sha256),
            None => self.partial_dir.join(sha256),
        }
    }
}

/// The destination's own files: its state directory holds the lock, the
/// completion marker, the log of placed files and (without a node cache)
/// the partial downloads.
struct Destination {
    dir: PathBuf,
    state: PathBuf,
    partial: PathBuf,
    marker: PathBuf,
    placed_log: PathBuf,
}

impl Destination {
    fn open(dest: &Path) -> Result<Destination, FetchError> {
        std::fs::create_dir_all(dest).map_err(io_err("create the destination", dest))?;
        let dir = dest
            .canonicalize()
            .map_err(io_err("resolve the destination", dest))?;
        let state = dir.join(STATE_DIR);
        // The state directory is written (locks, partial files, the marker):
        // a link there would have the fetcher write wherever it points.
        if std::fs::symlink_metadata(&state).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(FetchError::Escape {
                file: STATE_DIR.into(),
                path: state,
                dest: dir,
            });
        }
        let partial = state.join("partial");
        std::fs::create_dir_all(&partial).map_err(io_err("create", &partial))?;
        Ok(Destination {
            marker: state.join("complete"),
            placed_log: state.join("placed.log"),
            dir,
            state,
            partial,
        })
    }

    /// The version's manifest when the destination already holds all of it,
    /// verified: versions are immutable, so it needs no request.
    fn complete(
        &self,
        opts: &FetchOptions,
        source_id: &str,
        placed: &BTreeMap<String, PlacedEntry>,
    ) -> Option<VerifiedManifest> {
        let marker = read_marker(&self.marker)?;
        if marker.source != source_id
            || marker.model != opts.model
            || marker.version != opts.version
        {
            return None;
        }
        let verified = read_local_manifest(&self.state, &marker.manifest_digest)?;
        let files = &verified.manifest.files;
        files
            .iter()
            .all(|f| still_placed(&self.dir, placed, f))
            .then_some(verified)
    }
}

/// Fetch a version: from the node agent when one is given, else (or when
/// it cannot serve) from the origin. Returns the summary, or the first error
/// that retrying cannot cure; what was downloaded stays for the next run.
pub async fn fetch(mut opts: FetchOptions) -> Result<FetchSummary, FetchError> {
    let Some(agent) = opts.node_agent.clone() else {
        return fetch_from(&opts, None).await;
    };
    let agent = &agent;
    if opts.manifest_digest.is_none() {
        // Nothing pinned the manifest: the agent's is not trusted, the
        // origin's is read (one request) and pinned, so that every file the
        // agent serves is still checked against what the origin published.
        opts.manifest_digest = Some(manifest_digest(&opts).await?);
    }
    match fetch_from(&opts, Some(agent)).await {
        Ok(mut s) => {
            s.node_agent = true;
            Ok(s)
        }
        Err(e) => {
            // Whatever the agent did, every byte it sent was checked against
            // the (pinned) manifest, and nothing unverified reached a final
            // path: the origin finishes from here, resuming what is sound.
            let why = crate::error::chain(&e);
            tracing::warn!(agent = %agent.url, model = %opts.model, version = %opts.version,
                "the node agent did not serve the version; fetching from the origin: {why}");
            let mut s = fetch_from(&opts, None).await?;
            s.node_agent_fallback = Some(why);
            Ok(s)
        }
    }
}

/// The node agent's URL from `--node-agent`: `http(s)://host:port`, where
/// `host` may be an IPv6 address without brackets, as the downward API's
/// `status.hostIP` gives it on an IPv6 node (`http://fd00::1:8095`).
pub fn node_agent_url(s: &str) -> Option<url::Url> {
    let ok = |u: url::Url| matches!(u.scheme(), "http" | "https").then_some(u);
    if let Ok(u) = url::Url::parse(s) {
        return ok(u);
    }
    let (scheme, rest) = s.split_once("://")?;
    let addr = socket_addr(rest.trim_end_matches('/'))?;
    ok(url::Url::parse(&format!("{scheme}://{addr}/")).ok()?)
}

/// `ip:port`, where `ip` may be an IPv6 address without brackets, as the
/// downward API's `status.hostIP` expands on an IPv6 node (`fd00::1:8095`).
pub fn socket_addr(s: &str) -> Option<std::net::SocketAddr> {
    if let Ok(addr) = s.parse() {
        return Some(addr);
    }
    let (ip, port) = s.rsplit_once(':')?;
    Some(std::net::SocketAddr::new(
        ip.parse().ok()?,
        port.parse().ok()?,
    ))
}

/// The digest of the version's manifest at the origin (`opts.location`
/// with `opts.source`), checked as a fetch checks it; nothing is written.
pub async fn manifest_digest(opts: &FetchOptions) -> Result<String, FetchError> {
    super::check_names(&opts.model, &opts.version)?;
    let partial = opts.dest.join(STATE_DIR).join("partial");
    let ctx = connect(opts, None, Instant::now(), None, partial).await?;
    Ok(version_manifest(&ctx, opts, "").await?.digest)
}

/// One fetch, from the agent (`via`) or from the origin.
async fn fetch_from(
    opts: &FetchOptions,
    via: Option<&NodeAgent>,
) -> Result<FetchSummary, FetchError> {
    let started = Instant::now();
    super::check_names(&opts.model, &opts.version)?;
    let dest = Destination::open(&opts.dest)?;
    let source_id = opts.location.to_string();

    // One fetcher per destination at a time.
    let _dest_lock = lock_file(dest.state.join("lock")).await?;
    let mut placed = read_placed(&dest.placed_log);
    if let Some(verified) = dest.complete(opts, &source_id, &placed)
        && pinned(opts, &verified, "the destination").is_ok()
    {
        return Ok(summary(opts, &dest.dir, &verified, started, |s| {
            s.reused_files = verified.manifest.files.len();
        }));
    }

    let cache = opts.cache_dir.as_deref().map(NodeCache::open).transpose()?;
    let version_id = NodeCache::version_id(&source_id, &opts.model, &opts.version);
    let _version_lock = lock_version(cache.as_ref(), &version_id).await?;
    let partial_dir = match &cache {
        Some(c) => c.partial_dir(),
        None => dest.partial.clone(),
    };
    let ctx = connect(opts, via, started, cache.clone(), partial_dir).await?;
    let verified = version_manifest(&ctx, opts, &version_id).await?;
    let files = &verified.manifest.files;

    // From here on the destination changes: it is no longer complete.
    match std::fs::remove_file(&dest.marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &dest.marker)(e)),
    }
    let plans = plan_files(files, &dest.dir, &placed, &ctx);
    let (to_download, mut evicted) = reserve_space(opts, &ctx, &dest, files, &plans, &version_id)?;
    let resumed = download_in_time(&ctx, opts, to_download, &()).await?;
    let placement = match opts.cache_copy {
        true => Placement::Copy,
        false => Placement::Link,
    };
    let (cache_hits, cache_hit_bytes) =
        place_all(&ctx, &dest, files, &plans, placement, &mut placed)?;
    forget_others(&dest, files, &mut placed)?;
    evicted += mark_complete(&ctx, &dest, opts, &source_id, &version_id, &verified)?;

    let counters = &ctx.engine.counters;
    Ok(summary(opts, &dest.dir, &verified, started, |s| {
        s.downloaded_bytes = counters.done.load(Ordering::Relaxed);
        s.resumed_bytes = resumed;
        s.cache_hits = cache_hits;
        s.cache_hit_bytes = cache_hit_bytes;
        s.reused_files = plans.iter().filter(|p| **p == Plan::Reused).count();
        s.requests = counters.requests.load(Ordering::Relaxed);
        s.retries = counters.retries.load(Ordering::Relaxed);
        s.peak_concurrency = counters.peak_in_flight.load(Ordering::Relaxed);
        s.evicted_versions = evicted;
    }))
}

/// The node cache's lock on this version, so that pods of a node fetching
/// it together download it once.
pub(super) async fn lock_version(
    cache: Option<&NodeCache>,
    version_id: &str,
) -> Result<Option<File>, FetchError> {
    let Some(cache) = cache.cloned() else {
        return Ok(None);
    };
    let id = version_id.to_owned();
    let locked = tokio::task::spawn_blocking(move || cache.lock_version(&id))
        .await
        .expect("lock task panicked")?;
    Ok(Some(locked))
}

/// The source (the origin, or the node agent `via`), and what the
/// downloads share.
pub(super) async fn connect(
    opts: &FetchOptions,
    via: Option<&NodeAgent>,
    started: Instant,
    cache: Option<NodeCache>,
    partial_dir: PathBuf,
) -> Result<Ctx, FetchError> {
    let mut cfg = opts.source.clone();
    cfg.connections = cfg.connections.max(opts.concurrency.max());
    let (mut max_attempts, mut part_size) = (opts.max_attempts.max(1), opts.part_size);
    let source = match via {
        None => Source::connect(&opts.location, &cfg).await?,
        Some(agent) => {
            // The agent serves the origin's layout under /v1/, for the origin
            // named in a header; the origin's own credentials stay here.
            let base = agent.url.join("v1/").map_err(|_| ConnectError::Header {
                name: "node agent URL".into(),
            })?;
            let agent_cfg = SourceConfig {
                headers: vec![
                    ("authorization".into(), format!("Bearer {}", agent.token)),
                    (SOURCE_HEADER.into(), opts.location.to_string()),
                ],
                idle_timeout: Some(AGENT_IDLE),
                connections: cfg.connections,
                ..Default::default()
            };
            cfg = agent_cfg;
            max_attempts = max_attempts.min(AGENT_ATTEMPTS);
            part_size = Some(AGENT_PART);
            Source::connect(&Location::Http { base }, &cfg).await?
        }
    };
    let engine = Arc::new(Engine {
        source,
        model: opts.model.clone(),
        version: opts.version.clone(),
        counters: Arc::new(Counters::default()),
        deadline: started + opts.deadline,
        max_attempts,
        retry_base: opts.retry_base,
        idle: cfg.idle_timeout.unwrap_or(Duration::from_secs(30)),
        part_size,
        ttfb: Default::default(),
    });
    Ok(Ctx {
        engine,
        partial_dir,
        cache,
        concurrency: opts.concurrency,
    })
}

/// The manifest: from the node cache when another pod fetched this version
/// (versions are immutable, so no request), else from the source.
pub(super) async fn version_manifest(
    ctx: &Ctx,
    opts: &FetchOptions,
    version_id: &str,
) -> Result<VerifiedManifest, FetchError> {
    if let Some((_, m)) = ctx.cache.as_ref().and_then(|c| c.lookup(version_id)) {
        pinned(opts, &m, "the node cache")?;
        return Ok(m);
    }
    // The deadline covers the whole fetch: an origin that accepts and never
    // answers must not hold the manifest request past it (it did, until the
    // 30 s idle timeout, whatever --deadline said).
    let deadline = ctx.engine.deadline.into();
    let bytes = tokio::time::timeout_at(deadline, get_manifest(ctx))
        .await
        .map_err(|_| past_deadline(opts))??;
    let origin = ctx
        .engine
        .source
        .url(&opts.model, &opts.version, MANIFEST_NAME);
    let verified =
        manifest::parse(&origin, bytes, Some((&opts.model, &opts.version))).map_err(|source| {
            FetchError::Manifest {
                model: opts.model.clone(),
                version: opts.version.clone(),
                source: Box::new(source),
            }
        })?;
    pinned(opts, &verified, &origin)?;
    Ok(verified)
}

/// The manifest is the pinned one, when one is pinned: a node agent, a node
/// cache or an origin changed since the digest was recorded cannot change
/// what the files are checked against.
fn pinned(opts: &FetchOptions, verified: &VerifiedManifest, url: &str) -> Result<(), FetchError> {
    match &opts.manifest_digest {
        Some(expected) if *expected != verified.digest => Err(FetchError::Pinned {
            model: opts.model.clone(),
            version: opts.version.clone(),
            url: url.into(),
            expected: expected.clone(),
            actual: verified.digest.clone(),
        }),
        _ => Ok(()),
    }
}

fn past_deadline(opts: &FetchOptions) -> FetchError {
    FetchError::Deadline {
        model: opts.model.clone(),
        version: opts.version.clone(),
        seconds: opts.deadline.as_secs(),
    }
}

/// Where each file comes from.
fn plan_files(
    files: &[ManifestFile],
    dest: &Path,
    placed: &BTreeMap<String, PlacedEntry>,
    ctx: &Ctx,
) -> Vec<Plan> {
    let cache = ctx.cache.as_ref();
    files
        .iter()
        .map(|f| {
            if still_placed(dest, placed, f) {
                Plan::Reused
            } else if cache.is_none()
                && super::disk::is_file_of_size(&ctx.verified_path(&f.sha256), f.size)
            {
                Plan::Verified
            } else if cache.is_some_and(|c| c.has_blob(&f.sha256, f.size)) {
                Plan::CacheHit
            } else {
                Plan::Download
            }
        })
        .collect()
}

/// Checks space before any download, evicting from the node cache first:
/// everything still to come must fit. Returns the distinct files to download
/// and the versions evicted.
fn reserve_space(
    opts: &FetchOptions,
    ctx: &Ctx,
    dest: &Destination,
    files: &[ManifestFile],
    plans: &[Plan],
    version_id: &str,
) -> Result<(Vec<ManifestFile>, usize), FetchError> {
    let mut to_download: Vec<ManifestFile> = Vec::new();
    let mut seen = BTreeSet::new();
    for (f, plan) in files.iter().zip(plans) {
        if *plan == Plan::Download && seen.insert(f.sha256.as_str()) {
            to_download.push(f.clone());
        }
    }
    let need: u64 = to_download.iter().map(|f| f.size).sum();
    let still_needed = to_finish(&to_download, &ctx.partial_dir);
    let mut evicted = 0;
    if let (Some(cache), Some(quota)) = (&ctx.cache, opts.cache_quota) {
        evicted += cache.evict(quota, need, version_id).evicted_versions.len();
    }
    check_space(opts, &ctx.partial_dir, still_needed)?;
    if let Some(cache) = &ctx.cache
        && (opts.cache_copy || !same_filesystem(cache.root(), &dest.dir))
    {
        // Copies, not links, into the destination.
        let copies: u64 = files
            .iter()
            .zip(plans)
            .filter(|(_, p)| **p != Plan::Reused)
            .map(|(f, _)| f.size)
            .sum();
        check_space(opts, &dest.dir, copies)?;
    }
    ctx.engine.counters.total.store(need, Ordering::Relaxed);
    Ok((to_download, evicted))
}

/// Bytes still to be written to finish `files` in `partial_dir`: what
/// interrupted runs already wrote takes no more space (a resume used to be
/// checked as if it needed the whole size again).
pub(super) fn to_finish(files: &[ManifestFile], partial_dir: &Path) -> u64 {
    files
        .iter()
        .map(|f| {
            let written = allocated(&partial_dir.join(format!("{}.part", f.sha256)));
            f.size.saturating_sub(written)
        })
        .sum()
}

/// Bytes the file takes on disk (its allocated blocks: partial files are
/// sparse until filled); 0 when it does not exist.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Downloads and verifies the files within the fetch's deadline, showing
/// progress; returns the bytes resumed from an earlier run.
pub(super) async fn download_in_time(
    ctx: &Ctx,
    opts: &FetchOptions,
    files: Vec<ManifestFile>,
    observer: &dyn Observer,
) -> Result<u64, FetchError> {
    let counters = ctx.engine.counters.clone();
    let reporter = Reporter::start(opts.progress, opts.progress_interval, counters);
    let mut resumed = 0;
    let deadline = ctx.engine.deadline.into();
    let outcome =
        tokio::time::timeout_at(deadline, download(ctx, files, &mut resumed, observer)).await;
    reporter.finish().await;
    match outcome {
        Ok(result) => result.map(|()| resumed),
        Err(_elapsed) => Err(past_deadline(opts)),
    }
}

/// How files come out of the node cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Hard links where the filesystem allows (no bytes copied, and the
    /// blob is pinned while the pod holds it).
    Link,
    /// Copies: the pod's files share nothing with the cache.
    Copy,
}

/// Everything is verified: moves (or, from the node cache, links or copies)
/// each file into place and logs it. Returns the files and bytes the node
/// cache served.
fn place_all(
    ctx: &Ctx,
    dest: &Destination,
    files: &[ManifestFile],
    plans: &[Plan],
    placement: Placement,
    placed: &mut BTreeMap<String, PlacedEntry>,
) -> Result<(usize, u64), FetchError> {
    let log_path = &dest.placed_log;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io_err("open", log_path))?;
    let mut first_at: BTreeMap<&str, PathBuf> = BTreeMap::new();
    let (mut cache_hits, mut cache_hit_bytes) = (0, 0);
    for (i, (f, plan)) in files.iter().zip(plans).enumerate() {
        let target = place_path(&dest.dir, f)?;
        if *plan != Plan::Reused {
            if *plan == Plan::CacheHit {
                cache_hits += 1;
                cache_hit_bytes += f.size;
            }
            let tmp = dest.state.join(format!("placing-{i}"));
            let verified_path = ctx.verified_path(&f.sha256);
            if let Some(first) = first_at.get(f.sha256.as_str()) {
                // Same content under a second path.
                link_or_copy(first, &tmp, &target).map_err(io_err("place", &target))?;
            } else if ctx.cache.is_some() && placement == Placement::Copy {
                copy_atomic(&verified_path, &tmp, &target).map_err(io_err("place", &target))?;
            } else if ctx.cache.is_some() {
                link_or_copy(&verified_path, &tmp, &target).map_err(io_err("place", &target))?;
            } else {
                std::fs::rename(&verified_path, &target).map_err(io_err("place", &target))?;
            }
            let meta = std::fs::metadata(&target).map_err(io_err("stat", &target))?;
            let entry = PlacedEntry::of(f, &meta);
            writeln!(log, "{}", entry.line()).map_err(io_err("write", log_path))?;
            placed.insert(f.path.clone(), entry);
        }
        first_at.entry(f.sha256.as_str()).or_insert(target);
    }
    Ok((cache_hits, cache_hit_bytes))
}

/// Removes the files an earlier version placed that this one does not have,
/// and compacts the log of placed files.
fn forget_others(
    dest: &Destination,
    files: &[ManifestFile],
    placed: &mut BTreeMap<String, PlacedEntry>,
) -> Result<(), FetchError> {
    let current: BTreeSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for (path, _) in placed.iter().filter(|(p, _)| !current.contains(p.as_str())) {
        let _ = std::fs::remove_file(dest.dir.join(path));
    }
    placed.retain(|p, _| current.contains(p.as_str()));
    let compact: String = placed.values().map(|e| e.line() + "\n").collect();
    write_atomic(&dest.placed_log, compact.as_bytes()).map_err(io_err("write", &dest.placed_log))
}

/// Writes the local manifest and the completion marker, and records the
/// version in the node cache (evicting down to the quota). Returns the
/// versions evicted.
fn mark_complete(
    ctx: &Ctx,
    dest: &Destination,
    opts: &FetchOptions,
    source_id: &str,
    version_id: &str,
    verified: &VerifiedManifest,
) -> Result<usize, FetchError> {
    if ctx.cache.is_none() {
        // Leftovers: duplicates placed by linking, files of abandoned versions.
        for entry in std::fs::read_dir(&dest.partial)
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let local_manifest = dest.state.join(MANIFEST_NAME);
    write_atomic(&local_manifest, &verified.bytes).map_err(io_err("write", &local_manifest))?;
    let marker = CompleteMarker {
        source: source_id.to_owned(),
        model: opts.model.clone(),
        version: opts.version.clone(),
        manifest_digest: verified.digest.clone(),
        files: verified.manifest.files.len(),
        bytes: verified.total_bytes(),
    };
    write_atomic(
        &dest.marker,
        &serde_json::to_vec_pretty(&marker).expect("markers serialize"),
    )
    .map_err(io_err("write", &dest.marker))?;
    match &ctx.cache {
        Some(cache) => record_version(cache, opts, source_id, version_id, verified),
        None => Ok(0),
    }
}

/// Records a complete version in the node cache and evicts down to the
/// quota; returns the versions evicted.
pub(super) fn record_version(
    cache: &NodeCache,
    opts: &FetchOptions,
    source_id: &str,
    version_id: &str,
    verified: &VerifiedManifest,
) -> Result<usize, FetchError> {
    let record = VersionRecord {
        source: source_id.to_owned(),
        model: opts.model.clone(),
        version: opts.version.clone(),
        manifest_digest: verified.digest.clone(),
    };
    cache.record(version_id, &record, verified)?;
    cache.touch(version_id);
    Ok(match opts.cache_quota {
        Some(quota) => cache.evict(quota, 0, version_id).evicted_versions.len(),
        None => 0,
    })
}

fn summary(
    opts: &FetchOptions,
    dest: &Path,
    verified: &VerifiedManifest,
    started: Instant,
    fill: impl FnOnce(&mut FetchSummary),
) -> FetchSummary {
    let seconds = started.elapsed().as_secs_f64();
    let mut s = FetchSummary {
        model: opts.model.clone(),
        version: opts.version.clone(),
        manifest_digest: verified.digest.clone(),
        dest: dest.into(),
        files: verified.manifest.files.len(),
        bytes: verified.total_bytes(),
        seconds: (seconds * 1000.0).round() / 1000.0,
        ..Default::default()
    };
    s.throughput_mbps = ((s.bytes as f64 / seconds.max(1e-6) / 1e6) * 10.0).round() / 10.0;
    fill(&mut s);
    s
}

pub(super) fn check_space(opts: &FetchOptions, path: &Path, need: u64) -> Result<(), FetchError> {
    let available = available_bytes(path).map_err(io_err("check free space on", path))?;
    if need > available {
        return Err(FetchError::Space {
            model: opts.model.clone(),
            version: opts.version.clone(),
            path: path.into(),
            need: human_bytes(need),
            available: human_bytes(available),
        });
    }
    Ok(())
}

fn same_filesystem(a: &Path, b: &Path) -> bool {
    matches!((std::fs::metadata(a), std::fs::metadata(b)), (Ok(a), Ok(b)) if a.dev() == b.dev())
}

async fn lock_file(path: PathBuf) -> Result<File, FetchError> {
    tokio::task::spawn_blocking(move || {
        let file = super::disk::lock_file(&path).map_err(io_err("open the lock", &path))?;
        file.lock().map_err(io_err("lock", &path))?;
        Ok(file)
    })
    .await
    .expect("lock task panicked")
}

async fn get_manifest(ctx: &Ctx) -> Result<Vec<u8>, FetchError> {
    let engine = &ctx.engine;
    let mut backoff = Backoff::new(engine.max_attempts, engine.deadline)
        .with_base(engine.retry_base, Duration::from_secs(10));
    loop {
        ctx.engine.counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = engine
            .source
            .get_all(
                &ctx.engine.model,
                &ctx.engine.version,
                MANIFEST_NAME,
                manifest::MAX_MANIFEST_BYTES,
            )
            .await;
        match result {
            Ok(bytes) => return Ok(bytes),
            Err(e) if e.failure == Failure::Transient => {
                ctx.engine.counters.retries.fetch_add(1, Ordering::Relaxed);
                match backoff.next_delay() {
                    Some(delay) => {
                        tracing::warn!(url = %e.url, "retrying the manifest: {}", e.detail);
                        tokio::time::sleep(delay).await;
                    }
                    None => {
                        return Err(FetchError::Source {
                            file: MANIFEST_NAME.into(),
                            source: e,
                        });
                    }
                }
            }
            Err(e) => {
                return Err(FetchError::Source {
                    file: MANIFEST_NAME.into(),
                    source: e,
                });
            }
        }
    }
}

/// Download, verify and move to their verified paths every file in `files`.
/// A file whose digest does not match is downloaded once more, then refused.
/// With a node cache: takes each blob's lock (in sha256 order, the same in
/// every fetcher, so that two cannot wait on each other) and leaves out the
/// blobs another fetcher completed meanwhile. Returns the locks, held until
/// the batch is done, and the files still to download.
async fn lock_blobs(
    ctx: &Ctx,
    mut batch: Vec<ManifestFile>,
) -> Result<(Vec<File>, Vec<ManifestFile>), FetchError> {
    let Some(cache) = ctx.cache.clone() else {
        return Ok((Vec::new(), batch));
    };
    batch.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    let (locks, todo, done) = tokio::task::spawn_blocking(move || {
        let mut locks = Vec::new();
        let (mut todo, mut done) = (Vec::new(), 0);
        for f in batch {
            locks.push(cache.lock_blob(&f.sha256)?);
            if cache.has_blob(&f.sha256, f.size) {
                done += f.size;
            } else {
                todo.push(f);
            }
        }
        Ok::<_, NodeCacheError>((locks, todo, done))
    })
    .await
    .expect("lock task panicked")?;
    ctx.engine.counters.total.fetch_sub(done, Ordering::Relaxed);
    Ok((locks, todo))
}

/// Files whose transfers are open at once, at most.
const OPEN_AT_ONCE: usize = 64;

async fn download(
    ctx: &Ctx,
    files: Vec<ManifestFile>,
    resumed: &mut u64,
    observer: &dyn Observer,
) -> Result<(), FetchError> {
    let mut mismatched = BTreeSet::new();
    let mut queue: std::collections::VecDeque<ManifestFile> = files.into();
    while !queue.is_empty() {
        // A transfer holds two files open (data and journal): a version of
        // thousands of files is fetched a batch at a time, so that it fits
        // the container's open-files limit.
        let batch: Vec<ManifestFile> = queue.drain(..queue.len().min(OPEN_AT_ONCE)).collect();
        let (_blob_locks, batch) = lock_blobs(ctx, batch).await?;
        let transfers = batch
            .iter()
            .map(|f| Transfer::open(&ctx.partial_dir, f, ctx.engine.part_size))
            .collect::<Result<Vec<_>, _>>()?;
        for t in &transfers {
            observer.transfer(t);
            *resumed += t.resumed();
            ctx.engine
                .counters
                .total
                .fetch_sub(t.resumed(), Ordering::Relaxed);
        }
        ctx.engine.run(&transfers, ctx.concurrency).await?;
        for t in &transfers {
            let actual = t.digest().await?;
            let f = &t.file;
            if actual == f.sha256 {
                if ctx.cache.is_some() {
                    // The cache outlives pods and reboots: the blob is made
                    // durable before it can be found.
                    t.sync()?;
                }
                match &ctx.cache {
                    Some(cache) => cache.admit(t.partial_path(), &f.sha256)?,
                    None => {
                        let verified = ctx.verified_path(&f.sha256);
                        std::fs::rename(t.partial_path(), &verified)
                            .map_err(io_err("move", &verified))?;
                    }
                }
                t.discard();
                continue;
            }
            t.discard();
            let url = ctx
                .engine
                .source
                .url(&ctx.engine.model, &ctx.engine.version, &f.path);
            if !mismatched.insert(f.sha256.clone()) {
                return Err(FetchError::Integrity {
                    file: f.path.clone(),
                    url,
                    expected: f.sha256.clone(),
                    actual,
                });
            }
            tracing::warn!(file = %f.path, %url, expected = %f.sha256, %actual,
                "digest mismatch; downloading the file once more");
            ctx.engine
                .counters
                .total
                .fetch_add(f.size, Ordering::Relaxed);
            queue.push_back(f.clone());
        }
    }
    Ok(())
}

/// The final path of a file, with its parent directories created, refusing
/// any symlink on the way (it could lead out of the destination).
fn place_path(dest: &Path, f: &ManifestFile) -> Result<PathBuf, FetchError> {
    let mut at = dest.to_path_buf();
    let components: Vec<&str> = f.path.split('/').collect();
    for part in &components[..components.len() - 1] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(FetchError::Escape {
                    file: f.path.clone(),
                    path: at,
                    dest: dest.into(),
                });
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                // A file from an earlier version where a directory goes now.
                std::fs::remove_file(&at).map_err(io_err("remove", &at))?;
                std::fs::create_dir(&at).map_err(io_err("create", &at))?;
            }
            Err(_) => std::fs::create_dir(&at).map_err(io_err("create", &at))?,
        }
    }
    at.push(components[components.len() - 1]);
    Ok(at)
}

/// One line of `placed.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlacedEntry {
    sha256: String,
    size: u64,
    ino: u64,
    mtime_ns: i128,
    path: String,
}

impl PlacedEntry {
    fn of(f: &ManifestFile, meta: &std::fs::Metadata) -> Self {
        PlacedEntry {
            sha256: f.sha256.clone(),
            size: meta.len(),
            ino: meta.ino(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            path: f.path.clone(),
        }
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.sha256, self.size, self.ino, self.mtime_ns, self.path
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let mut it = line.splitn(5, ' ');
        Some(PlacedEntry {
            sha256: it.next()?.into(),
            size: it.next()?.parse().ok()?,
            ino: it.next()?.parse().ok()?,
            mtime_ns: it.next()?.parse().ok()?,
            path: it.next()?.into(),
        })
    }
}

fn read_placed(path: &Path) -> BTreeMap<String, PlacedEntry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(PlacedEntry::parse)
        .filter(|e| manifest::check_path(&e.path).is_ok())
        .map(|e| (e.path.clone(), e))
        .collect()
}

/// The file at its final path is the one placed there, unchanged since
/// (same inode, size and mtime), and has the wanted digest.
fn still_placed(dest: &Path, placed: &BTreeMap<String, PlacedEntry>, f: &ManifestFile) -> bool {
    let Some(entry) = placed.get(&f.path) else {
        return false;
    };
    let Ok(meta) = std::fs::symlink_metadata(dest.join(&f.path)) else {
        return false;
    };
    meta.is_file() && entry.sha256 == f.sha256 && PlacedEntry::of(f, &meta) == *entry
}

fn read_marker(path: &Path) -> Option<CompleteMarker> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The marker of a complete fetch into `dest`, if there is one.
pub fn complete_marker(dest: &Path) -> Option<CompleteMarker> {
    read_marker(&dest.join(STATE_DIR).join("complete"))
}

fn read_local_manifest(state: &Path, digest: &str) -> Option<VerifiedManifest> {
    let bytes = std::fs::read(state.join(MANIFEST_NAME)).ok()?;
    let verified = manifest::parse("the destination", bytes, None).ok()?;
    (verified.digest == digest).then_some(verified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_agent_urls_take_the_host_ip_of_either_family() {
        let url = |s| node_agent_url(s).map(|u| u.to_string());
        assert_eq!(
            url("http://10.0.0.7:8095").as_deref(),
            Some("http://10.0.0.7:8095/")
        );
        assert_eq!(
            url("http://fd00::1:8095").as_deref(),
            Some("http://[fd00::1]:8095/")
        );
        assert_eq!(
            url("http://[fd00::1]:8095").as_deref(),
            Some("http://[fd00::1]:8095/")
        );
        let addr = |s| socket_addr(s).map(|a| a.to_string());
        assert_eq!(addr("10.0.0.7:8095").as_deref(), Some("10.0.0.7:8095"));
        assert_eq!(addr("fd00::1:8095").as_deref(), Some("[fd00::1]:8095"));
        assert_eq!(addr("[fd00::1]:8095").as_deref(), Some("[fd00::1]:8095"));
        assert_eq!(addr("node-1:8095"), None);
        for bad in [
            "ftp://10.0.0.7:8095",
            "10.0.0.7:8095",
            "http://fd00::1",
            "http://:8095",
        ] {
            assert_eq!(url(bad), None, "{bad}");
        }
    }

    #[test]
    fn space_to_finish_counts_what_interrupted_runs_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let file = |sha: &str, size: u64| ManifestFile {
            path: format!("{sha}.bin"),
            size,
            sha256: sha.repeat(64),
        };
        let (a, b) = (file("a", 3 << 20), file("b", 1 << 20));
        // A quarter of `a` was written (at its end: partial files are sparse).
        let partial = std::fs::File::create(dir.path().join(format!("{}.part", a.sha256))).unwrap();
        partial.set_len(3 << 20).unwrap();
        use std::os::unix::fs::FileExt as _;
        partial.write_all_at(&vec![1u8; 1 << 20], 2 << 20).unwrap();
        partial.sync_all().unwrap();
        assert_eq!(to_finish(&[a, b], dir.path()), (2 << 20) + (1 << 20));
    }

    #[test]
    fn placed_entries_round_trip_paths_with_spaces() {
        let e = PlacedEntry {
            sha256: "a".repeat(64),
            size: 5,
            ino: 7,
            mtime_ns: 1_700_000_000_123_456_789,
            path: "dir/a b.bin".into(),
        };
        assert_eq!(PlacedEntry::parse(&e.line()), Some(e));
    }

    #[test]
    fn symlinked_parents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub")).unwrap();
        let f = ManifestFile {
            path: "sub/w.bin".into(),
            size: 1,
            sha256: "a".repeat(64),
        };
        assert!(matches!(
            place_path(dir.path(), &f),
            Err(FetchError::Escape { .. })
        ));
        let g = ManifestFile {
            path: "new/deeper/w.bin".into(),
            ..f
        };
        assert_eq!(
            place_path(dir.path(), &g).unwrap(),
            dir.path().join("new/deeper/w.bin")
        );
        assert!(dir.path().join("new/deeper").is_dir());
    }
}
