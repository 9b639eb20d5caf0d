//! One reconcile of a ModelCache, in stages after the Stackable operators:
//!
//! 1. [`dereference`]: read what it names (its CachePolicy; then the Secret
//!    with its Redis password, created once for a provisioned Redis);
//! 2. [`validate`](crate::controller::validate): pure; an invalid spec is
//!    [`ReconcileError::Invalid`], written to status, and waits for a change;
//! 3. [`desired`]: pure, one [`DesiredResources`](desired::DesiredResources) value;
//! 4. [`apply`]: server-side apply with owner references, in one place, to
//!    objects that are absent or [`ownership`] shows are ours;
//! 5. [`observe`] the Redis (config brought in line, INFO) and [`follow`]
//!    the rollout (version phases, registry, sweeps);
//! 6. status, metrics and [`events`].

pub mod apply;
pub mod dereference;
pub mod desired;
pub mod events;
pub mod follow;
pub mod observe;
pub mod ownership;
pub mod pin;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use parking_lot::Mutex;

use crate::crd::ModelCache;
use crate::crd::condition::condition_status;
use crate::crd::model_cache::GatewayMode;
use crate::error::chain as error_chain;

use super::metrics::{ErrorCategory, Metrics, Outcome};
use super::status::{Observation, READY};
use super::validate::{self, Invalid, RedisBackend};
pub use observe::observe;

/// Field manager for every object the controller applies.
pub const MANAGER: &str = "modelcache-controller";
/// How soon to look again at a Redis that is not ready yet (starting pod).
const NOT_READY_REQUEUE: Duration = Duration::from_secs(10);
/// How soon to look again while a version drains or is swept.
const ROLLOUT_REQUEUE: Duration = Duration::from_secs(5);

/// Why a reconcile did not complete.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
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
    /// Retrying cannot fix it: the spec (or what it names) must change.
    #[error("failed to reconcile an invalid spec ({}): {}", .0.reason, .0.message)]
    Invalid(Invalid),
}

impl From<Invalid> for ReconcileError {
    fn from(invalid: Invalid) -> Self {
        ReconcileError::Invalid(invalid)
    }
}

impl ReconcileError {
    /// The bounded metric label of this error.
    pub fn category(&self) -> ErrorCategory {
        match self {
            ReconcileError::Kube { .. } => ErrorCategory::KubeApi,
            ReconcileError::Random => ErrorCategory::Internal,
            ReconcileError::Invalid(_) => ErrorCategory::InvalidSpec,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The API server.
    pub client: Client,
    /// The controller's metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Events on ModelCaches.
    pub recorder: Recorder,
    /// How often a healthy cache is checked again (config drift, INFO).
    pub health_interval: Duration,
    /// Address used instead of the in-cluster Service of a provisioned Redis:
    /// for a controller run outside the cluster, and for tests.
    pub redis_url_override: Option<String>,
    /// The controller's own namespace, which a Redis's NetworkPolicy admits
    /// the controller from; `None` admits its pods from any namespace.
    pub controller_namespace: Option<String>,
    /// The modelcache image, which standalone gateways run.
    pub image: Option<String>,
    /// Where the node cache agents run, whose prefetches reach status.
    pub node_agents: Option<crate::controller::prefetch::NodeAgents>,
    /// Consecutive failures per object, for per-object backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Running sweeps and key counts of retired versions.
    tasks: follow::Tasks,
}

impl Context {
    /// A context with no failures and no tasks yet.
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
            controller_namespace: None,
            image: None,
            node_agents: None,
            failures: Mutex::new(HashMap::new()),
            tasks: follow::Tasks::default(),
        }
    }
}

/// `namespace/name`, as the ModelCache is named in logs and in the per-object maps.
fn namespaced_name(mc: &ModelCache) -> String {
    format!("{}/{}", mc.namespace().unwrap_or_default(), mc.name_any())
}

/// Reconciles one ModelCache; see the module docs for the stages. An invalid
/// spec is not an error to the runtime: its condition is written and the
/// ModelCache waits for a change, as [`error_policy`] would have it wait.
#[tracing::instrument(name = "reconcile", skip_all, fields(modelcache = %namespaced_name(&mc)))]
pub async fn reconcile(mc: Arc<ModelCache>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = match stages(&mc, &ctx).await {
        Err(ReconcileError::Invalid(invalid)) => invalid_spec(&mc, &ctx, invalid).await,
        other => other.map(|action| (Outcome::Ok, action)),
    };
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

/// An invalid spec waits for a change. Temporary errors requeue with a
/// per-object exponential backoff: 5 s, doubling, at most 5 minutes.
pub fn error_policy(mc: Arc<ModelCache>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    if let ReconcileError::Invalid(_) = error {
        return Action::await_change();
    }
    let mut failures = ctx.failures.lock();
    let n = failures.entry(namespaced_name(&mc)).or_insert(0);
    *n = n.saturating_add(1);
    let delay = backoff(*n);
    tracing::warn!(modelcache = %namespaced_name(&mc), error = %error_chain(error), retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// The delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

/// Maps a failed API request to [`ReconcileError::Kube`], naming the object.
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

async fn stages(mc: &ModelCache, ctx: &Context) -> Result<Action, ReconcileError> {
    let client = &ctx.client;
    let namespace = dereference::namespace(mc);

    let policy = dereference::policy(client, mc).await?;
    let spec = validate::validate(mc, policy)?;
    let credentials = dereference::credentials(client, mc, &spec.redis).await?;
    let clients = match &spec.redis {
        RedisBackend::Provisioned(_) => dereference::client_selector(client, mc).await?,
        RedisBackend::External { .. } => None,
    };
    if let Some(gateway) = &mc.spec.gateway {
        if gateway.mode == GatewayMode::Standalone && ctx.image.is_none() {
            return Err(ReconcileError::Invalid(Invalid {
                reason: "GatewayImageUnknown",
                message: "spec.gateway.mode Standalone runs the modelcache image, which this \
                          controller was not given: run it with --image (MODELCACHE_IMAGE; the \
                          chart sets it)"
                    .into(),
            }));
        }
        dereference::gateway_secret(client, mc).await?;
    }
    let surroundings = desired::Surroundings {
        redis_url_override: ctx.redis_url_override.as_deref(),
        controller_namespace: ctx.controller_namespace.as_deref(),
        clients: clients.as_ref(),
        image: ctx.image.as_deref(),
    };
    let desired = desired::build(mc, &spec, &credentials, surroundings);
    let gateway_ready = apply::apply_all(client, mc, &desired).await?;

    let threshold = spec.policy.fragmentation_threshold;
    let gateway_model = mc.spec.gateway.as_ref().map(|_| mc.spec.model.as_str());
    let mut obs = observe(
        &desired.target,
        &desired.config,
        desired.enforce,
        threshold,
        gateway_model,
    )
    .await;
    if let Some(gateway) = &mut obs.gateway {
        gateway.ready_replicas = gateway_ready;
        gateway.endpoint = crate::controller::gateway::endpoint(mc);
    }
    let rollout = match obs.unreachable {
        Some(_) => None,
        None => {
            let follow = follow::Follow {
                mc,
                policy: &spec.policy,
                desired: &desired,
            };
            let plan = follow::follow_rollout(client, &ctx.tasks, follow).await?;
            obs.rollout = Some((plan.versions.clone(), Some(mc.spec.version.clone())));
            Some(plan)
        }
    };
    if let Some(prefetch) = &mc.spec.prefetch {
        use crate::controller::prefetch;
        let mut status = match &ctx.node_agents {
            Some(agents) => prefetch::observe(client, agents, mc).await,
            // No agents known: nothing to report but where they should pull.
            None => prefetch::summarize(mc, &[]),
        };
        // The agents match the workload's placement when the spec names no nodes.
        if prefetch.node_selector.is_empty() {
            (status.node_selector, status.node_affinity) =
                dereference::placement(client, mc).await?;
        }
        obs.prefetch = Some(status);
    }
    if obs.command_failed {
        ctx.metrics.error(ErrorCategory::RedisCommand);
    } else if obs.unreachable.is_some() {
        ctx.metrics.error(ErrorCategory::RedisUnavailable);
    }

    let new_status = apply::write_status(client, mc, &obs).await?;
    let ready = condition_status(&new_status.conditions, READY) == Some("True");
    let drift = obs.config.as_ref().map_or(0, |c| c.still_differs.len());
    let info = obs.info.as_ref();
    ctx.metrics
        .cache(&namespace, &mc.name_any(), ready, drift, info);
    let mut announced = events::status_events(mc.status.as_ref(), &new_status, &obs);
    if let Some(plan) = &rollout {
        announced.extend(events::rollout_events(plan));
    }
    events::publish(&ctx.recorder, mc, announced).await;

    let prefetching = obs.prefetch.as_ref().is_some_and(|p| p.ready < p.total);
    let in_motion = prefetching || rollout.as_ref().is_some_and(|p| p.in_motion());
    let again = if in_motion {
        ctx.health_interval.min(ROLLOUT_REQUEUE)
    } else if ready {
        ctx.health_interval
    } else {
        NOT_READY_REQUEUE
    };
    Ok(Action::requeue(again))
}

/// Writes the invalid spec to status (and an Event), then waits for a change.
async fn invalid_spec(
    mc: &ModelCache,
    ctx: &Context,
    invalid: Invalid,
) -> Result<(Outcome, Action), ReconcileError> {
    ctx.metrics.error(ErrorCategory::InvalidSpec);
    let action = if invalid.outside_the_spec() {
        Action::requeue(ctx.health_interval)
    } else {
        Action::await_change()
    };
    let obs = Observation {
        invalid: Some(invalid),
        ..Default::default()
    };
    let new_status = apply::write_status(&ctx.client, mc, &obs).await?;
    let announced = events::status_events(mc.status.as_ref(), &new_status, &obs);
    events::publish(&ctx.recorder, mc, announced).await;
    Ok((Outcome::Invalid, action))
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
}
