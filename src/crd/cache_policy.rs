//! `CachePolicy`: how a model's Redis behaves as a cache, shared by the
//! ModelCaches that reference it.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::conditions_schema;

/// Default Redis image: Valkey is BSD-licensed, maintained, and speaks the Redis
/// 7 protocol and config that the controller relies on.
pub const DEFAULT_REDIS_IMAGE: &str = "docker.io/valkey/valkey:8.1";
/// Share of the Redis memory limit given to maxmemory. The rest is headroom for
/// fragmentation, replication buffers and the process itself.
pub const DEFAULT_MAXMEMORY_RATIO: f64 = 0.8;
/// The lowest `maxmemoryRatio` accepted.
pub const MIN_MAXMEMORY_RATIO: f64 = 0.1;
/// The highest `maxmemoryRatio` accepted.
pub const MAX_MAXMEMORY_RATIO: f64 = 0.95;

/// Eviction, memory, TTL, semantic-match and invalidation settings for the
/// Redis of every ModelCache that references this policy.
// Each printcolumn(...) repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "modelcache.dev",
    version = "v1alpha1",
    kind = "CachePolicy",
    plural = "cachepolicies",
    shortname = "cp",
    category = "modelcache",
    namespaced,
    status = "CachePolicyStatus",
    derive = "PartialEq",
    doc = "CachePolicy sets how the Redis of each ModelCache that references it behaves as a cache: eviction, maxmemory, TTLs per layer, semantic matching and invalidation on model rollouts.",
    printcolumn(
        name = "Eviction",
        type_ = "string",
        json_path = ".spec.evictionPolicy",
        description = "Redis maxmemory-policy"
    ),
    printcolumn(
        name = "Ratio",
        type_ = "number",
        json_path = ".spec.maxmemoryRatio",
        description = "maxmemory as a share of the memory limit"
    ),
    printcolumn(
        name = "Invalidation",
        type_ = "string",
        json_path = ".spec.invalidation.strategy",
        description = "What happens to a retired version's keys"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.evictionPolicy.startsWith('volatile-') || (self.ttlSeconds.result > 0 && self.ttlSeconds.semantic > 0 && self.ttlSeconds.feature > 0)").message("volatile-* eviction policies evict only keys with a TTL: set every ttlSeconds layer above 0"),
    validation = Rule::new("self.invalidation.strategy != 'TTLOnly' || (self.ttlSeconds.result > 0 && self.ttlSeconds.semantic > 0 && self.ttlSeconds.feature > 0)").message("TTLOnly invalidation relies on expiry alone: set every ttlSeconds layer above 0"),
)]
pub struct CachePolicySpec {
    /// Redis maxmemory-policy. `allkeys-lru` suits caches where every key may be
    /// recomputed; the `volatile-*` policies evict only keys with a TTL.
    #[serde(default)]
    pub eviction_policy: EvictionPolicy,

    /// maxmemory as a share of the Redis container's memory limit (0.1 to 0.95).
    /// The controller sets maxmemory to exactly this share, in bytes.
    #[serde(default = "default_maxmemory_ratio")]
    #[schemars(range(min = MIN_MAXMEMORY_RATIO, max = MAX_MAXMEMORY_RATIO))]
    pub maxmemory_ratio: f64,

    /// Time to live of entries per cache layer, in seconds. 0 means no expiry.
    #[serde(default)]
    pub ttl_seconds: LayerTtls,

    /// Semantic-cache matching.
    #[serde(default)]
    pub semantic: SemanticSettings,

    /// What happens to a model version's keys once no pod serves it.
    #[serde(default)]
    pub invalidation: InvalidationSettings,

    /// mem_fragmentation_ratio above which the controller reports the
    /// `Fragmented` condition and turns on active defragmentation.
    #[serde(default = "default_fragmentation_threshold")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub fragmentation_threshold: f64,

    /// Redis image and resources for the ModelCaches that use this policy;
    /// a ModelCache's own `redis` fields override these.
    #[serde(default)]
    pub redis: RedisDefaults,

    /// What the caching gateway (a ModelCache's `spec.gateway`) may share
    /// and store.
    #[serde(default)]
    pub gateway: GatewayPolicy,
}

/// Who shares the gateway's cached answers, and which requests it caches.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPolicy {
    /// `PerCredential`: each API key has its own entries, callers without
    /// one share an anonymous scope. `CredentialRequired`: the same, and a
    /// request without an Authorization header gets 401. `Shared`: every
    /// caller reads every caller's entries (one company-wide FAQ): an
    /// explicit opt-in.
    #[serde(default)]
    pub sharing: GatewaySharing,

    /// Cache sampled requests (temperature above 0, or none given: the
    /// OpenAI default is 1) and n above 1 too. Their answers vary from call
    /// to call, so by default they are not cached.
    #[serde(default)]
    pub allow_sampling: bool,
}

/// Gateway sharing: `PerCredential`, `CredentialRequired` or `Shared`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
// The values are named in the enum's doc (see EvictionPolicy).
#[allow(missing_docs)]
pub enum GatewaySharing {
    #[default]
    PerCredential,
    CredentialRequired,
    Shared,
}

impl GatewaySharing {
    /// The value of `modelcache gateway --sharing`.
    pub fn flag(self) -> &'static str {
        match self {
            GatewaySharing::PerCredential => "per-credential",
            GatewaySharing::CredentialRequired => "credential-required",
            GatewaySharing::Shared => "shared",
        }
    }
}

fn default_maxmemory_ratio() -> f64 {
    DEFAULT_MAXMEMORY_RATIO
}

fn default_fragmentation_threshold() -> f64 {
    1.5
}

/// Redis maxmemory-policy values.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
// The values are named in the enum's doc, which `kubectl explain` shows. A
// doc comment on a variant reaches only the schema generator, which then
// moves that value within the schema's `enum` (checked: `crds/` would drift).
#[allow(missing_docs)]
pub enum EvictionPolicy {
    #[default]
    AllkeysLru,
    AllkeysLfu,
    AllkeysRandom,
    VolatileLru,
    VolatileLfu,
    VolatileRandom,
    VolatileTtl,
    Noeviction,
}

impl EvictionPolicy {
    /// The value as Redis spells it in `maxmemory-policy`.
    pub fn as_redis(self) -> &'static str {
        match self {
            EvictionPolicy::AllkeysLru => "allkeys-lru",
            EvictionPolicy::AllkeysLfu => "allkeys-lfu",
            EvictionPolicy::AllkeysRandom => "allkeys-random",
            EvictionPolicy::VolatileLru => "volatile-lru",
            EvictionPolicy::VolatileLfu => "volatile-lfu",
            EvictionPolicy::VolatileRandom => "volatile-random",
            EvictionPolicy::VolatileTtl => "volatile-ttl",
            EvictionPolicy::Noeviction => "noeviction",
        }
    }
}

/// TTL per cache layer, in seconds; 0 means no expiry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LayerTtls {
    /// Exact-match results (LLM responses, predictions).
    #[serde(default = "default_result_ttl")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub result: i64,
    /// Semantic-cache entries (embedding, query, response).
    #[serde(default = "default_semantic_ttl")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub semantic: i64,
    /// Feature vectors, which go stale quickly when users act.
    #[serde(default = "default_feature_ttl")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub feature: i64,
}

fn default_result_ttl() -> i64 {
    3600
}
fn default_semantic_ttl() -> i64 {
    86_400
}
fn default_feature_ttl() -> i64 {
    300
}

impl Default for LayerTtls {
    fn default() -> Self {
        LayerTtls {
            result: default_result_ttl(),
            semantic: default_semantic_ttl(),
            feature: default_feature_ttl(),
        }
    }
}

/// Semantic matching. The threshold depends on the embedding model, so it
/// should come from `modelcache calibrate` on labeled pairs, not be guessed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SemanticSettings {
    /// Cosine similarity at or above which a cached answer is served. Unset:
    /// the threshold calibrated to meet maxFalseHitRate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: Option<f64>,

    /// Largest share of semantic hits that may return an answer to a different
    /// question. Calibration picks the threshold that meets it.
    #[serde(default = "default_max_false_hit_rate")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub max_false_hit_rate: f64,

    /// `Static` uses one threshold; `PerEntry` learns a threshold per entry
    /// from verified outcomes, under maxFalseHitRate. In `PerEntry` mode,
    /// `threshold` is where candidates start to be considered.
    #[serde(default)]
    pub mode: SemanticMode,

    /// The model per-entry thresholds start from, as `modelcache calibrate`
    /// prints it. Required for `PerEntry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<SemanticPrior>,
}

/// P(right answer | similarity s) = 1 / (1 + exp(-steepness · (s - midpoint))),
/// with each entry's midpoint learned around this one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SemanticPrior {
    /// How fast the chance of a right answer rises with similarity.
    #[schemars(range(min = 0.0))]
    pub steepness: f64,
    /// Similarity at which a new entry's answer is as likely right as wrong.
    #[schemars(range(min = -1.0, max = 2.0))]
    pub midpoint: f64,
    /// Standard deviation of entries' midpoints around `midpoint`.
    #[serde(default = "default_prior_spread")]
    #[schemars(range(min = 0.001, max = 1.0))]
    pub spread: f64,
}

fn default_prior_spread() -> f64 {
    0.1
}

fn default_max_false_hit_rate() -> f64 {
    0.01
}

impl Default for SemanticSettings {
    fn default() -> Self {
        SemanticSettings {
            threshold: None,
            max_false_hit_rate: default_max_false_hit_rate(),
            mode: SemanticMode::default(),
            prior: None,
        }
    }
}

/// Semantic threshold mode: `Static` or `PerEntry`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
// The values are named in the enum's doc, which `kubectl explain` shows. A
// doc comment on a variant reaches only the schema generator, which then
// moves that value within the schema's `enum` (checked: `crds/` would drift).
#[allow(missing_docs)]
pub enum SemanticMode {
    #[default]
    Static,
    PerEntry,
}

/// Invalidation of retired model versions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InvalidationSettings {
    /// `VersionKeyed` sweeps a retired version's keys and nothing else;
    /// `Flush` empties the database (only for a Redis serving this model alone);
    /// `TTLOnly` leaves retired keys to expire.
    #[serde(default)]
    pub strategy: InvalidationStrategy,

    /// Seconds to wait after the last pod of a version is gone before its keys
    /// are swept, so that a quick rollback still finds a warm cache.
    #[serde(default = "default_grace_period")]
    #[schemars(range(min = 0, max = 604_800))]
    pub grace_period_seconds: i64,

    /// `Latency` (the default) sweeps as fast as live traffic allows: it
    /// slows down whenever Redis answers a probe more than
    /// `sweepHeadroomPercent` slower than before the sweep, under a ceiling
    /// of `sweepKeysPerSecond`. `Fixed` sweeps at `sweepKeysPerSecond`.
    #[serde(default)]
    pub sweep_pacing: SweepPacing,

    /// How much slower, in percent, a probe's round trip to Redis may get
    /// during a latency-paced sweep than it was before it.
    #[serde(default = "default_sweep_headroom")]
    #[schemars(range(min = 1, max = 1000))]
    pub sweep_headroom_percent: i64,

    /// Keys deleted per second at most: the rate of a `Fixed` pace, the
    /// ceiling of a `Latency` one.
    #[serde(default = "default_sweep_rate")]
    #[schemars(range(min = 100, max = 10_000_000))]
    pub sweep_keys_per_second: i64,

    /// Keys asked for per SCAN and deleted per pipelined UNLINK.
    #[serde(default = "default_sweep_batch")]
    #[schemars(range(min = 10, max = 100_000))]
    pub sweep_batch: i64,
}

fn default_grace_period() -> i64 {
    300
}
fn default_sweep_rate() -> i64 {
    1_000_000
}
fn default_sweep_headroom() -> i64 {
    25
}
// Small batches keep each round trip short, so a reader's GET never waits
// behind a long pipeline (see the sweep benchmark in docs/benchmarks.md).
fn default_sweep_batch() -> i64 {
    100
}

impl Default for InvalidationSettings {
    fn default() -> Self {
        InvalidationSettings {
            strategy: InvalidationStrategy::default(),
            grace_period_seconds: default_grace_period(),
            sweep_pacing: SweepPacing::default(),
            sweep_headroom_percent: default_sweep_headroom(),
            sweep_keys_per_second: default_sweep_rate(),
            sweep_batch: default_sweep_batch(),
        }
    }
}

/// Invalidation strategy: `VersionKeyed`, `Flush` or `TTLOnly`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
// The values are named in the enum's doc, which `kubectl explain` shows. A
// doc comment on a variant reaches only the schema generator, which then
// moves that value within the schema's `enum` (checked: `crds/` would drift).
#[allow(missing_docs)]
pub enum InvalidationStrategy {
    #[default]
    VersionKeyed,
    Flush,
    #[serde(rename = "TTLOnly")]
    TtlOnly,
}

/// How a sweep is paced: `Latency` or `Fixed`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub enum SweepPacing {
    #[default]
    Latency,
    Fixed,
}

/// Default Redis image and resources.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisDefaults {
    /// Redis or Valkey image (7.0 or newer).
    #[serde(default = "default_redis_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Memory request and limit of the Redis container.
    #[serde(default = "default_redis_memory")]
    pub memory: Quantity,

    /// CPU request of the Redis container.
    #[serde(default = "default_redis_cpu")]
    pub cpu: Quantity,
}

fn default_redis_image() -> String {
    DEFAULT_REDIS_IMAGE.to_string()
}
fn default_redis_memory() -> Quantity {
    Quantity("1Gi".to_string())
}
fn default_redis_cpu() -> Quantity {
    Quantity("250m".to_string())
}

impl Default for RedisDefaults {
    fn default() -> Self {
        RedisDefaults {
            image: default_redis_image(),
            memory: default_redis_memory(),
            cpu: default_redis_cpu(),
        }
    }
}

impl Default for CachePolicySpec {
    fn default() -> Self {
        CachePolicySpec {
            eviction_policy: EvictionPolicy::default(),
            maxmemory_ratio: default_maxmemory_ratio(),
            ttl_seconds: LayerTtls::default(),
            semantic: SemanticSettings::default(),
            invalidation: InvalidationSettings::default(),
            fragmentation_threshold: default_fragmentation_threshold(),
            redis: RedisDefaults::default(),
            gateway: GatewayPolicy::default(),
        }
    }
}

/// Observed state of a CachePolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicyStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions, such as `Accepted`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// ModelCaches in this namespace that reference the policy.
    #[serde(default)]
    pub used_by: i32,
}
