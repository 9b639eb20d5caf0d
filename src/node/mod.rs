//! `modelcache node`: the node cache agent, one per node (a DaemonSet). It
//! owns the node cache on a host directory (quota, LRU, pins: the rules of
//! [`crate::artifact::node_cache`]) and serves verified blobs to the pods of
//! its node over HTTP on the node's address, so that a version crosses the
//! network from the origin once per node, however many pods start.
//!
//! - [`authorize`]: who may read (projected token, TokenReview, the pod,
//!   its ModelCache).
//! - [`fills`]: one download per version, joined by every pod that asks.
//! - [`server`]: the HTTP API (the origin's layout, ranges) and the admin port.
//! - [`metrics`]: bytes from the cache and from origins, fill, refusals.
//!
//! The pods trust it with nothing: `modelcache fetch --node-agent` checks
//! the manifest against the digest the controller pinned and every file
//! against the manifest, and goes to the origin when the agent is absent,
//! refuses, or serves bad bytes. A compromised agent can deny service, not
//! change weights.

pub mod authorize;
pub mod fills;
pub mod metrics;
pub mod prefetch;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::artifact::node_cache::{NodeCache, NodeCacheError};

/// How often pins are released when nothing is prefetched.
const PIN_ROUNDS: std::time::Duration = std::time::Duration::from_secs(30);

/// Everything `modelcache node` takes.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where pods call (the node's address and the agent's port).
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub admin_listen: SocketAddr,
    /// This node's name (`spec.nodeName` of the pods it may serve).
    pub node: String,
    /// The node cache's directory (a hostPath).
    pub cache_dir: PathBuf,
    /// How it downloads.
    pub fill: fills::FillSettings,
    /// How often it looks for versions to prefetch (`None`: never).
    pub prefetch_every: Option<std::time::Duration>,
    /// The namespace whose ModelCaches it prefetches (`None`: all).
    pub namespace: Option<String>,
}

/// Why the agent stopped.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum NodeError {
    #[error("failed to listen on {addr}; is the port free and the address this node's?")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to serve on {addr}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to open the node cache")]
    Cache(#[from] NodeCacheError),
}

/// Serves until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    client: kube::Client,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let cache = NodeCache::open(&config.cache_dir)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let fills = Arc::new(fills::Fills::new(
        cache.clone(),
        config.fill.clone(),
        metrics.clone(),
    ));
    fills.measure().await;
    let prefetcher = Arc::new(prefetch::Prefetcher::new(
        client.clone(),
        &config.node,
        config.namespace.clone(),
        config.prefetch_every.is_some(),
        cache.clone(),
        fills.clone(),
    ));
    // Without prefetch the rounds still release the pins of pods gone.
    let every = config.prefetch_every.unwrap_or(PIN_ROUNDS);
    let rounds = tokio::spawn(prefetcher.clone().run(every));
    let agent = Arc::new(server::Agent {
        authorizer: authorize::Authorizer::new(client, &config.node),
        cache,
        fills,
        metrics: metrics.clone(),
    });
    let listener = bind(config.listen).await?;
    let admin = bind(config.admin_listen).await?;
    tracing::info!(listen = %config.listen, admin = %config.admin_listen, node = %config.node,
        cache = %config.cache_dir.display(), "serving the node cache");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admin_addr = config.admin_listen;
    let mut admin_stopped = stopped.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin, server::admin_router(metrics, prefetcher))
            .with_graceful_shutdown(async move {
                let _ = admin_stopped.wait_for(|s| *s).await;
            })
            .await
            .map_err(|source| NodeError::Serve {
                addr: admin_addr,
                source,
            })
    });
    let served = axum::serve(listener, server::router(agent))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| NodeError::Serve {
            addr: config.listen,
            source,
        });
    let _ = stop.send(true);
    drop(stopped);
    rounds.abort();
    if let Ok(Err(e)) = admin_task.await {
        return Err(e);
    }
    served
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, NodeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen { addr, source })
}
