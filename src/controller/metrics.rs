//! Prometheus metrics of the controller. Labels are bounded: a result or an
//! error category from a fixed set, and a cache's namespace and name (bounded
//! by the number of ModelCaches). Never an error string or a per-request value.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::RedisInfo;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
/// How a reconcile ended (a metric label).
pub enum Outcome {
    /// Completed.
    Ok,
    /// The spec is invalid; waits for a change.
    Invalid,
    /// Failed; retried with backoff.
    Error,
}

/// Where a reconcile failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ErrorCategory {
    /// The Kubernetes API refused or failed a request.
    KubeApi,
    /// Redis did not answer.
    RedisUnavailable,
    /// Redis answered a command with an error.
    RedisCommand,
    /// The spec cannot be reconciled until it changes.
    InvalidSpec,
    /// The controller itself failed (no randomness for a password).
    Internal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    category: ErrorCategory,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    namespace: String,
    modelcache: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The controller's Prometheus metrics; labels are bounded (no tenant, prompt or error text).
pub struct Metrics {
    registry: Registry,
    reconciles: Family<OutcomeLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    ready: Family<CacheLabels, Gauge>,
    config_drift: Family<CacheLabels, Gauge>,
    used_memory: Family<CacheLabels, Gauge>,
    maxmemory: Family<CacheLabels, Gauge>,
    fragmentation: Family<CacheLabels, FloatGauge>,
    evicted_keys: Family<CacheLabels, Gauge>,
    hit_rate: Family<CacheLabels, FloatGauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, every outcome and category at 0.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("modelcache");
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let ready = Family::default();
        let config_drift = Family::default();
        let used_memory = Family::default();
        let maxmemory = Family::default();
        let fragmentation = Family::default();
        let evicted_keys = Family::default();
        let hit_rate = Family::default();
        registry.register(
            "reconciles",
            "Reconciles of ModelCaches, by outcome",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one ModelCache reconcile",
            duration.clone(),
        );
        registry.register(
            "redis_ready",
            "1 when Redis answers with the desired config",
            ready.clone(),
        );
        registry.register(
            "redis_config_drift_parameters",
            "Config parameters that differ from the desired value after the last reconcile",
            config_drift.clone(),
        );
        registry.register(
            "redis_used_memory_bytes",
            "INFO used_memory",
            used_memory.clone(),
        );
        registry.register("redis_maxmemory_bytes", "INFO maxmemory", maxmemory.clone());
        registry.register(
            "redis_mem_fragmentation_ratio",
            "INFO mem_fragmentation_ratio",
            fragmentation.clone(),
        );
        registry.register(
            "redis_evicted_keys",
            "INFO evicted_keys since Redis started",
            evicted_keys.clone(),
        );
        registry.register(
            "redis_hit_rate",
            "keyspace_hits / (keyspace_hits + keyspace_misses) since Redis started",
            hit_rate.clone(),
        );
        // Every outcome and category exists from the start, at 0, so that
        // rate() and alerts work before the first failure.
        for outcome in [Outcome::Ok, Outcome::Invalid, Outcome::Error] {
            let _ = reconciles.get_or_create(&OutcomeLabels { outcome });
        }
        for category in [
            ErrorCategory::KubeApi,
            ErrorCategory::RedisUnavailable,
            ErrorCategory::RedisCommand,
            ErrorCategory::InvalidSpec,
            ErrorCategory::Internal,
        ] {
            let _ = errors.get_or_create(&ErrorLabels { category });
        }
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            ready,
            config_drift,
            used_memory,
            maxmemory,
            fragmentation,
            evicted_keys,
            hit_rate,
        }
    }

    /// Counts a reconcile and its duration.
    pub fn reconciled(&self, outcome: Outcome, seconds: f64) {
        self.reconciles
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.duration.observe(seconds);
    }

    /// Counts an error of `category`.
    pub fn error(&self, category: ErrorCategory) {
        self.errors.get_or_create(&ErrorLabels { category }).inc();
    }

    /// Sets one ModelCache's Redis gauges.
    pub fn cache(
        &self,
        namespace: &str,
        name: &str,
        ready: bool,
        drift: usize,
        info: Option<&RedisInfo>,
    ) {
        let l = CacheLabels {
            namespace: namespace.to_owned(),
            modelcache: name.to_owned(),
        };
        self.ready.get_or_create(&l).set(i64::from(ready));
        self.config_drift.get_or_create(&l).set(drift as i64);
        let Some(info) = info else { return };
        let int = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        if let Some(v) = int(info.used_memory) {
            self.used_memory.get_or_create(&l).set(v);
        }
        if let Some(v) = int(info.maxmemory) {
            self.maxmemory.get_or_create(&l).set(v);
        }
        if let Some(v) = int(info.evicted_keys) {
            self.evicted_keys.get_or_create(&l).set(v);
        }
        if let Some(v) = info.mem_fragmentation_ratio {
            self.fragmentation.get_or_create(&l).set(v);
        }
        if let Some(v) = info.hit_rate() {
            self.hit_rate.get_or_create(&l).set(v);
        }
    }

    /// Text exposition format for `/metrics`.
    pub fn encode(&self) -> String {
        crate::admin::exposition(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_bounded_labels() {
        let m = Metrics::new();
        m.reconciled(Outcome::Ok, 0.02);
        m.error(ErrorCategory::RedisUnavailable);
        m.cache(
            "ml",
            "chat",
            true,
            0,
            Some(&RedisInfo {
                used_memory: Some(1024),
                keyspace_hits: Some(3),
                keyspace_misses: Some(1),
                ..Default::default()
            }),
        );
        let text = m.encode();
        assert!(
            text.contains("modelcache_reconciles_total{outcome=\"Ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("modelcache_reconcile_errors_total{category=\"RedisUnavailable\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "modelcache_redis_used_memory_bytes{namespace=\"ml\",modelcache=\"chat\"} 1024"
            ),
            "{text}"
        );
        assert!(
            text.contains("modelcache_redis_hit_rate{namespace=\"ml\",modelcache=\"chat\"} 0.75"),
            "{text}"
        );
        assert!(
            text.contains("modelcache_reconcile_duration_seconds_bucket"),
            "{text}"
        );
    }
}
