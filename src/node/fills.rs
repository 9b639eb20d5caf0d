//! The downloads the agent runs into its node cache: one per version at a
//! time, whoever asked for it. A pod that asks while a version is being
//! downloaded joins that download; N pods starting together on a node cost
//! one origin download.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::metrics::Metrics;
use crate::artifact::fetch::FetchOptions;
use crate::artifact::fill;
use crate::artifact::governor::Concurrency;
use crate::artifact::manifest::VerifiedManifest;
use crate::artifact::node_cache::NodeCache;
use crate::artifact::source::{Location, SourceConfig};
use crate::artifact::transfer::{Observer, Transfer};
use crate::crd::model_cache::ArtifactSource;

/// How the agent downloads from origins.
#[derive(Debug, Clone)]
pub struct FillSettings {
    /// Requests in flight per version.
    pub concurrency: Concurrency,
    /// Bytes the node cache may hold.
    pub quota: Option<u64>,
    /// A version's download must end within this.
    pub deadline: Duration,
    /// Attempts per request.
    pub max_attempts: u32,
}

/// Where a download stands.
#[derive(Debug, Clone, Default)]
struct Progress {
    manifest: Option<VerifiedManifest>,
    /// Transfers opened so far (a change wakes who waits for one).
    opened: usize,
    /// `Some` once the download ended: `Err` holds why it failed.
    ended: Option<Result<(), String>>,
}

/// One version's download, followed by the requests that joined it.
pub struct Fill {
    progress: watch::Sender<Progress>,
    transfers: Mutex<HashMap<String, Arc<Transfer>>>,
}

impl Observer for Fill {
    fn transfer(&self, transfer: &Arc<Transfer>) {
        self.transfers
            .lock()
            .insert(transfer.file.sha256.clone(), transfer.clone());
        self.progress.send_modify(|p| p.opened += 1);
    }
}

impl Fill {
    /// The version's manifest, once the download has it.
    pub async fn manifest(&self) -> Result<VerifiedManifest, String> {
        let mut rx = self.progress.subscribe();
        let p = rx
            .wait_for(|p| p.manifest.is_some() || p.ended.is_some())
            .await
            .map_err(|_| "the download was dropped".to_string())?;
        match (&p.manifest, &p.ended) {
            (Some(m), _) => Ok(m.clone()),
            (None, Some(Err(e))) => Err(e.clone()),
            (None, _) => Err("the download ended without a manifest".into()),
        }
    }

    /// The transfer of the blob `sha256` once it opens; `None` when the
    /// download ended without one (the blob was in the cache already).
    pub async fn transfer(&self, sha256: &str) -> Result<Option<Arc<Transfer>>, String> {
        let mut rx = self.progress.subscribe();
        loop {
            if let Some(t) = self.transfers.lock().get(sha256) {
                return Ok(Some(t.clone()));
            }
            let ended = rx.borrow_and_update().ended.clone();
            match ended {
                Some(Ok(())) => return Ok(None),
                Some(Err(e)) => return Err(e),
                None => {}
            }
            rx.changed()
                .await
                .map_err(|_| "the download was dropped".to_string())?;
        }
    }

    /// Why the download failed, once it did.
    pub fn failure(&self) -> Option<String> {
        match &self.progress.borrow().ended {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// The download ended, and well.
    pub fn succeeded(&self) -> bool {
        matches!(self.progress.borrow().ended, Some(Ok(())))
    }

    /// Bytes written so far, and the version's (its distinct files) once
    /// the manifest is read.
    pub fn bytes(&self) -> (u64, Option<u64>) {
        let written = self
            .transfers
            .lock()
            .values()
            .map(|t| t.written_bytes())
            .sum();
        let total = self.progress.borrow().manifest.as_ref().map(|m| {
            let mut seen = std::collections::BTreeSet::new();
            m.manifest
                .files
                .iter()
                .filter(|f| seen.insert(f.sha256.as_str()))
                .map(|f| f.size)
                .sum()
        });
        (written, total)
    }
}

/// The running downloads of one agent.
pub struct Fills {
    cache: NodeCache,
    settings: FillSettings,
    metrics: Arc<Metrics>,
    running: Mutex<HashMap<String, Arc<Fill>>>,
    measuring: Arc<Mutex<()>>,
}

impl Fills {
    /// Downloads into `cache`.
    pub fn new(cache: NodeCache, settings: FillSettings, metrics: Arc<Metrics>) -> Self {
        Fills {
            cache,
            settings,
            metrics,
            running: Mutex::new(HashMap::new()),
            measuring: Arc::default(),
        }
    }

    /// The download of `model`/`version` from `location`, started if none runs.
    pub fn join(
        self: &Arc<Self>,
        location: &Location,
        source: &ArtifactSource,
        model: &str,
        version: &str,
    ) -> Arc<Fill> {
        let id = NodeCache::version_id(&location.to_string(), model, version);
        let mut running = self.running.lock();
        if let Some(f) = running.get(&id) {
            self.metrics.coalesced.inc();
            return f.clone();
        }
        let fill = Arc::new(Fill {
            progress: watch::Sender::new(Progress::default()),
            transfers: Mutex::new(HashMap::new()),
        });
        running.insert(id.clone(), fill.clone());
        drop(running);
        let opts = self.options(location, source, model, version);
        let (fills, this) = (self.clone(), fill.clone());
        // Its own task: a pod that gives up does not cancel the download the
        // others (and the next pods) are waiting for.
        tokio::spawn(async move {
            let announced = this.clone();
            let on_manifest = move |m: &VerifiedManifest| {
                announced
                    .progress
                    .send_modify(|p| p.manifest = Some(m.clone()));
            };
            let result = fill::fill(&opts, &fills.cache, on_manifest, &*this).await;
            let ended = match result {
                Ok(summary) => {
                    fills.metrics.origin_bytes.inc_by(summary.downloaded_bytes);
                    fills
                        .metrics
                        .evicted_versions
                        .inc_by(summary.evicted_versions as u64);
                    Ok(())
                }
                Err(e) => {
                    let why = crate::error::chain(&e);
                    tracing::warn!(model = %opts.model, version = %opts.version,
                        "failed to fill the node cache: {why}");
                    Err(why)
                }
            };
            fills.measure().await;
            let mut running = fills.running.lock();
            if running.get(&id).is_some_and(|f| Arc::ptr_eq(f, &this)) {
                running.remove(&id);
            }
            drop(running);
            this.progress.send_modify(|p| p.ended = Some(ended));
        });
        fill
    }

    /// The node cache's quota, if any.
    pub fn quota(&self) -> Option<u64> {
        self.settings.quota
    }

    /// Counts versions evicted outside a download (pins released), and
    /// what the cache holds after.
    pub async fn evicted(&self, versions: usize) {
        self.metrics.evicted_versions.inc_by(versions as u64);
        self.measure().await;
    }

    /// Sets `cache_bytes` to what the cache holds. Measuring and setting
    /// under one lock: two downloads ending together would otherwise let the
    /// older measure overwrite the newer.
    pub async fn measure(&self) {
        let (cache, metrics, lock) = (
            self.cache.clone(),
            self.metrics.clone(),
            self.measuring.clone(),
        );
        let _ = tokio::task::spawn_blocking(move || {
            let _one = lock.lock();
            metrics.cache_bytes.set(cache.used_bytes() as i64);
        })
        .await;
    }

    fn options(
        &self,
        location: &Location,
        source: &ArtifactSource,
        model: &str,
        version: &str,
    ) -> FetchOptions {
        // The destination is unused by a fill: the version goes into the cache only.
        let mut opts = FetchOptions::new(location.clone(), model, version, self.cache.root());
        opts.source = SourceConfig {
            endpoint: source.endpoint.clone(),
            region: source.region.clone(),
            path_style: source.path_style,
            ..Default::default()
        };
        opts.concurrency = self.settings.concurrency;
        opts.cache_quota = self.settings.quota;
        opts.deadline = self.settings.deadline;
        opts.max_attempts = self.settings.max_attempts;
        opts
    }
}
