//! `ModelCache`: one model, its versioned artifacts, and the Redis that caches
//! its results.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::conditions_schema;

/// The pod annotation that asks for injection; its value names the
/// ModelCache (the webhook and the node agent read it).
pub const INJECT_ANNOTATION: &str = "modelcache.dev/inject";

/// Name of the pod-template label (or annotation) that carries the model
/// version a pod serves, unless the workload says otherwise.
pub const DEFAULT_VERSION_LABEL: &str = "modelcache.dev/version";

/// A model served on Kubernetes and the caches modelcache owns for it: a Redis
/// configured as a cache, version-scoped keys, verified artifact fetch and
/// prefix-cache warm-up.
// Each printcolumn(...) repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "modelcache.dev",
    version = "v1alpha1",
    kind = "ModelCache",
    plural = "modelcaches",
    shortname = "mc",
    category = "modelcache",
    namespaced,
    status = "ModelCacheStatus",
    derive = "PartialEq",
    validation = Rule::new("size(self.metadata.name) <= 46").message("metadata.name must be at most 46 characters: the Redis StatefulSet is named <name>-redis and its pods' revision label must stay within 63"),
    doc = "ModelCache owns the caches of one served model: a Redis configured as a cache, version-scoped keys that are swept once no pod serves a version, verified artifact fetch and prefix-cache warm-up.",
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model",
        description = "Model name"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.version",
        description = "Desired model version"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether Redis answers with the desired config"
    ),
    printcolumn(
        name = "Hit Rate",
        type_ = "number",
        json_path = ".status.redis.hitRate",
        description = "Keyspace hits / (hits + misses) since Redis started"
    ),
    printcolumn(
        name = "Prefetched",
        type_ = "string",
        json_path = ".status.prefetch.nodes",
        description = "Nodes whose node cache holds spec.version, of those spec.prefetch selects (ready/total)"
    ),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = ".status.activeVersion",
        description = "Version published as active in the registry",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelCacheSpec {
    /// Model name. It names the artifact directory (`<source>/<model>/`) and is part
    /// of every cache key, so it is limited to letters, digits, `.`, `_` and `-`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub model: String,

    /// Model version to serve, for example `v3` or `2026-11-01`. Artifacts are read
    /// from `<source>/<model>/<version>/`; changing it starts a rollout, and the
    /// previous version's cache keys are swept once no pod serves it any more.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[^/\s]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("version must not be '.' or '..': it names a directory"))]
    pub version: String,

    /// Where versioned model artifacts are published.
    pub source: ArtifactSource,

    /// CachePolicy in this namespace whose settings apply. Without it the
    /// built-in defaults apply (allkeys-lru, maxmemory at 0.8 of the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_policy_ref: Option<LocalRef>,

    /// The workload that serves this model, followed to learn which versions
    /// are still served during a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,

    /// Overrides of the policy's Redis settings for this model only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisOverrides>,

    /// Prefix-cache warm-up before model pods turn ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<WarmupSettings>,

    /// An OpenAI-compatible caching gateway: clients point their base URL at
    /// it and get the version-scoped caches with no code change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySettings>,

    /// Prefetch on rollout: the node cache agents (the chart's
    /// `nodeCache`) of the matching nodes pull `version` into their node
    /// caches as soon as it is set, before its pods arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PrefetchSettings>,
}

/// Which nodes prefetch each new version.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchSettings {
    /// Labels a node must have (all of them) for its agent to prefetch,
    /// e.g. the workload's GPU node pool. Empty: the nodes the workload
    /// (`spec.workload`, by name) may run on, by its pod template's
    /// nodeSelector and required node affinity; without one, every node
    /// with an agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// The caching gateway: `modelcache gateway` in front of the model's engine
/// (`Sidecar`, injected into the model pods, serving the pod's own version)
/// or of an external API (`Standalone`, a Deployment and Service the
/// controller runs, serving the registry's active version, which is this
/// ModelCache's `version` once rolled out). Sharing and sampling come from
/// the CachePolicy's `gateway`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode == 'Sidecar' || has(self.upstreamUrl)").message("a Standalone gateway needs upstreamUrl: the API it fronts, e.g. https://api.openai.com"),
)]
pub struct GatewaySettings {
    /// `Sidecar` (default) or `Standalone`.
    #[serde(default)]
    pub mode: GatewayMode,

    /// The upstream's base URL. Sidecar: the engine as seen from inside the
    /// pod (default `http://127.0.0.1:8000`); Standalone: the API, e.g.
    /// `https://api.openai.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^/\s]+(/\S*)?$"))]
    pub upstream_url: Option<String>,

    /// A Secret key with the API key the gateway sends upstream instead of
    /// the caller's (an external API paid for centrally). Unset: callers'
    /// keys are passed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key_secret_ref: Option<SecretKeyRef>,

    /// Standalone: gateway replicas.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,

    /// The port clients call (the admin port, with /metrics, is the next).
    #[serde(default = "default_gateway_port")]
    #[schemars(range(min = 1024, max = 65534))]
    pub port: i32,

    /// Upstream prices, for the estimated cost saved (metrics and status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<TokenPrice>,

    /// The semantic layer: paraphrases of a cached question are answered
    /// from the cache. Its threshold is the CachePolicy's
    /// `semantic.threshold`, which must then be set. Unset: exact hits only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<GatewaySemantic>,
}

/// The gateway's semantic layer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySemantic {
    /// The embedding model (a sentence-transformers BERT directory such as
    /// all-MiniLM-L6-v2: config.json, model.safetensors, tokenizer.json),
    /// published with `modelcache publish` beside the weights, at
    /// `<source>/<name>/<version>/`. An init container fetches and verifies
    /// it with the source's credentials, as it does the weights.
    pub embedding_model: EmbeddingModelRef,

    /// Semantic entries each gateway keeps in its index at most.
    #[serde(default = "default_semantic_max_entries")]
    #[schemars(range(min = 1, max = 10000000))]
    pub max_entries: u32,
}

/// A published embedding model: `<source>/<name>/<version>/`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddingModelRef {
    /// Its directory under the source, as for `model`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub name: String,
    /// Its version directory. A new version starts new gateway pods (their
    /// semantic index is rebuilt from Redis with the new embeddings' model).
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[^/\s]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("embeddingModel.version must not be '.' or '..': it names a directory"))]
    pub version: String,
}

fn default_semantic_max_entries() -> u32 {
    100_000
}

/// Gateway placement: `Sidecar` or `Standalone`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
// The values are named in the enum's doc (see CachePolicy's EvictionPolicy).
#[allow(missing_docs)]
pub enum GatewayMode {
    #[default]
    Sidecar,
    Standalone,
}

/// Prices per 1,000 tokens, in any currency.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenPrice {
    /// Per 1,000 prompt (input) tokens.
    #[schemars(range(min = 0.0))]
    pub input_per_1k: f64,
    /// Per 1,000 completion (output) tokens.
    #[schemars(range(min = 0.0))]
    pub output_per_1k: f64,
}

fn default_gateway_replicas() -> i32 {
    2
}

fn default_gateway_port() -> i32 {
    8090
}

/// The upstream of a sidecar gateway without `upstreamUrl`.
pub const DEFAULT_GATEWAY_UPSTREAM: &str = "http://127.0.0.1:8000";

/// Location of versioned model artifacts: `<uri>/<model>/<version>/` holds the
/// files and a `manifest.json` listing path, size and sha256 of each.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.cdn) || self.uri.startsWith('https://')").message("cdn settings apply only to an https:// source"),
    validation = Rule::new("self.uri.startsWith('s3://') || (!has(self.endpoint) && !has(self.region) && !has(self.credentialsSecretRef) && !(has(self.pathStyle) && self.pathStyle))").message("endpoint, region, pathStyle and credentialsSecretRef apply only to an s3:// source"),
)]
pub struct ArtifactSource {
    /// Base URI: `s3://bucket/prefix` for S3 or an S3-compatible store, or
    /// `https://host/prefix` for a CDN such as CloudFront.
    #[schemars(
        length(min = 6, max = 2048),
        regex(
            pattern = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|https://[^/\s]+(/\S*)?)$"
        )
    )]
    #[x_kube(validation = Rule::new("self.startsWith('s3://') || self.startsWith('https://')").message("uri must be s3://bucket/prefix or https://host/prefix"))]
    pub uri: String,

    /// Endpoint of an S3-compatible store (MinIO, Ceph RGW, R2). Empty for AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^/\s]+(/\S*)?$"))]
    pub endpoint: Option<String>,

    /// Region of the bucket. Empty: taken from the environment (AWS_REGION).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,

    /// Address buckets by path (`endpoint/bucket/key`) instead of by virtual
    /// host, as most S3-compatible stores need.
    #[serde(default)]
    pub path_style: bool,

    /// Secret with keys `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// optionally `AWS_SESSION_TOKEN`. Empty: the default credential chain
    /// (web identity / IRSA, profile, environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalRef>,

    /// Headers and URL signing for an https:// (CDN) source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdn: Option<CdnSettings>,
}

/// Request settings for a CDN origin.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CdnSettings {
    /// Extra request headers, for example a shared-secret header the origin
    /// checks. Values here are visible to anyone who can read this object; put
    /// secrets in `headersSecretRef` instead.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,

    /// Secret whose keys are header names and whose values are sent as headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret_ref: Option<LocalRef>,

    /// CloudFront signed URLs or signed cookies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<CloudFrontSigning>,
}

/// CloudFront signing with a key pair whose private key is held in a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudFrontSigning {
    /// ID of the CloudFront public key (or legacy key pair) that signs.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Z0-9]+$"))]
    pub key_pair_id: String,

    /// Secret key holding the PEM-encoded RSA private key.
    pub private_key_secret_ref: SecretKeyRef,

    /// `SignedUrl` adds the signature to each request's query string;
    /// `SignedCookies` sends it as CloudFront cookies.
    #[serde(default)]
    pub mode: SigningMode,

    /// `Canned` signs one URL; `Custom` signs a wildcard over the version's
    /// directory, so one signature covers every file.
    #[serde(default)]
    pub policy: SigningPolicy,

    /// Lifetime of each signature in seconds. Signatures are renewed before they
    /// expire during long downloads.
    #[serde(default = "default_signature_ttl")]
    #[schemars(range(min = 60, max = 604800))]
    pub expires_seconds: i64,
}

fn default_signature_ttl() -> i64 {
    3600
}

/// How CloudFront signatures travel: `SignedUrl` or `SignedCookies`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
// The values are named in the enum's doc, which `kubectl explain` shows. A
// doc comment on a variant reaches only the schema generator, which then
// moves that value within the schema's `enum` (checked: `crds/` would drift).
#[allow(missing_docs)]
pub enum SigningMode {
    #[default]
    SignedUrl,
    SignedCookies,
}

/// Which CloudFront policy is signed: `Canned` or `Custom`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
// The values are named in the enum's doc, which `kubectl explain` shows. A
// doc comment on a variant reaches only the schema generator, which then
// moves that value within the schema's `enum` (checked: `crds/` would drift).
#[allow(missing_docs)]
pub enum SigningPolicy {
    Canned,
    #[default]
    Custom,
}

/// Reference to an object in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LocalRef {
    /// Name of the object.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Reference to one key of a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The workload whose pods serve the model: a Deployment or StatefulSet by
/// name, or pods by label selector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.name) != has(self.selector)").message("set exactly one of workload.name or workload.selector"),
    validation = Rule::new("!has(self.selector) || !has(self.kind)").message("workload.kind applies only with workload.name"),
)]
pub struct WorkloadRef {
    /// Kind of the named workload: `Deployment` (default) or `StatefulSet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<WorkloadKind>,

    /// Name of the Deployment or StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,

    /// Selects the model pods directly, for workloads of other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// Pod label or annotation that holds the model version each pod serves.
    /// Put it on the pod template; the downward API passes it to the fetch init
    /// container.
    #[serde(default = "default_version_label")]
    #[schemars(length(min = 1, max = 317))]
    pub version_label: String,
}

fn default_version_label() -> String {
    DEFAULT_VERSION_LABEL.to_string()
}

/// Kind of a named workload: `Deployment` or `StatefulSet`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
// The values are named in the enum's doc, which `kubectl explain` shows. A
// doc comment on a variant reaches only the schema generator, which then
// moves that value within the schema's `enum` (checked: `crds/` would drift).
#[allow(missing_docs)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    StatefulSet,
}

/// Per-model overrides of the CachePolicy's Redis settings. Unset fields
/// inherit from the policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.external) || (!has(self.image) && !has(self.memory) && !has(self.cpu))").message("image, memory and cpu size a provisioned Redis; they do not apply with redis.external"),
)]
pub struct RedisOverrides {
    /// Redis or Valkey image (7.0 or newer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Memory request and limit of the Redis container. maxmemory is the
    /// policy's ratio of this, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,

    /// CPU request of the Redis container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,

    /// Use an existing Redis instead of provisioning one: a managed service,
    /// or a Redis Cluster for caches that outgrow one instance. The controller
    /// then creates no Redis objects; it reads and reports the config it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedis>,
}

/// An existing Redis that the controller checks but does not manage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRedis {
    /// `redis://host:port[/db]` or `rediss://` for TLS, without credentials.
    #[schemars(length(max = 2048), regex(pattern = r"^rediss?://[^\s@]+$"))]
    #[x_kube(validation = Rule::new("!self.contains('@')").message("put credentials in redis.external.passwordSecretRef, not in the URL"))]
    pub url: String,

    /// Secret key holding the password. The controller sends it to `url`, so
    /// the Secret must allow this ModelCache with the annotation
    /// `modelcache.dev/allowed-modelcaches` (comma-separated names, or `*`).
    /// Unset: the Redis needs no password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,

    /// ACL user to authenticate as. Unset: the default user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub username: Option<String>,

    /// The URL is one node of a Redis Cluster; sweeps then scan every primary.
    #[serde(default)]
    pub cluster: bool,
}

/// Prefix-cache warm-up: shared prompt prefixes sent to the inference engine
/// before the pod turns ready.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(has(self.prompts) && size(self.prompts) > 0) != has(self.promptsConfigMapRef)").message("set exactly one of warmup.prompts or warmup.promptsConfigMapRef"),
)]
pub struct WarmupSettings {
    /// Shared prefixes (system prompts, few-shot headers) to warm, inline.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub prompts: Vec<String>,

    /// ConfigMap key holding prompts, one JSON string per line (JSONL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts_config_map_ref: Option<ConfigMapKeyRef>,

    /// OpenAI-compatible engine that the warm sidecar primes, as seen from
    /// inside the pod, for example `http://127.0.0.1:8000`.
    #[serde(default = "default_engine_url")]
    #[schemars(regex(pattern = r"^https?://[^/\s]+(/\S*)?$"))]
    pub engine_url: String,

    /// Prefixes sent to the engine at once.
    #[serde(default = "default_warm_concurrency")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: i32,
}

fn default_engine_url() -> String {
    "http://127.0.0.1:8000".to_string()
}

fn default_warm_concurrency() -> i32 {
    4
}

/// Reference to one key of a ConfigMap in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key within the ConfigMap.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Observed state of a ModelCache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelCacheStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions: `Ready` (Redis answers with the desired config),
    /// `ConfigApplied`, `SpecValid`, `Fragmented`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// Version published as active in the version registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,

    /// Every version that still has cache keys, with its phase.
    #[serde(default)]
    pub versions: Vec<VersionStatus>,

    /// Facts read from the model's Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisStatus>,

    /// The caching gateway: readiness and what it saved, summed over every
    /// gateway of the model since its Redis started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,

    /// Prefetch on rollout (`spec.prefetch`): which nodes hold `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PrefetchStatus>,
}

/// Where prefetch on rollout stands, from the node cache agents.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchStatus {
    /// The version prefetched (`spec.version`).
    pub version: String,
    /// `ready/total`, e.g. `3/3`.
    pub nodes: String,
    /// Nodes whose node cache holds the version.
    pub ready: i32,
    /// Nodes that prefetch it (their labels match), and agents that did not
    /// answer (their nodes may).
    pub total: i32,
    /// Each of those nodes.
    #[serde(default)]
    pub progress: Vec<NodePrefetch>,
    /// Where the workload's pods may run, from its pod template (its
    /// `nodeSelector`), which the agents match when
    /// `spec.prefetch.nodeSelector` is empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// The pod template's required node affinity, matched with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<k8s_openapi::api::core::v1::NodeSelector>,
}

/// One node's prefetch.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodePrefetch {
    /// The node.
    pub node: String,
    /// `Ready`, `Downloading`, `Failed`, `Pending` (the agent has not looked
    /// yet) or `Unknown` (the agent did not answer).
    pub phase: String,
    /// Bytes downloaded so far.
    #[serde(default)]
    pub downloaded_bytes: i64,
    /// Bytes of the version, once its manifest is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_bytes: Option<i64>,
    /// downloadedBytes / versionBytes, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
    /// Seconds left at the pace so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// Why it failed, or why the agent did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the gateways of a model report.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Standalone: the gateway Service's in-cluster URL, the clients' base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Standalone: ready replicas of the gateway Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Chat and completions requests served.
    pub requests: i64,
    /// Of them, answered without an upstream call (hits, semantic hits,
    /// coalesced).
    pub hits: i64,
    /// hits / requests (bypassed requests excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_rate: Option<f64>,
    /// Prompt plus completion tokens the upstream did not process.
    pub tokens_saved: i64,
    /// Estimated cost saved, at `spec.gateway.price`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_saved: Option<f64>,
}

/// Lifecycle of one model version's cache keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionStatus {
    /// The model version.
    pub version: String,
    /// `Live` (pods serve it), `Draining` (no pods, grace period running),
    /// `Sweeping` (its keys are being deleted) or `Swept`.
    pub phase: VersionPhase,
    /// When the version entered this phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Pods that serve this version.
    #[serde(default)]
    pub pods: i32,
    /// The ready ones among them (the others still fetch weights or warm
    /// the prefix cache). Reported where `spec.workload` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_pods: Option<i32>,
    /// Keys of this version found by the last count or sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<i64>,
    /// The sha256 of the version's manifest, read from the source once by
    /// the controller while the version is live. Injected fetches refuse
    /// any other manifest, from a node agent or from the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub manifest_digest: Option<String>,
}

/// Phase of a version: `Live`, `Draining`, `Sweeping` or `Swept`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
// The values are named in the enum's doc, which `kubectl explain` shows. A
// doc comment on a variant reaches only the schema generator, which then
// moves that value within the schema's `enum` (checked: `crds/` would drift).
#[allow(missing_docs)]
pub enum VersionPhase {
    Live,
    Draining,
    Sweeping,
    Swept,
}

/// Config and health of the model's Redis, as last read from it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RedisStatus {
    /// host:port that serving code connects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Config the controller wants (parameter to value, as CONFIG GET prints it).
    #[serde(default)]
    pub desired_config: BTreeMap<String, String>,
    /// Config read back from Redis with CONFIG GET.
    #[serde(default)]
    pub applied_config: BTreeMap<String, String>,
    /// INFO used_memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_memory_bytes: Option<i64>,
    /// INFO maxmemory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxmemory_bytes: Option<i64>,
    /// INFO mem_fragmentation_ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fragmentation_ratio: Option<f64>,
    /// INFO evicted_keys since Redis started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted_keys: Option<i64>,
    /// keyspace_hits / (keyspace_hits + keyspace_misses), 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_rate: Option<f64>,
    /// When these facts were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<Time>,
}
