//! `modelcache controller`: one Redis per ModelCache, configured as a cache,
//! with its config and health kept true in status.
//!
//! - [`validate`], [`builders`], [`rollout`] and [`status`] are pure and
//!   tested from fixtures;
//! - [`reconcile`] runs them in stages against the API server and Redis;
//! - this module wires watches, leader election, `/metrics` and shutdown.

pub mod builders;
pub mod check;
mod fetch;
pub mod gateway;
pub mod http;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod network;
pub mod prefetch;
pub mod reconcile;
pub mod rollout;
pub mod status;
pub mod validate;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::crd::{CachePolicy, ModelCache};

pub use reconcile::{Context, MANAGER, ReconcileError, error_policy, reconcile};

/// Why the controller stopped.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum ControllerError {
    #[error("failed to build a Kubernetes client from KUBECONFIG or the in-cluster config")]
    Client(#[source] kube::Error),
    #[error("failed to serve metrics and probes on {0}")]
    Http(SocketAddr, #[source] std::io::Error),
    #[error("failed to take part in leader election")]
    Leader(#[source] leader::LeaderError),
    #[error("failed to keep the leader lease: another replica may take over, so this one stops")]
    LostLease,
    #[error("failed to start the injection webhook")]
    Webhook(#[source] webhook::WebhookError),
    #[error("failed to install the SIGTERM handler")]
    Signal(#[source] std::io::Error),
}

/// Settings of `modelcache controller`.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Watch one namespace only; `None` watches all (needs cluster-wide RBAC).
    pub namespace: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub http_addr: SocketAddr,
    /// How often a healthy cache is checked again.
    pub health_interval: Duration,
    /// Take a Lease before reconciling (several replicas).
    pub leader_election: bool,
    /// The Lease's namespace.
    pub lease_namespace: String,
    /// The Lease's name.
    pub lease_name: String,
    /// This replica's name in the Lease.
    pub identity: String,
    /// How long the Lease lasts without renewal.
    pub lease_duration: Duration,
    /// Reach every provisioned Redis at this URL (a controller outside the cluster, tests).
    pub redis_url_override: Option<String>,
    /// Serve the pod-injection webhook (every replica serves it).
    pub webhook: Option<WebhookSettings>,
    /// The modelcache image, which standalone gateways run.
    pub image: Option<String>,
    /// Where the node cache agents run, whose prefetches reach status.
    pub node_agents: Option<prefetch::NodeAgents>,
}

/// The injection webhook's address, behaviour and TLS.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The address the webhook listens on.
    pub addr: SocketAddr,
    /// What the webhook injects.
    pub inject: inject::InjectConfig,
    /// Where its certificate comes from.
    pub tls: WebhookTls,
}

/// Where the webhook's certificate comes from.
#[derive(Debug, Clone)]
pub enum WebhookTls {
    /// The controller issues it, keeps it in `secret` (in its namespace) and
    /// patches its CA into the MutatingWebhookConfiguration `configuration`.
    Managed {
        /// The Secret that keeps the CA and certificate.
        secret: String,
        /// The webhook's Service (its DNS names go into the certificate).
        service: String,
        /// The MutatingWebhookConfiguration whose caBundle is set.
        configuration: String,
    },
    /// `tls.crt` and `tls.key` in a directory (a cert-manager Secret).
    Files(std::path::PathBuf),
}

/// How often the webhook's certificate is checked for renewal (ours) or
/// rotation (cert-manager's files).
const WEBHOOK_CERT_CHECK: Duration = Duration::from_secs(6 * 3600);
/// How often the certificate's source is read for a change made elsewhere
/// (another replica's renewal, cert-manager's rotation): one GET or two file
/// reads; the serving certificate is swapped only when it changed.
const WEBHOOK_CERT_WATCH: Duration = Duration::from_secs(60);

/// The webhook's certificate and key as its source holds them now, without
/// renewing: `None` when the Secret holds nothing current (the next full
/// check issues).
async fn webhook_cert_now(
    client: &Client,
    tls: &WebhookTls,
    namespace: &str,
) -> Result<Option<(String, String)>, webhook::WebhookError> {
    match tls {
        WebhookTls::Managed {
            secret, service, ..
        } => Ok(webhook::read_tls(client, namespace, secret, service)
            .await?
            .map(|m| (m.cert_pem, m.key_pem))),
        WebhookTls::Files(_) => webhook_cert(client, tls, namespace).await.map(Some),
    }
}

/// The webhook's certificate and key, as they are now.
async fn webhook_cert(
    client: &Client,
    tls: &WebhookTls,
    namespace: &str,
) -> Result<(String, String), webhook::WebhookError> {
    match tls {
        WebhookTls::Managed {
            secret,
            service,
            configuration,
        } => {
            let m = webhook::ensure_tls(client, namespace, secret, service, configuration).await?;
            Ok((m.cert_pem, m.key_pem))
        }
        WebhookTls::Files(dir) => {
            let read = |name: &str| {
                let path = dir.join(name);
                std::fs::read_to_string(&path)
                    .map_err(|source| webhook::WebhookError::Read { path, source })
            };
            Ok((read("tls.crt")?, read("tls.key")?))
        }
    }
}

/// Load or issue the webhook's certificate, serve it, and keep it fresh.
async fn start_webhook(
    client: &Client,
    settings: &WebhookSettings,
    namespace: &str,
) -> Result<tokio::task::JoinHandle<()>, webhook::WebhookError> {
    let (cert, key) = webhook_cert(client, &settings.tls, namespace).await?;
    let serving = webhook::ServingCert::new(&cert, &key)?;
    let tls = webhook::server_config(serving.clone())?;
    let listener = webhook::bind(settings.addr).await?;
    tracing::info!(addr = %settings.addr, failure_policy = ?settings.inject.failure_policy, "serving the injection webhook");
    let server = tokio::spawn(webhook::serve(
        listener,
        tls,
        webhook::api_lookup(client.clone()),
        settings.inject.clone(),
    ));
    // Renewal (30 days before expiry) and cert-manager's rotations take
    // effect without a restart; a failed check keeps the current one.
    let (client, tls_source, namespace) =
        (client.clone(), settings.tls.clone(), namespace.to_owned());
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    Ok(tokio::spawn(async move {
        // Aborting this task stops the server too.
        let server = AbortOnDrop(server);
        let mut served = (cert, key);
        let mut last_full = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(WEBHOOK_CERT_WATCH).await;
            if server.0.is_finished() {
                return;
            }
            let fresh = if last_full.elapsed() >= WEBHOOK_CERT_CHECK {
                last_full = tokio::time::Instant::now();
                webhook_cert(&client, &tls_source, &namespace)
                    .await
                    .map(Some)
            } else {
                webhook_cert_now(&client, &tls_source, &namespace).await
            };
            let swapped = match fresh {
                Ok(Some(now)) if now != served => serving.replace(&now.0, &now.1).map(|()| {
                    served = now;
                    tracing::info!("serving the webhook's new certificate");
                }),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = swapped {
                tracing::warn!(error = %crate::error::chain(&e), "failed to refresh the webhook certificate; serving the current one");
            }
        }
    }))
}

/// Runs the controller until SIGTERM.
pub async fn run(config: ControllerConfig) -> Result<(), ControllerError> {
    let client = Client::try_default()
        .await
        .map_err(ControllerError::Client)?;
    run_with_client(client, config).await
}

/// [`run`] with a given client (tests give a faked API server's).
pub async fn run_with_client(
    client: Client,
    config: ControllerConfig,
) -> Result<(), ControllerError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let state = Arc::new(http::HttpState {
        metrics: metrics.clone(),
        ready: Default::default(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let signal = crate::signal::shutdown().map_err(ControllerError::Signal)?;
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let http_task = serve_http(config.http_addr, state.clone(), stop_rx.clone()).await?;
    let webhook_task = match &config.webhook {
        Some(settings) => Some(
            start_webhook(&client, settings, &config.lease_namespace)
                .await
                .map_err(ControllerError::Webhook)?,
        ),
        None => None,
    };
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(addr = %config.http_addr, "serving /healthz, /readyz and /metrics");

    let elector = config.leader_election.then(|| {
        leader::LeaderElector::new(
            client.clone(),
            &config.lease_namespace,
            &config.lease_name,
            &config.identity,
            config.lease_duration,
        )
    });
    let (lost_tx, lost_rx) = watch::channel(false);
    if let Some(elector) = &elector {
        tracing::info!(lease = %config.lease_name, identity = %config.identity, "waiting for the leader lease");
        if !lead(elector, &stop_rx).await {
            return Ok(());
        }
        tracing::info!("leading");
    }
    // The sender lives until the end: were it dropped (no elector), every
    // receiver would see the channel close and stop the controller at once.
    let renew_task = elector.map(|e| tokio::spawn(keep_lease(e, stop_rx.clone(), lost_tx.clone())));

    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: Some(config.identity.clone()),
    };
    let mut ctx = Context::new(
        client.clone(),
        metrics.clone(),
        Recorder::new(client.clone(), reporter),
        config.health_interval,
    );
    ctx.redis_url_override = config.redis_url_override.clone();
    ctx.controller_namespace = Some(config.lease_namespace.clone());
    ctx.image = config.image.clone();
    ctx.node_agents = config.node_agents.clone();
    let stop = {
        let (mut stop, mut lost) = (stop_rx.clone(), lost_rx.clone());
        async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = lost.wait_for(|l| *l) => {}
            }
        }
    };
    reconcile_until(&client, &config.namespace, Arc::new(ctx), stop).await;
    drop(lost_tx);

    let lost_lease = *lost_rx.borrow();
    if let Some(task) = renew_task {
        if lost_lease {
            task.abort();
        } else {
            let _ = task.await;
        }
    }
    let _ = http_task.await;
    if let Some(task) = webhook_task {
        task.abort();
    }
    if lost_lease {
        return Err(ControllerError::LostLease);
    }
    Ok(())
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop` turns true.
async fn serve_http(
    addr: SocketAddr,
    state: Arc<http::HttpState>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, ControllerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ControllerError::Http(addr, e))?;
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    Ok(tokio::spawn(
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(stopped)
            .into_future(),
    ))
}

/// Waits for the leader Lease; `false` when the controller stops first.
async fn lead(elector: &leader::LeaderElector, stop: &watch::Receiver<bool>) -> bool {
    loop {
        if *stop.borrow() {
            return false;
        }
        match elector.try_lead().await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %crate::error::chain(&e), "leader election"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Renews the Lease until the controller stops (then releases it), or says
/// on `lost` that another replica may have taken over: when a renewal finds
/// another holder, or none succeeded for a whole Lease duration.
async fn keep_lease(
    elector: leader::LeaderElector,
    mut stop: watch::Receiver<bool>,
    lost: watch::Sender<bool>,
) -> leader::LeaderElector {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(elector.renew_period()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        match elector.try_lead().await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                let _ = lost.send(true);
                return elector;
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "failed to renew the lease")
            }
        }
        if last_renewal.elapsed() > elector.duration() {
            let _ = lost.send(true);
            return elector;
        }
    }
    if let Err(e) = elector.release().await {
        tracing::warn!(error = %crate::error::chain(&e), "failed to release the lease");
    }
    elector
}

/// Watches ModelCaches (with the objects they own and the CachePolicies they
/// use) and reconciles them until `stop` completes.
async fn reconcile_until(
    client: &Client,
    namespace: &Option<String>,
    ctx: Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=modelcache");
    let controller = Controller::new(
        namespaced_or_all::<ModelCache>(client, namespace),
        watcher::Config::default(),
    );
    let store = controller.store();
    controller
        .owns(
            namespaced_or_all::<StatefulSet>(client, namespace),
            managed.clone(),
        )
        .owns(
            namespaced_or_all::<ConfigMap>(client, namespace),
            managed.clone(),
        )
        .owns(namespaced_or_all::<Service>(client, namespace), managed)
        // Secrets are not watched: that would need list and watch on every
        // Secret in scope. A deleted Secret is recreated on the next periodic
        // reconcile (the health interval) instead.
        // A policy change reconciles every ModelCache that uses it.
        .watches(
            namespaced_or_all::<CachePolicy>(client, namespace),
            watcher::Config::default(),
            move |policy: CachePolicy| users_of(&store.state(), &policy),
        )
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(modelcache = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

/// The ModelCaches of the policy's namespace that reference it.
fn users_of(caches: &[Arc<ModelCache>], policy: &CachePolicy) -> Vec<ObjectRef<ModelCache>> {
    let (ns, name) = (policy.namespace(), policy.name_any());
    caches
        .iter()
        .filter(|mc| {
            mc.namespace() == ns
                && mc
                    .spec
                    .cache_policy_ref
                    .as_ref()
                    .is_some_and(|r| r.name == name)
        })
        .map(|mc| ObjectRef::from_obj(&**mc))
        .collect()
}

fn namespaced_or_all<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}
