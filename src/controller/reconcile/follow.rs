//! Following a rollout against the live Redis: the version phases (planned by
//! [`crate::controller::rollout`]), the registry that serving pods read, and
//! the background tasks that sweep a retired version's keys or count a
//! draining version's keys. The tasks outlive one reconcile; each later
//! reconcile collects what finished.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::controller::rollout::{RolloutInput, RolloutPlan, plan_rollout};
use crate::crd::ModelCache;
use crate::crd::cache_policy::{
    CachePolicySpec, InvalidationSettings, InvalidationStrategy, SweepPacing,
};
use crate::crd::model_cache::VersionPhase;
use crate::error::chain as error_chain;
use crate::keyspace::registry::{self, Transition};
use crate::keyspace::sweep::{self, Pace, SweepError, SweepReport};
use crate::store::live::{LiveError, RedisTarget};

use super::dereference::{self, namespace};
use super::desired::DesiredResources;
use super::{ReconcileError, namespaced_name};

/// Why a background task over a version's keys failed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum TaskError {
    #[error("failed to connect to Redis")]
    Connect(#[source] LiveError),
    #[error("failed to sweep version {version:?}")]
    Sweep {
        version: String,
        #[source]
        source: SweepError,
    },
    #[error("failed to count the keys of version {version:?}")]
    Count {
        version: String,
        #[source]
        source: SweepError,
    },
}

type Task<T> = JoinHandle<Result<T, TaskError>>;

/// The background tasks of every ModelCache, by `namespace/name/version`.
#[derive(Default)]
pub struct Tasks {
    sweeps: Mutex<HashMap<String, Task<SweepReport>>>,
    counts: Mutex<HashMap<String, Task<u64>>>,
    pins: super::pin::Pins,
}

/// What the rollout is followed against.
pub struct Follow<'a> {
    /// The ModelCache, with the status of the last reconcile.
    pub mc: &'a ModelCache,
    /// Its validated policy.
    pub policy: &'a CachePolicySpec,
    /// Its Redis.
    pub desired: &'a DesiredResources,
}

/// Plans the version phases from the workload's pods, updates the registry,
/// and starts, cancels or collects the sweeps and counts.
pub async fn follow_rollout(
    client: &Client,
    tasks: &Tasks,
    follow: Follow<'_>,
) -> Result<RolloutPlan, ReconcileError> {
    let Follow {
        mc,
        policy,
        desired,
    } = follow;
    let (pods, ready_pods) = match &mc.spec.workload {
        Some(w) => {
            let p = dereference::pods_by_version(client, &namespace(mc), w).await?;
            (p.pods, Some(p.ready))
        }
        None => (BTreeMap::new(), None),
    };
    let prefix = format!("{}/", namespaced_name(mc));
    let finished = tasks.finished_sweeps(&prefix);
    let previous = mc
        .status
        .as_ref()
        .map(|s| s.versions.clone())
        .unwrap_or_default();
    // An external Redis may serve other models: never flush it.
    let strategy = match policy.invalidation.strategy {
        InvalidationStrategy::Flush if !desired.enforce => InvalidationStrategy::VersionKeyed,
        s => s,
    };
    let mut plan = plan_rollout(&RolloutInput {
        desired: &mc.spec.version,
        pods: &pods,
        ready_pods: ready_pods.as_ref(),
        previous: &previous,
        grace_period_seconds: policy.invalidation.grace_period_seconds,
        strategy,
        finished_sweeps: &finished,
        now: Timestamp::now(),
    });
    update_registry(desired, &mc.spec.model, &mc.spec.version, &plan).await;
    let pace = sweep_pace(&policy.invalidation);
    let sweep = SweepJob {
        target: desired.target.clone(),
        model: mc.spec.model.clone(),
        cluster: desired.cluster,
        flush: strategy == InvalidationStrategy::Flush,
        pace,
    };
    tasks.run_sweeps(&prefix, &plan, &sweep);
    tasks.count_draining_keys(&prefix, &mut plan, &sweep);
    tasks.pins.pin(client, mc, &prefix, &mut plan);
    Ok(plan)
}

/// The desired version is active, served versions are live, drained ones are
/// retired. The registry tells serving pods which versions to answer for; a
/// failed write is logged and made again on the next reconcile (a few
/// seconds later while a version moves), since the version phases in status
/// are planned from the pods, not from the registry.
async fn update_registry(
    desired: &DesiredResources,
    model: &str,
    active: &str,
    plan: &RolloutPlan,
) {
    let target = registry_target(desired, model).await;
    let mut conn = match target.connect().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "failed to reach the registry's Redis");
            return;
        }
    };
    let state = match registry::read(&mut conn, model).await {
        Ok(state) => state,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "failed to read the registry");
            return;
        }
    };
    let mut changes = Vec::new();
    if state.active.as_deref() != Some(active) {
        changes.push((active, Transition::Activate));
    }
    for v in &plan.versions {
        let live = v.phase == VersionPhase::Live;
        if live && !state.live.contains(&v.version) {
            changes.push((&v.version, Transition::Live));
        } else if !live && state.live.contains(&v.version) && v.version != active {
            changes.push((&v.version, Transition::Retire));
        }
    }
    for (version, transition) in changes {
        if let Err(e) = registry::transition(&mut conn, model, version, transition).await {
            tracing::warn!(version, ?transition, error = %error_chain(&e), "failed to update the registry");
        }
    }
}

/// On a cluster the registry's keys live on the primary that owns their slot.
async fn registry_target(desired: &DesiredResources, model: &str) -> RedisTarget {
    let target = &desired.target;
    if !desired.cluster {
        return target.clone();
    }
    match sweep::cluster_primaries(target).await {
        Ok(primaries) => sweep::owner(&primaries, &crate::keyspace::keys::registry(model))
            .map(|p| sweep::node_target(target, p))
            .unwrap_or_else(|| target.clone()),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "failed to list the cluster's primaries");
            target.clone()
        }
    }
}

/// The sweeper's pace from the policy (whose schema bounds every field).
fn sweep_pace(settings: &InvalidationSettings) -> Pace {
    let keys_per_second = u64::try_from(settings.sweep_keys_per_second).unwrap_or(1_000_000);
    let batch = u64::try_from(settings.sweep_batch).unwrap_or(100);
    match settings.sweep_pacing {
        SweepPacing::Fixed => Pace::fixed(keys_per_second, batch),
        SweepPacing::Latency => Pace {
            keys_per_second,
            batch,
            headroom_percent: Some(u32::try_from(settings.sweep_headroom_percent).unwrap_or(25)),
        },
    }
}

/// How a version's keys are swept or counted.
#[derive(Clone)]
struct SweepJob {
    target: RedisTarget,
    model: String,
    cluster: bool,
    /// Flush the model's dedicated database instead of deleting by key.
    flush: bool,
    pace: Pace,
}

impl SweepJob {
    async fn sweep(self, version: String) -> Result<SweepReport, TaskError> {
        let failed = |source| TaskError::Sweep {
            version: version.clone(),
            source,
        };
        if self.cluster {
            // Every primary in turn, each with its own checkpoint.
            let report =
                sweep::sweep_cluster_version(&self.target, &self.model, &version, self.pace)
                    .await
                    .map_err(failed)?;
            return Ok(report.total());
        }
        let mut conn = self.target.connect().await.map_err(TaskError::Connect)?;
        if self.flush {
            sweep::flush_model_db(&mut conn, &self.model)
                .await
                .map_err(failed)?;
            return Ok(SweepReport::default());
        }
        // The probe that a latency pace times: a connection of its own.
        let mut probe = self.target.connect().await.map_err(TaskError::Connect)?;
        sweep::sweep_version(
            &mut conn,
            Some(&mut probe),
            &self.model,
            &version,
            self.pace,
        )
        .await
        .map_err(failed)
    }

    async fn count(self, version: String) -> Result<u64, TaskError> {
        let failed = |source| TaskError::Count {
            version: version.clone(),
            source,
        };
        let nodes = if self.cluster {
            let primaries = sweep::cluster_primaries(&self.target)
                .await
                .map_err(failed)?;
            primaries
                .iter()
                .map(|p| sweep::node_target(&self.target, p))
                .collect()
        } else {
            vec![self.target.clone()]
        };
        let mut total = 0;
        for node in nodes {
            let mut conn = node.connect().await.map_err(TaskError::Connect)?;
            total += sweep::count_version(&mut conn, &self.model, &version, 1000)
                .await
                .map_err(failed)?;
        }
        Ok(total)
    }
}

impl Tasks {
    /// Collects this ModelCache's finished sweeps: version → keys deleted.
    /// A failed sweep is logged and started again by `run_sweeps`, from its
    /// checkpoint.
    fn finished_sweeps(&self, prefix: &str) -> BTreeMap<String, u64> {
        let mut sweeps = self.sweeps.lock();
        let done: Vec<String> = sweeps
            .iter()
            .filter(|(k, t)| k.starts_with(prefix) && t.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        let mut finished = BTreeMap::new();
        for key in done {
            let Some(task) = sweeps.remove(&key) else {
                continue;
            };
            let version = key[prefix.len()..].to_string();
            match futures::FutureExt::now_or_never(task) {
                Some(Ok(Ok(report))) => {
                    finished.insert(version, report.deleted + report.deleted_before);
                }
                Some(Ok(Err(e))) => {
                    tracing::warn!(%version, error = %error_chain(&e), "sweep failed; it resumes")
                }
                Some(Err(e)) => {
                    tracing::warn!(%version, error = %e, "sweep task ended; it resumes")
                }
                None => {}
            }
        }
        finished
    }

    /// Exactly one sweep task per Sweeping version: started (or resumed from
    /// its checkpoint after a controller restart), or cancelled by a rollback.
    fn run_sweeps(&self, prefix: &str, plan: &RolloutPlan, job: &SweepJob) {
        let mut sweeps = self.sweeps.lock();
        for v in &plan.cancel_sweeps {
            if let Some(task) = sweeps.remove(&format!("{prefix}{v}")) {
                task.abort();
            }
        }
        for v in plan
            .versions
            .iter()
            .filter(|v| v.phase == VersionPhase::Sweeping)
        {
            let key = format!("{prefix}{}", v.version);
            sweeps
                .entry(key)
                .or_insert_with(|| tokio::spawn(job.clone().sweep(v.version.clone())));
        }
    }

    /// A draining version's key count, taken once in the background (a full
    /// SCAN of its keys, so not on every reconcile) and shown in status until
    /// the sweep reports what it deleted.
    fn count_draining_keys(&self, prefix: &str, plan: &mut RolloutPlan, job: &SweepJob) {
        let mut counts = self.counts.lock();
        for v in plan
            .versions
            .iter_mut()
            .filter(|v| v.phase == VersionPhase::Draining)
        {
            let key = format!("{prefix}{}", v.version);
            match counts.get(&key) {
                Some(task) if task.is_finished() => {
                    let Some(task) = counts.remove(&key) else {
                        continue;
                    };
                    match futures::FutureExt::now_or_never(task) {
                        Some(Ok(Ok(n))) => v.keys = Some(i64::try_from(n).unwrap_or(i64::MAX)),
                        // Counted again on the next reconcile.
                        Some(Ok(Err(e))) => {
                            tracing::warn!(version = %v.version, error = %error_chain(&e), "key count failed")
                        }
                        _ => {}
                    }
                }
                Some(_) => {}
                None if v.keys.is_none() => {
                    let task = tokio::spawn(job.clone().count(v.version.clone()));
                    counts.insert(key, task);
                }
                None => {}
            }
        }
        // Counts of this cache's versions that no longer drain are of no use.
        counts.retain(|k, task| {
            let Some(version) = k.strip_prefix(prefix) else {
                return true; // another ModelCache's
            };
            let draining = plan
                .versions
                .iter()
                .any(|v| v.phase == VersionPhase::Draining && v.version == version);
            if !draining {
                task.abort();
            }
            draining
        });
    }
}
