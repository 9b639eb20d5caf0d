//! The node agent's Prometheus metrics. Labels are bounded: where bytes came
//! from (`cache`, `origin`) and a refusal's reason, from fixed sets. Never a
//! pod, a namespace, a model or a token.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Where served bytes came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Served {
    /// A verified blob in the node cache.
    Cache,
    /// A download from the origin, followed while it ran.
    Origin,
}

impl Served {
    fn label(self) -> &'static str {
        match self {
            Served::Cache => "cache",
            Served::Origin => "origin",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServedLabels {
    from: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// The metric names, for the chart's dashboard and its test.
pub const NAMES: &[&str] = &[
    "modelcache_node_served_bytes_total",
    "modelcache_node_origin_bytes_total",
    "modelcache_node_cache_bytes",
    "modelcache_node_evicted_versions_total",
    "modelcache_node_downloads_coalesced_total",
    "modelcache_node_refusals_total",
];

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    served: Family<ServedLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    /// Bytes received from origins.
    pub origin_bytes: Counter,
    /// Bytes in the node cache.
    pub cache_bytes: Gauge,
    /// Versions evicted to stay within the quota.
    pub evicted_versions: Counter,
    /// Requests that joined a download already running.
    pub coalesced: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            served: Family::default(),
            refusals: Family::default(),
            origin_bytes: Counter::default(),
            cache_bytes: Gauge::default(),
            evicted_versions: Counter::default(),
            coalesced: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "modelcache_node_served_bytes",
            "Bytes served to pods, by where they came from",
            m.served.clone(),
        );
        registry.register(
            "modelcache_node_origin_bytes",
            "Bytes downloaded from origins into the node cache",
            m.origin_bytes.clone(),
        );
        registry.register(
            "modelcache_node_cache_bytes",
            "Bytes held in the node cache",
            m.cache_bytes.clone(),
        );
        registry.register(
            "modelcache_node_evicted_versions",
            "Versions evicted from the node cache to stay within its quota",
            m.evicted_versions.clone(),
        );
        registry.register(
            "modelcache_node_downloads_coalesced",
            "Requests that joined a download already running",
            m.coalesced.clone(),
        );
        registry.register(
            "modelcache_node_refusals",
            "Requests refused, by reason",
            m.refusals.clone(),
        );
        for from in [Served::Cache, Served::Origin] {
            let _ = m.served.get_or_create(&ServedLabels { from: from.label() });
        }
        Metrics { registry, ..m }
    }

    /// Counts bytes sent to a pod.
    pub fn served(&self, from: Served, bytes: u64) {
        self.served
            .get_or_create(&ServedLabels { from: from.label() })
            .inc_by(bytes);
    }

    /// Counts a refused request.
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        crate::admin::exposition(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_with_bounded_labels() {
        let m = Metrics::new();
        m.served(Served::Cache, 10);
        m.refused("other_node");
        m.coalesced.inc();
        let text = m.encode();
        for name in NAMES {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(
            text.contains(r#"modelcache_node_served_bytes_total{from="cache"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(r#"modelcache_node_served_bytes_total{from="origin"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"modelcache_node_refusals_total{reason="other_node"} 1"#),
            "{text}"
        );
    }
}
