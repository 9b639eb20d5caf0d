//! The admin port of the long-running commands (the gateway and the node
//! agent; the controller's readiness has its own rule): `/healthz`,
//! `/readyz` and `/metrics`, in the OpenMetrics text that prometheus-client
//! writes.

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// The media type of [`exposition`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry in the OpenMetrics text format.
pub fn exposition(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would leave a
    // partial page, which a scrape reports, rather than a dead server.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "failed to encode the metrics");
    }
    out
}

/// `/healthz` and `/readyz` (200 while the process serves), and `/metrics`
/// from `metrics`.
pub fn router(metrics: impl Fn() -> String + Clone + Send + Sync + 'static) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .route(
            "/metrics",
            get(move || async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics()) }),
        )
}
