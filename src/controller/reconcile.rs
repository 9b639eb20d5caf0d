//! One reconcile of a ModelCache, as a fixed sequence: read what it
//! references, validate, build the desired objects (pure), apply them with
//! server-side apply and owner references, bring the running Redis's config
//! in line and read its health, then write status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::cache_policy::{CachePolicySpec, InvalidationStrategy};
use crate::crd::condition::condition_status;
use crate::crd::model_cache::{VersionPhase, WorkloadKind, WorkloadRef};
use crate::crd::{self, CachePolicy, ModelCache};
use crate::keyspace::registry::{self, Transition};
use crate::keyspace::sweep::{self, Pace, SweepReport};
use crate::store::live::{self, Defrag, LiveError, RedisTarget};

use super::rollout::{RolloutInput, RolloutPlan, plan_rollout};

use super::builders::{self, PASSWORD_KEY};
use super::metrics::{ErrorCategory, Metrics, Outcome};
use super::plan::{self, Invalid, RedisPlan};
use super::status::{self, CONFIG_APPLIED, FRAGMENTED, Observation, READY, SPEC_VALID};
use crate::error::chain as error_chain;

/// Field manager for every object the controller applies.
pub const MANAGER: &str = "modelcache-controller";
/// How soon to look again at a Redis that is not ready yet (starting pod).
const NOT_READY_REQUEUE: Duration = Duration::from_secs(10);
/// How soon to look again while a version drains or is swept.
const ROLLOUT_REQUEUE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("failed to {action} {kind} {namespace}/{name}")]
    Kube {
        action: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("failed to generate a Redis password")]
    Random,
}

impl ReconcileError {
    pub fn category(&self) -> ErrorCategory {
        ErrorCategory::KubeApi
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// How often a healthy cache is checked again (config drift, INFO).
    pub health_interval: Duration,
    /// Address used instead of the in-cluster Service of a provisioned Redis:
    /// for a controller run outside the cluster, and for tests.
    pub redis_url_override: Option<String>,
    /// Consecutive failures per object, for per-object backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Running sweeps, by `namespace/name/version`.
    sweeps: Mutex<HashMap<String, SweepTask>>,
    /// Running key counts of draining versions, by `namespace/name/version`.
    counts: Mutex<HashMap<String, CountTask>>,
}

type CountTask = tokio::task::JoinHandle<Result<u64, String>>;

type SweepTask = tokio::task::JoinHandle<Result<SweepReport, String>>;

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        health_interval: Duration,
    ) -> Self {
        Context {
            client,
            metrics,
            recorder,
            health_interval,
            redis_url_override: None,
            failures: Mutex::new(HashMap::new()),
            sweeps: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
        }
    }
}

/// `namespace/name`, as the ModelCache is named in logs and in the per-object maps.
fn namespaced_name(mc: &ModelCache) -> String {
    format!("{}/{}", mc.namespace().unwrap_or_default(), mc.name_any())
}

/// Reconciles one ModelCache; see the module docs for the sequence.
pub async fn reconcile(mc: Arc<ModelCache>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_steps(&mc, &ctx).await;
    let seconds = started.elapsed().as_secs_f64();
    match &result {
        Ok((outcome, _)) => {
            ctx.metrics.reconciled(*outcome, seconds);
            ctx.failures.lock().remove(&namespaced_name(&mc));
        }
        Err(e) => {
            ctx.metrics.reconciled(Outcome::Error, seconds);
            ctx.metrics.error(e.category());
        }
    }
    result.map(|(_, action)| action)
}

/// Temporary errors requeue with a per-object exponential backoff: 5 s,
/// doubling, at most 5 minutes.
pub fn error_policy(mc: Arc<ModelCache>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock();
    let n = failures.entry(namespaced_name(&mc)).or_insert(0);
    *n = n.saturating_add(1);
    let delay = backoff(*n);
    tracing::warn!(modelcache = %namespaced_name(&mc), error = %error_chain(error), retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

fn kube_error(
    action: &'static str,
    kind: &'static str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> ReconcileError {
    let (namespace, name) = (namespace.to_owned(), name.to_owned());
    move |source| ReconcileError::Kube {
        action,
        kind,
        namespace,
        name,
        source: Box::new(source),
    }
}

async fn reconcile_steps(
    mc: &ModelCache,
    ctx: &Context,
) -> Result<(Outcome, Action), ReconcileError> {
    let namespace = mc.namespace().unwrap_or_else(|| "default".into());
    let name = mc.name_any();
    let client = ctx.client.clone();

    // 1. Read what is referenced.
    let policy = match &mc.spec.cache_policy_ref {
        None => Ok(None),
        Some(r) => Api::<CachePolicy>::namespaced(client.clone(), &namespace)
            .get_opt(&r.name)
            .await
            .map_err(kube_error("read", "CachePolicy", &namespace, &r.name))?
            .map(|p| Some(p.spec))
            .ok_or_else(|| r.name.clone()),
    };

    // 2. Validate.
    let plan = match plan::plan(mc, policy) {
        Ok(plan) => plan,
        Err(invalid) => return invalid_spec(mc, ctx, invalid).await,
    };

    // 3 and 4. Build the desired objects and apply them.
    if let Some(prompts) = builders::warmup_config_map(mc) {
        apply(&client, &namespace, &prompts, "ConfigMap").await?;
    }
    let threshold = plan.policy.fragmentation_threshold;
    let (target, desired, enforce) = match &plan.redis {
        RedisPlan::Provisioned(settings) => {
            let secret = match ensure_secret(mc, &client, &namespace).await? {
                Ok(secret) => secret,
                Err(invalid) => return invalid_spec(mc, ctx, invalid).await,
            };
            apply(
                &client,
                &namespace,
                &builders::config_map(mc, settings),
                "ConfigMap",
            )
            .await?;
            apply(
                &client,
                &namespace,
                &builders::stateful_set(mc, settings, &secret.uid),
                "StatefulSet",
            )
            .await?;
            apply(&client, &namespace, &builders::service(mc), "Service").await?;
            let url = ctx
                .redis_url_override
                .clone()
                .unwrap_or_else(|| builders::service_url(mc));
            let target = RedisTarget {
                url,
                username: None,
                password: Some(secret.password),
            };
            (
                target,
                crate::store::settings::desired_config(settings),
                true,
            )
        }
        RedisPlan::External { redis, desired } => {
            let password = match &redis.password_secret_ref {
                None => None,
                Some(r) => match read_secret_key(&client, &namespace, &r.name, &r.key).await? {
                    Some(p) => Some(p),
                    None => {
                        let invalid = Invalid {
                            reason: "SecretNotFound",
                            message: format!(
                                "Secret {:?} with key {:?} does not exist in namespace {namespace}: \
                                 create it, or fix spec.redis.external.passwordSecretRef",
                                r.name, r.key
                            ),
                        };
                        return invalid_spec(mc, ctx, invalid).await;
                    }
                },
            };
            let target = RedisTarget {
                url: redis.url.clone(),
                username: redis.username.clone(),
                password,
            };
            (target, desired.clone(), false)
        }
    };

    // 5. Live config and health, then the rollout.
    let mut obs = observe(&target, &desired, enforce, threshold).await;
    let mut rollout = None;
    if obs.unreachable.is_none() {
        let cluster = matches!(&plan.redis, RedisPlan::External { redis, .. } if redis.cluster);
        match follow_rollout(mc, ctx, &namespace, &target, &plan.policy, enforce, cluster).await? {
            Ok(r) => {
                obs.rollout = Some((r.versions.clone(), Some(mc.spec.version.clone())));
                rollout = Some(r);
            }
            Err(invalid) => return invalid_spec(mc, ctx, invalid).await,
        }
    }
    let in_motion = rollout.as_ref().is_some_and(RolloutPlan::in_motion);
    if obs.command_failed {
        ctx.metrics.error(ErrorCategory::RedisCommand);
    } else if obs.unreachable.is_some() {
        ctx.metrics.error(ErrorCategory::RedisUnavailable);
    }

    // 6. Status, metrics and Events.
    let new_status = write_status(mc, ctx, &obs).await?;
    let ready = condition_status(&new_status.conditions, READY) == Some("True");
    let drift = obs
        .config
        .as_ref()
        .map(|c| c.still_differs.len())
        .unwrap_or(0);
    ctx.metrics
        .cache(&namespace, &name, ready, drift, obs.info.as_ref());
    announce(mc, ctx, &new_status, &obs).await;
    if let Some(r) = &rollout {
        announce_rollout(mc, ctx, r).await;
    }
    let again = if in_motion {
        ctx.health_interval.min(ROLLOUT_REQUEUE)
    } else if ready {
        ctx.health_interval
    } else {
        NOT_READY_REQUEUE
    };
    Ok((Outcome::Ok, Action::requeue(again)))
}

/// An invalid spec: say so in status and in an Event, then wait for a change.
async fn invalid_spec(
    mc: &ModelCache,
    ctx: &Context,
    invalid: Invalid,
) -> Result<(Outcome, Action), ReconcileError> {
    ctx.metrics.error(ErrorCategory::InvalidSpec);
    let obs = Observation {
        invalid: Some(invalid),
        ..Default::default()
    };
    let new_status = write_status(mc, ctx, &obs).await?;
    announce(mc, ctx, &new_status, &obs).await;
    Ok((Outcome::Invalid, Action::await_change()))
}

struct RedisSecret {
    password: String,
    uid: String,
}

/// Reads the generated Secret, or creates it once with a new password.
/// It is never applied again, so the password is never rotated by accident.
async fn ensure_secret(
    mc: &ModelCache,
    client: &Client,
    namespace: &str,
) -> Result<Result<RedisSecret, Invalid>, ReconcileError> {
    let name = builders::names(mc).redis;
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(kube_error("read", "Secret", namespace, &name))?;
    let secret = match existing {
        Some(s) => s,
        None => {
            let password = generate_password()?;
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            match api.create(&params, &builders::secret(mc, &password)).await {
                Ok(s) => s,
                // Another reconcile created it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => api
                    .get(&name)
                    .await
                    .map_err(kube_error("read", "Secret", namespace, &name))?,
                Err(e) => return Err(kube_error("create", "Secret", namespace, &name)(e)),
            }
        }
    };
    let password = secret
        .data
        .as_ref()
        .and_then(|d| d.get(PASSWORD_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok());
    Ok(match password {
        Some(password) => Ok(RedisSecret {
            password,
            uid: secret.uid().unwrap_or_default(),
        }),
        None => Err(Invalid {
            reason: "SecretInvalid",
            message: format!(
                "Secret {name:?} has no {PASSWORD_KEY:?} key: delete it, and the controller \
                 creates a new one (the Redis pod restarts with the new password)"
            ),
        }),
    })
}

async fn read_secret_key(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Option<String>, ReconcileError> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(kube_error("read", "Secret", namespace, name))?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|d| d.get(key).cloned())
        .and_then(|b| String::from_utf8(b.0).ok()))
}

fn generate_password() -> Result<String, ReconcileError> {
    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| ReconcileError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Server-side apply with the controller's field manager. `force` takes over
/// fields another manager set by hand: the controller owns these objects.
async fn apply<K>(
    client: &Client,
    namespace: &str,
    obj: &K,
    kind: &'static str,
) -> Result<K, ReconcileError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(kube_error("apply", kind, namespace, &name))
}

/// Talks to Redis: config (set only where it differs, when we own it),
/// INFO, and active defragmentation when fragmented.
pub async fn observe(
    target: &RedisTarget,
    desired: &BTreeMap<String, String>,
    enforce: bool,
    fragmentation_threshold: f64,
) -> Observation {
    let mut obs = Observation {
        endpoint: Some(target.url.clone()),
        fragmentation_threshold,
        ..Default::default()
    };
    let endpoint = target.url.as_str();
    let mut conn = match target.connect().await {
        Ok(c) => c,
        Err(e) => {
            obs.unreachable = Some(error_chain(&e));
            return obs;
        }
    };
    match live::reconcile_config(&mut conn, endpoint, desired, enforce).await {
        Ok(outcome) => obs.config = Some(outcome),
        Err(e @ LiveError::ConfigForbidden { .. }) => obs.config_unreadable = Some(error_chain(&e)),
        Err(e) => {
            obs.command_failed = !e.is_temporary() || matches!(e, LiveError::Command { .. });
            obs.unreachable = Some(error_chain(&e));
            return obs;
        }
    }
    match live::read_info(&mut conn, endpoint).await {
        Ok(info) => obs.info = Some(info),
        Err(e) => {
            obs.command_failed = true;
            obs.unreachable = Some(error_chain(&e));
            return obs;
        }
    }
    if enforce && obs.fragmented() {
        obs.defrag = Some(
            live::enable_active_defrag(&mut conn, endpoint)
                .await
                .unwrap_or_else(|e| Defrag::Unsupported(error_chain(&e))),
        );
    }
    obs
}

/// Pods serving each version, and those of them that are ready, from the
/// workload's pods; `Err(Invalid)` when the named workload does not exist.
async fn pods_by_version(
    client: &Client,
    namespace: &str,
    workload: &WorkloadRef,
) -> Result<Result<PodsByVersion, Invalid>, ReconcileError> {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ListParams;

    let selector = match (&workload.name, &workload.selector) {
        (Some(name), _) => {
            let kind = workload.kind.unwrap_or_default();
            let selector = match kind {
                WorkloadKind::Deployment => {
                    Api::<Deployment>::namespaced(client.clone(), namespace)
                        .get_opt(name)
                        .await
                        .map_err(kube_error("read", "Deployment", namespace, name))?
                        .map(|d| d.spec.selector)
                }
                WorkloadKind::StatefulSet => {
                    Api::<StatefulSet>::namespaced(client.clone(), namespace)
                        .get_opt(name)
                        .await
                        .map_err(kube_error("read", "StatefulSet", namespace, name))?
                        .map(|s| s.spec.selector)
                }
            };
            match selector {
                Some(s) => s,
                None => {
                    return Ok(Err(Invalid {
                        reason: "WorkloadNotFound",
                        message: format!(
                            "{kind:?} {name:?} does not exist in namespace {namespace}: create it, or fix \
                             spec.workload; until then no version is retired"
                        ),
                    }));
                }
            }
        }
        (None, Some(selector)) => selector.clone(),
        (None, None) => return Ok(Ok(PodsByVersion::default())),
    };
    let selector = label_selector(&selector);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_error("list", "Pods", namespace, &selector))?;
    let mut versions = PodsByVersion::default();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let label = &workload.version_label;
        let version = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(label))
            .or_else(|| pod.metadata.annotations.as_ref().and_then(|a| a.get(label)));
        if let Some(v) = version {
            *versions.pods.entry(v.clone()).or_insert(0) += 1;
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            *versions.ready.entry(v.clone()).or_insert(0) += i32::from(ready);
        }
    }
    Ok(Ok(versions))
}

/// Pods of each version, and the ready ones among them (the others are
/// still fetching weights or warming, or failing).
#[derive(Debug, Default)]
struct PodsByVersion {
    pods: BTreeMap<String, i32>,
    ready: BTreeMap<String, i32>,
}

/// A label selector in the API's query syntax.
pub fn label_selector(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

/// Follows the rollout: version phases, the registry, and the sweeps.
async fn follow_rollout(
    mc: &ModelCache,
    ctx: &Context,
    namespace: &str,
    target: &RedisTarget,
    policy: &CachePolicySpec,
    owned_redis: bool,
    cluster: bool,
) -> Result<Result<RolloutPlan, Invalid>, ReconcileError> {
    let client = &ctx.client;
    let (pods, ready_pods) = match &mc.spec.workload {
        Some(w) => match pods_by_version(client, namespace, w).await? {
            Ok(p) => (p.pods, Some(p.ready)),
            Err(invalid) => return Ok(Err(invalid)),
        },
        None => (BTreeMap::new(), None),
    };
    let prefix = format!("{}/", namespaced_name(mc));
    let mut finished = BTreeMap::new();
    {
        let mut sweeps = ctx.sweeps.lock();
        let done: Vec<String> = sweeps
            .iter()
            .filter(|(k, t)| k.starts_with(&prefix) && t.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            let task = sweeps.remove(&k).expect("listed");
            let version = k[prefix.len()..].to_string();
            match futures::FutureExt::now_or_never(task) {
                Some(Ok(Ok(report))) => {
                    finished.insert(version, report.deleted + report.deleted_before);
                }
                // A failed sweep is started again below, from its checkpoint.
                Some(Ok(Err(e))) => {
                    tracing::warn!(modelcache = %namespaced_name(mc), version = %version, error = %e, "sweep failed; it resumes")
                }
                _ => {}
            }
        }
    }
    let previous = mc
        .status
        .as_ref()
        .map(|s| s.versions.clone())
        .unwrap_or_default();
    // An external Redis may serve other models: never flush it.
    let strategy = match policy.invalidation.strategy {
        InvalidationStrategy::Flush if !owned_redis => InvalidationStrategy::VersionKeyed,
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

    // The registry: the desired version is active, served versions are live,
    // drained ones are retired.
    let model = &mc.spec.model;
    // On a cluster the registry's keys live on the primary that owns their slot.
    let registry_target = if cluster {
        match sweep::cluster_primaries(target).await {
            Ok(primaries) => sweep::owner(&primaries, &crate::keyspace::keys::registry(model))
                .map(|p| sweep::node_target(target, p))
                .unwrap_or_else(|| target.clone()),
            Err(e) => {
                tracing::warn!(modelcache = %namespaced_name(mc), error = %error_chain(&e), "failed to list the cluster's primaries");
                target.clone()
            }
        }
    } else {
        target.clone()
    };
    if let Ok(mut conn) = registry_target.connect().await {
        match registry::read(&mut conn, model).await {
            Ok(state) => {
                if state.active.as_deref() != Some(mc.spec.version.as_str()) {
                    let _ = registry::transition(
                        &mut conn,
                        model,
                        &mc.spec.version,
                        Transition::Activate,
                    )
                    .await;
                }
                for v in &plan.versions {
                    let live = v.phase == VersionPhase::Live;
                    if live && !state.live.contains(&v.version) {
                        let _ =
                            registry::transition(&mut conn, model, &v.version, Transition::Live)
                                .await;
                    } else if !live
                        && state.live.contains(&v.version)
                        && v.version != mc.spec.version
                    {
                        let _ =
                            registry::transition(&mut conn, model, &v.version, Transition::Retire)
                                .await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(modelcache = %namespaced_name(mc), error = %error_chain(&e), "failed to read the registry")
            }
        }
    }

    // Exactly one sweep task per Sweeping version: started (or resumed from
    // its checkpoint after a controller restart), or cancelled by a rollback.
    let mut sweeps = ctx.sweeps.lock();
    for v in &plan.cancel_sweeps {
        if let Some(task) = sweeps.remove(&format!("{prefix}{v}")) {
            task.abort();
        }
    }
    let pace = Pace {
        keys_per_second: u64::try_from(policy.invalidation.sweep_keys_per_second)
            .unwrap_or(100_000),
        batch: u64::try_from(policy.invalidation.sweep_batch).unwrap_or(1000),
    };
    for v in plan
        .versions
        .iter()
        .filter(|v| v.phase == VersionPhase::Sweeping)
    {
        let task_key = format!("{prefix}{}", v.version);
        if sweeps.contains_key(&task_key) {
            continue;
        }
        let (target, model, version) = (target.clone(), model.clone(), v.version.clone());
        let flush = strategy == InvalidationStrategy::Flush;
        sweeps.insert(
            task_key,
            tokio::spawn(async move {
                if cluster {
                    // Every primary in turn, each with its own checkpoint.
                    let report = sweep::sweep_cluster_version(&target, &model, &version, pace)
                        .await
                        .map_err(|e| error_chain(&e))?;
                    return Ok(report.total());
                }
                let mut conn = target.connect().await.map_err(|e| error_chain(&e))?;
                if flush {
                    sweep::flush_model_db(&mut conn, &model)
                        .await
                        .map_err(|e| error_chain(&e))?;
                    return Ok(SweepReport::default());
                }
                sweep::sweep_version(&mut conn, &model, &version, pace)
                    .await
                    .map_err(|e| error_chain(&e))
            }),
        );
    }
    drop(sweeps);
    count_draining_keys(ctx, &prefix, &mut plan, target, model, cluster);
    Ok(Ok(plan))
}

/// A draining version's key count, taken once in the background (a full
/// SCAN of its keys, so not on every reconcile) and shown in status until the
/// sweep reports what it deleted.
fn count_draining_keys(
    ctx: &Context,
    prefix: &str,
    plan: &mut RolloutPlan,
    target: &RedisTarget,
    model: &str,
    cluster: bool,
) {
    let mut counts = ctx.counts.lock();
    for v in plan
        .versions
        .iter_mut()
        .filter(|v| v.phase == VersionPhase::Draining)
    {
        let task_key = format!("{prefix}{}", v.version);
        match counts.get(&task_key) {
            Some(task) if task.is_finished() => {
                let task = counts.remove(&task_key).expect("present");
                if let Some(Ok(Ok(n))) = futures::FutureExt::now_or_never(task) {
                    v.keys = Some(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            Some(_) => {}
            None if v.keys.is_none() => {
                let (target, model, version) =
                    (target.clone(), model.to_owned(), v.version.clone());
                counts.insert(
                    task_key,
                    tokio::spawn(async move {
                        let nodes = if cluster {
                            let primaries = sweep::cluster_primaries(&target)
                                .await
                                .map_err(|e| error_chain(&e))?;
                            primaries
                                .iter()
                                .map(|p| sweep::node_target(&target, p))
                                .collect()
                        } else {
                            vec![target]
                        };
                        let mut total = 0;
                        for node in nodes {
                            let mut conn = node.connect().await.map_err(|e| error_chain(&e))?;
                            total += sweep::count_version(&mut conn, &model, &version, 1000)
                                .await
                                .map_err(|e| error_chain(&e))?;
                        }
                        Ok(total)
                    }),
                );
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

/// Events for version phase changes.
async fn announce_rollout(mc: &ModelCache, ctx: &Context, plan: &RolloutPlan) {
    let reference = mc.object_ref(&());
    for (version, from, to) in &plan.transitions {
        let (reason, note) = match (from, to) {
            (None, VersionPhase::Live) => ("VersionLive", format!("version {version} is served")),
            (Some(VersionPhase::Draining | VersionPhase::Sweeping), VersionPhase::Live) => (
                "SweepCancelled",
                format!("version {version} is served again (a rollback); its sweep is cancelled"),
            ),
            (_, VersionPhase::Live) => ("VersionLive", format!("version {version} is served")),
            (_, VersionPhase::Draining) => (
                "VersionDraining",
                format!(
                    "no pod serves version {version}; its keys are swept after the grace period"
                ),
            ),
            (_, VersionPhase::Sweeping) => (
                "SweepStarted",
                format!("sweeping the keys of version {version}"),
            ),
            (_, VersionPhase::Swept) => {
                let keys = plan
                    .versions
                    .iter()
                    .find(|v| &v.version == version)
                    .and_then(|v| v.keys)
                    .map(|k| format!("{k} keys"))
                    .unwrap_or_else(|| "keys left to expire".into());
                ("VersionSwept", format!("version {version} swept: {keys}"))
            }
        };
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Rollout".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(modelcache = %namespaced_name(mc), error = %e, "failed to publish an Event");
        }
    }
}

async fn write_status(
    mc: &ModelCache,
    ctx: &Context,
    obs: &Observation,
) -> Result<crd::ModelCacheStatus, ReconcileError> {
    let namespace = mc.namespace().unwrap_or_else(|| "default".into());
    let name = mc.name_any();
    let now = Time(Timestamp::now());
    let new_status =
        status::model_cache_status(mc.status.as_ref(), mc.metadata.generation, obs, now);
    let patch = serde_json::json!({
        "apiVersion": crd::API_VERSION,
        "kind": "ModelCache",
        "status": new_status,
    });
    Api::<ModelCache>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_error(
            "write status of",
            "ModelCache",
            &namespace,
            &name,
        ))?;
    Ok(new_status)
}

/// Events for what an operator must know: transitions, not every reconcile.
async fn announce(mc: &ModelCache, ctx: &Context, new: &crd::ModelCacheStatus, obs: &Observation) {
    let old = mc
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let changed = |t: &str, to: &str| {
        condition_status(old, t) != Some(to) && condition_status(&new.conditions, t) == Some(to)
    };
    let message = |t: &str| {
        new.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    };
    let mut events = Vec::new();
    if changed(SPEC_VALID, "False") {
        let (reason, note) = message(SPEC_VALID);
        events.push((EventType::Warning, reason, note));
    }
    if changed(READY, "True") {
        events.push((EventType::Normal, "RedisReady".into(), message(READY).1));
    }
    if condition_status(old, READY) == Some("True") && changed(READY, "False") {
        let (reason, note) = message(READY);
        events.push((EventType::Warning, reason, note));
    }
    if let Some(config) = &obs.config
        && !config.changed.is_empty()
    {
        events.push((
            EventType::Normal,
            "ConfigApplied".into(),
            format!("CONFIG SET {}", config.changed.join(", ")),
        ));
    }
    if changed(FRAGMENTED, "True") {
        events.push((
            EventType::Warning,
            "Fragmented".into(),
            message(FRAGMENTED).1,
        ));
    }
    if changed(CONFIG_APPLIED, "False") {
        events.push((
            EventType::Warning,
            "ConfigDrift".into(),
            message(CONFIG_APPLIED).1,
        ));
    }
    let reference = mc.object_ref(&());
    for (type_, reason, note) in events {
        let event = Event {
            type_,
            reason,
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            // Events are best effort: status already says the same.
            tracing::warn!(modelcache = %namespaced_name(mc), error = %e, "failed to publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn passwords_are_random_hex() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 48);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
