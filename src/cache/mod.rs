//! The serving library: caches on the model's Redis, version-scoped through
//! the one key schema ([`crate::keyspace::keys`]) that the sweeper invalidates.
//!
//! - [`ResultCache`]: exact match on canonical JSON of model plus inputs.
//! - [`FeatureCache`]: batched feature vectors per entity.
//! - [`SemanticCache`]: answers for similar questions, above a threshold
//!   calibrated from labeled pairs ([`calibrate`]), through an in-process
//!   nearest-neighbour [`index`] kept in step across replicas.
//! - [`threshold`]: what a static threshold does on scored pairs, and
//!   [`guard`]: the lexical check (numbers, negation) a semantic hit passes
//!   too; [`per_entry`]: thresholds learned per entry from outcomes.
//! - [`entity`]: O(1) invalidation of one entity's entries through a
//!   generation number in their keys, fed by a Redis Stream consumer group.
//!
//! Values are stored as JSON behind a format tag ([`codec`]), never with a
//! code-bearing serializer: a cache poisoned by an attacker yields data, not
//! code.

pub mod calibrate;
pub mod codec;
pub mod entity;
pub mod feature;
pub mod guard;
pub mod index;
pub mod per_entry;
pub mod result;
pub mod semantic;
pub mod threshold;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::RedisError;
use tokio::sync::watch;

use crate::keyspace::registry::RegistryState;

pub use feature::FeatureCache;
pub use result::ResultCache;
pub use semantic::SemanticCache;

/// The key of an entry: the sha256 of the subject's canonical JSON, under
/// the model, version and layer.
fn entry_key(
    model: &str,
    version: &str,
    layer: crate::keyspace::keys::Layer,
    subject: &serde_json::Value,
) -> String {
    crate::keyspace::keys::entry(
        model,
        version,
        layer,
        &codec::sha256_hex(codec::canonical_json(subject).as_bytes()),
    )
}

/// Wrap a Redis error of `action` in `layer`'s cache of `model`.
fn redis_error(
    model: &str,
    layer: &'static str,
    action: &'static str,
) -> impl FnOnce(RedisError) -> CacheError {
    let model = model.to_owned();
    move |source| CacheError::Redis {
        action,
        layer,
        model,
        source,
    }
}

/// Why a cache lookup or store failed (the caller answers from the source).
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum CacheError {
    #[error("failed to {action} in the {layer} cache of model {model:?}")]
    Redis {
        action: &'static str,
        layer: &'static str,
        model: String,
        #[source]
        source: RedisError,
    },
    #[error(
        "refused to cache a non-deterministic call (temperature {temperature}): its answer \
         differs from call to call; call allow_nondeterministic(true) to cache it anyway"
    )]
    NonDeterministic { temperature: f64 },
    #[error("failed to encode a cache value as JSON")]
    Encode(#[source] serde_json::Error),
    #[error(
        "failed to pick a version of model {model:?}: its registry has no active version yet; \
         publish one (the controller does on rollout) or use a fixed version"
    )]
    NoVersion { model: String },
    #[error(
        "refused to store a semantic entry of model {model:?}: its vector is not {dim} finite \
         numbers of unit length; embed with the cache's model and normalize"
    )]
    Vector { model: String, dim: usize },
}

/// A connection the caches can use: anything that talks to Redis and is
/// cheap to clone. Serving processes pass a
/// [`redis::aio::ConnectionManager`] (from
/// [`crate::store::RedisTarget::connect_managed`]), which reconnects when
/// Redis restarts; a [`redis::aio::MultiplexedConnection`] stays dead after
/// the server it reached went away, so a cache on one never serves again
/// after a Redis restart (fine for tests and one-shot tools).
pub trait Connection: redis::aio::ConnectionLike + Clone + Send + Sync + 'static {}

impl<T: redis::aio::ConnectionLike + Clone + Send + Sync + 'static> Connection for T {}

/// Which model version a cache reads and writes.
#[derive(Clone, Debug)]
pub enum Versions {
    /// Always this version (tests, or serving code that knows its version from
    /// the pod's label through the downward API).
    Fixed(String),
    /// The registry's active version, as a [`crate::keyspace::registry::Follower`] sees it.
    Registry(watch::Receiver<RegistryState>),
}

impl Versions {
    /// The version to serve now; `None` before the registry names one.
    pub fn current(&self) -> Option<String> {
        match self {
            Versions::Fixed(v) => Some(v.clone()),
            Versions::Registry(rx) => rx.borrow().active.clone(),
        }
    }

    fn require(&self, model: &str) -> Result<String, CacheError> {
        self.current().ok_or_else(|| CacheError::NoVersion {
            model: model.to_owned(),
        })
    }
}

/// Hit and miss counters of one cache.
#[derive(Debug, Default)]
pub struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    undecodable: AtomicU64,
    refused: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// Entries found but not in a format this build reads (counted as misses too).
    pub undecodable: u64,
    /// Writes refused (non-deterministic calls).
    pub refused: u64,
}

impl StatsSnapshot {
    /// hits / (hits + misses); `None` before any lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

impl Stats {
    /// The counts now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            undecodable: self.undecodable.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn count(&self, found: &Option<Vec<u8>>, decoded: &Option<serde_json::Value>) {
        match (found, decoded) {
            (Some(_), Some(_)) => self.hits.fetch_add(1, Ordering::Relaxed),
            (Some(_), None) => {
                self.undecodable.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed)
            }
            (None, _) => self.misses.fetch_add(1, Ordering::Relaxed),
        };
    }
}

pub(crate) type SharedStats = Arc<Stats>;

fn ttl_seconds(ttl: i64) -> Option<u64> {
    u64::try_from(ttl).ok().filter(|t| *t > 0)
}
