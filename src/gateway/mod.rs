//! `modelcache gateway`: an OpenAI-compatible caching gateway in front of
//! one upstream (the OpenAI API, vLLM, SGLang, llama.cpp's server), so that
//! any client gets the caches by pointing its `base_url` at it.
//!
//! - [`request`]: which requests the exact layer may answer, their key, and
//!   whose cache they read ([`request::Scope`]).
//! - [`control`]: the request's `Cache-Control`.
//! - [`sse`]: event streams parsed as they arrive, relayed event by event.
//! - [`response`]: what is stored of an answer, when, and how a stored
//!   stream answers a plain request and the other way round.
//! - [`flight`]: identical concurrent misses share one upstream call.
//! - [`server`]: the HTTP server; [`metrics`]: its Prometheus metrics.

pub mod control;
pub mod flight;
pub mod metrics;
pub mod request;
pub mod response;
pub mod semantic;
pub mod server;
pub mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::RedisTarget;

/// Where a gateway listens and what it connects to.
pub struct Options {
    /// How requests are served and cached.
    pub config: server::Config,
    /// The serving port.
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub admin: SocketAddr,
    /// The model's Redis; `None` runs without a cache (a plain proxy).
    pub redis: Option<RedisTarget>,
    /// The metrics' prices.
    pub price: metrics::Price,
    /// How often the counts go to Redis ([`REPORT_INTERVAL`] by default).
    pub report_interval: Duration,
}

/// How long to wait between attempts to reach Redis at start.
const CONNECT_RETRY: Duration = Duration::from_secs(1);
/// How often a gateway adds its counts to the model's counters in Redis.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Adds the counts since the last report to the model's counters in Redis
/// (the controller reads them into the ModelCache's status), every
/// `interval`; counts that could not be sent wait for the next report.
pub async fn report<C: crate::cache::Connection>(
    metrics: Arc<metrics::Metrics>,
    backend: watch::Receiver<Option<server::Backend<C>>>,
    model: String,
    interval: Duration,
) {
    let key = crate::keyspace::keys::gateway_stats(&model);
    loop {
        tokio::time::sleep(interval).await;
        let Some(mut conn) = server::connection(&backend) else {
            continue;
        };
        let counts = metrics.take_report();
        if counts.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for (field, n) in counts.fields() {
            pipe.cmd("HINCRBY").arg(&key).arg(field).arg(n).ignore();
        }
        if pipe.query_async::<()>(&mut conn).await.is_err() {
            metrics.restore_report(counts);
        }
    }
}

/// Connects to Redis (retrying until it answers) and publishes the exact
/// layer's connection, then the semantic layer's cache once its index is
/// built: each layer serves as soon as it can, the upstream answers before.
async fn connect(
    target: RedisTarget,
    semantic: Option<(server::SemanticLayer, String, crate::cache::Versions)>,
    tx: watch::Sender<Option<server::Backend<redis::aio::ConnectionManager>>>,
) {
    let conn = loop {
        match target.connect_managed().await {
            Ok(conn) => break conn,
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "gateway cannot reach Redis yet; serving from the upstream");
                tokio::time::sleep(CONNECT_RETRY).await;
            }
        }
    };
    tracing::info!(redis = %target.url, "gateway connected to Redis");
    let _ = tx.send(Some(server::Backend {
        conn: conn.clone(),
        semantic: None,
    }));
    let Some((layer, model, versions)) = semantic else {
        return;
    };
    let dim = layer.embedder.dim();
    let cache = crate::cache::SemanticCache::new(conn.clone(), &model, versions, dim, layer.config);
    loop {
        let started = match target.client() {
            Ok(client) => cache
                .start(client)
                .await
                .map_err(|e| crate::error::chain(&e)),
            Err(e) => Err(crate::error::chain(&e)),
        };
        match started {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, "semantic index not built yet; the exact layer serves meanwhile");
                tokio::time::sleep(CONNECT_RETRY).await;
            }
        }
    }
    let _ = tx.send(Some(server::Backend {
        conn,
        semantic: Some(cache),
    }));
}

/// Runs a gateway until `shutdown` resolves. It serves at once: until Redis
/// answers (and whenever it does not) requests go to the upstream.
pub async fn run(
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), server::GatewayError> {
    let metrics = Arc::new(metrics::Metrics::new(&options.config.model, options.price));
    let (tx, rx) = watch::channel(None);
    if let Some(target) = options.redis {
        let semantic = options.config.semantic.clone().map(|layer| {
            (
                layer,
                options.config.model.clone(),
                options.config.versions.clone(),
            )
        });
        tokio::spawn(connect(target, semantic, tx));
    }
    tokio::spawn(report(
        Arc::clone(&metrics),
        rx.clone(),
        options.config.model.clone(),
        options.report_interval,
    ));
    let gateway = server::Gateway::new(options.config, rx, Arc::clone(&metrics))?;
    // Both ports are taken before either serves: a gateway that cannot
    // expose its probes does not start.
    let listener = server::bind(options.listen).await?;
    let admin_listener = server::bind(options.admin).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin = tokio::spawn(server::serve(
        admin_listener,
        server::admin_router(metrics),
        stopped(stop_rx.clone()),
    ));
    let serving = server::serve(listener, gateway.router(), stopped(stop_rx));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let served = serving.await;
    match admin.await {
        Ok(Err(e)) => Err(e),
        _ => served,
    }
}
