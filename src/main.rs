//! The `modelcache` command line. It parses arguments and calls the library;
//! everything it does is in `modelcache::*`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use modelcache::artifact::governor::Concurrency;
use modelcache::crd::cache_policy::CachePolicySpec;
use modelcache::crd::model_cache::RedisOverrides;
use modelcache::keyspace::sweep;
use modelcache::store::RedisTarget;
use modelcache::{controller, crd};

/// Caches for ML serving on Kubernetes: a Redis per model configured as a
/// cache, version-scoped keys swept after rollouts, verified model fetch and
/// prefix-cache warm-up.
#[derive(Parser)]
#[command(name = "modelcache", version, about, long_about = None)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "MODELCACHE_LOG_JSON")]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ModelCache and CachePolicy CRDs as one YAML stream.
    Crd {
        /// Write one file per CRD into this directory instead.
        #[arg(long, value_name = "DIR", conflicts_with = "check")]
        out_dir: Option<PathBuf>,
        /// Exit 1 when the files in this directory differ from the types.
        #[arg(long, value_name = "DIR")]
        check: Option<PathBuf>,
    },
    /// Validate ModelCache and CachePolicy manifests against the CRD schemas,
    /// CEL rules included. Exit 1 when any resource is invalid.
    Validate {
        /// YAML files, each with one or more documents; `-` reads standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Run the controller: one Redis per ModelCache, configured as a cache,
    /// with its config and health kept true in status.
    Controller(ControllerArgs),
    /// Run the controller's config and health logic once against a Redis:
    /// print desired vs applied config, INFO facts and the conditions.
    CheckRedis(CheckRedisArgs),
    /// Delete every cache key of a model's versions except those kept, for
    /// users without the controller and for CI/CD hooks.
    ///
    /// Exit codes: 0 done (or nothing to do); 1 failed (Redis unreachable, a
    /// command refused); 2 usage error; 3 refused because it would sweep the
    /// registry's active version.
    Invalidate(InvalidateArgs),
    /// Pull a version of a model into a directory, verified against its
    /// sha256 manifest, in parallel, resumable, through a node-local cache.
    /// Every option can come from the environment (init containers).
    ///
    /// Exit codes: 0 done; 1 local I/O failure; 2 bad arguments; 4 the origin
    /// refused (403/404: credentials, signature, version not published); 5
    /// integrity (a digest mismatch twice, an object shorter than its manifest
    /// entry, an invalid manifest, a path that leaves the destination); 6 not enough disk space; 7 transient failures
    /// outlasted the retries or the deadline (progress is kept for the next run).
    Fetch(Box<FetchArgs>),
    /// Release a directory as a version: build its sha256 manifest, upload
    /// the files, then the manifest. Versions are immutable.
    ///
    /// Exit codes: 0 published (or already published with the same bytes);
    /// 1 failed; 2 bad input; 3 the version exists with different content; 4
    /// the store refused an upload.
    Publish(PublishArgs),
    /// Exact KV-cache size for a model: 2 × layers × KV heads × head dim ×
    /// bytes per element × tokens × batch, from config.json, GGUF metadata
    /// or flags (flags win). Exit codes: 0; 2 bad input.
    KvSize(KvSizeArgs),
    /// Pick the semantic-cache threshold from labeled pairs (JSONL, gzip
    /// allowed: a, b, equivalent): precision, recall and hit rate per
    /// threshold, the lowest threshold whose false-hit rate meets the target
    /// with 95% confidence, and a check on held-out pairs. Exit codes: 0
    /// picked; 2 bad input; 3 no threshold meets the target.
    Calibrate(CalibrateArgs),
    /// Report NVIDIA GPUs: name, compute capability, total and free memory.
    /// Without a driver it says so and exits 0. Exit codes: 0; 1 the driver
    /// failed.
    Gpu {
        #[arg(long)]
        json: bool,
    },
    /// Warm the prefix cache. Engine mode (--engine-url): fill an
    /// OpenAI-compatible engine's prefix cache (vLLM, SGLang, llama.cpp's
    /// server) as a native sidecar: /readyz turns 200 only once the prompts
    /// are warm, and again after the engine restarts. Exit codes (--once): 0
    /// warm; 2 bad input; 3 engine unreachable; 4 engine refused.
    ///
    /// In-process mode (--weights): prefill each prompt with candle and store
    /// its KV in 16-token blocks under --prefix-cache, salted by the version's
    /// manifest digest; prints a JSON report and exits. Exit codes: 0 warm; 1
    /// failed (I/O); 2 bad input (model, tokenizer, prompts, digest, device);
    /// 3 the GPU lacks the memory.
    Warm(WarmArgs),
    /// Serve an OpenAI-compatible caching gateway in front of one upstream
    /// (the OpenAI API, vLLM, SGLang, llama.cpp's server): chat and
    /// completions through the version-scoped exact layer, per caller,
    /// streamed hits replayed chunk for chunk, identical concurrent misses
    /// coalesced; anything else passed through. A cache failure never fails a
    /// request. Exit codes: 0 stopped; 1 failed to serve; 2 bad input.
    Gateway(Box<GatewayArgs>),
    /// Run the node cache agent (a DaemonSet): serve verified blobs from the
    /// node cache to the injected pods of this node, proven by their
    /// projected service-account tokens, downloading each version from its
    /// origin once per node. Exit codes: 0 stopped; 1 failed to serve; 2 bad
    /// input.
    Node(NodeArgs),
    /// Print the version and the API version served.
    Version,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Where pods call: this node's address and the agent's port.
    #[arg(long, env = "MODELCACHE_NODE_LISTEN", default_value = "0.0.0.0:8095", value_parser = listen_arg)]
    listen: std::net::SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "MODELCACHE_NODE_ADMIN_LISTEN",
        default_value = "0.0.0.0:8096",
        value_parser = listen_arg
    )]
    admin_listen: std::net::SocketAddr,
    /// This node's name (the downward API's spec.nodeName): only pods
    /// scheduled here are served.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The node cache (a hostPath).
    #[arg(
        long,
        env = "MODELCACHE_CACHE_DIR",
        default_value = "/var/lib/modelcache"
    )]
    cache_dir: PathBuf,
    /// Most bytes the node cache keeps, as a quantity (200Gi).
    #[arg(long, env = "MODELCACHE_CACHE_QUOTA", value_parser = quantity_arg)]
    cache_quota: Option<u64>,
    /// Requests in flight per version downloaded from an origin: `auto`
    /// (found while it runs, up to --max-concurrency) or a number.
    #[arg(long, env = "MODELCACHE_CONCURRENCY", default_value = "auto")]
    concurrency: Concurrency,
    /// The most requests in flight that `--concurrency auto` tries.
    #[arg(long, env = "MODELCACHE_MAX_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_concurrency: u16,
    /// Seconds a version's download may take.
    #[arg(long, env = "MODELCACHE_DEADLINE", default_value_t = 7200)]
    deadline: u64,
    /// Attempts per origin request.
    #[arg(long, env = "MODELCACHE_RETRIES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    retries: u32,
    /// Seconds between looks for versions to prefetch (ModelCaches with
    /// spec.prefetch matching this node); 0: no prefetch.
    #[arg(long, env = "MODELCACHE_PREFETCH_INTERVAL", default_value_t = 30)]
    prefetch_interval: u64,
    /// Prefetch the ModelCaches of this namespace only (the chart's
    /// watchNamespace). Empty: every namespace.
    #[arg(long, env = "MODELCACHE_WATCH_NAMESPACE")]
    namespace: Option<String>,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("versions").required(true).args(["version", "follow_registry"])))]
struct GatewayArgs {
    /// The upstream's base URL, e.g. http://127.0.0.1:8000 or https://api.openai.com.
    #[arg(long, env = "MODELCACHE_UPSTREAM_URL")]
    upstream: String,
    /// A key sent upstream instead of the caller's Authorization (an
    /// external API); by default the caller's is passed on.
    #[arg(long, env = "MODELCACHE_UPSTREAM_KEY", hide_env_values = true)]
    upstream_key: Option<String>,
    /// The ModelCache's model: its keys and the metrics' label.
    #[arg(long, env = "MODELCACHE_MODEL")]
    model: String,
    /// Serve this version's entries (sidecar: the pod's own version).
    #[arg(long, env = "MODELCACHE_VERSION")]
    version: Option<String>,
    /// Serve the registry's active version (standalone), following rollouts.
    #[arg(long)]
    follow_registry: bool,
    /// The model's Redis (redis://host:port[/db]); without it the gateway
    /// is a plain proxy.
    #[arg(long, env = "MODELCACHE_REDIS_URL")]
    redis_url: Option<String>,
    /// Redis password (better from the environment).
    #[arg(long, env = "MODELCACHE_REDIS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Redis ACL user, if not `default`.
    #[arg(long, env = "MODELCACHE_REDIS_USERNAME")]
    redis_username: Option<String>,
    /// The gateway's secret (at least 16 bytes): callers' scopes are HMACs
    /// of their Authorization under it. Every replica needs the same one.
    #[arg(long, env = "MODELCACHE_GATEWAY_SECRET", hide_env_values = true)]
    secret: String,
    /// Who shares entries: each credential its own (callers without one share
    /// an anonymous scope), credentials required (401 without), or everyone
    /// (an explicit opt-in).
    #[arg(
        long,
        env = "MODELCACHE_GATEWAY_SHARING",
        value_enum,
        default_value = "per-credential"
    )]
    sharing: SharingArg,
    /// Cache sampled requests (temperature > 0) and n > 1 too.
    #[arg(long, env = "MODELCACHE_GATEWAY_ALLOW_SAMPLING")]
    allow_sampling: bool,
    /// Entries expire after this many seconds; 0 keeps them until evicted or swept.
    #[arg(long, env = "MODELCACHE_GATEWAY_TTL", default_value_t = 0)]
    ttl: u64,
    /// A Redis lookup slower than this (milliseconds) is a miss.
    #[arg(long, env = "MODELCACHE_GATEWAY_LATENCY_BUDGET_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    latency_budget_ms: u64,
    /// Serving address.
    #[arg(long, env = "MODELCACHE_GATEWAY_ADDR", default_value = "0.0.0.0:8090")]
    listen: std::net::SocketAddr,
    /// /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "MODELCACHE_GATEWAY_ADMIN_ADDR",
        default_value = "0.0.0.0:8091"
    )]
    admin_addr: std::net::SocketAddr,
    /// Price per 1,000 prompt tokens, for the estimated cost saved.
    #[arg(long, env = "MODELCACHE_PRICE_INPUT_PER_1K", default_value_t = 0.0)]
    price_input_per_1k: f64,
    /// Price per 1,000 completion tokens.
    #[arg(long, env = "MODELCACHE_PRICE_OUTPUT_PER_1K", default_value_t = 0.0)]
    price_output_per_1k: f64,
    /// Do not ask a streaming upstream for the usage chunk the client did
    /// not ask for (for upstreams that refuse stream_options).
    #[arg(long)]
    no_upstream_usage: bool,
    /// The semantic layer: a sentence-transformers BERT directory
    /// (config.json, model.safetensors, tokenizer.json), e.g. all-MiniLM-L6-v2.
    #[arg(
        long,
        env = "MODELCACHE_EMBEDDING_MODEL",
        requires = "semantic_threshold"
    )]
    embedding_model: Option<PathBuf>,
    /// The semantic layer's cosine threshold, from `modelcache calibrate`
    /// (the CachePolicy's semantic.threshold).
    #[arg(long, env = "MODELCACHE_SEMANTIC_THRESHOLD", requires = "embedding_model", value_parser = threshold_arg)]
    semantic_threshold: Option<f32>,
    /// How often (seconds) this gateway adds its counts to the model's
    /// counters in Redis, which the controller reports in status.
    #[arg(long, env = "MODELCACHE_GATEWAY_REPORT_INTERVAL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    report_interval: u64,
    /// Semantic entries kept at most.
    #[arg(
        long,
        env = "MODELCACHE_SEMANTIC_MAX_ENTRIES",
        default_value_t = 100_000
    )]
    semantic_max_entries: usize,
}

/// A cosine threshold: a number in (0, 1].
fn threshold_arg(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(t) if t > 0.0 && t <= 1.0 => Ok(t),
        _ => Err(format!(
            "{s:?} is not a cosine threshold in (0, 1]; take the one `modelcache calibrate` picks"
        )),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SharingArg {
    PerCredential,
    CredentialRequired,
    Shared,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["engine_url", "weights"])))]
struct WarmArgs {
    /// Engine mode: the engine's base URL, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "MODELCACHE_ENGINE_URL")]
    engine_url: Option<String>,
    /// In-process mode: a Llama-family `.gguf` file, or a directory with
    /// config.json, *.safetensors and tokenizer.json.
    #[arg(long, env = "MODELCACHE_WEIGHTS")]
    weights: Option<PathBuf>,
    /// In-process: dequantize GGUF weights to f32 at load (exact, more memory).
    #[arg(long, requires = "weights")]
    dequantize: bool,
    /// In-process: a tokenizer.json; by default the one beside the weights,
    /// else (GGUF) the vocabulary and merges in the GGUF.
    #[arg(long, env = "MODELCACHE_TOKENIZER", requires = "weights")]
    tokenizer: Option<PathBuf>,
    /// In-process: where the KV blocks go (the pod's shared volume).
    #[arg(long, env = "MODELCACHE_PREFIX_CACHE", requires = "weights")]
    prefix_cache: Option<PathBuf>,
    /// In-process: the version's manifest digest; by default read from the
    /// `.modelcache/complete` marker `modelcache fetch` wrote beside the weights.
    #[arg(long, env = "MODELCACHE_MANIFEST_DIGEST", requires = "weights", value_parser = digest_arg)]
    manifest_digest: Option<String>,
    /// In-process: `cpu`, or `cuda:N` (builds with the `cuda` feature).
    #[arg(long, env = "MODELCACHE_DEVICE", default_value = "cpu")]
    device: String,
    /// The shared prefixes: a JSON array of strings, or prompts separated by
    /// lines holding only `---`. First is most important.
    #[arg(long, env = "MODELCACHE_PROMPTS")]
    prompts: PathBuf,
    /// The `model` field of completions, when the engine needs one.
    #[arg(long, env = "MODELCACHE_ENGINE_MODEL")]
    model: Option<String>,
    /// Prompts warmed at once.
    #[arg(long, env = "MODELCACHE_WARM_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Address of /readyz, /healthz and /report.
    #[arg(long, env = "MODELCACHE_WARM_ADDR", default_value = "0.0.0.0:8089")]
    ready_addr: std::net::SocketAddr,
    /// Seconds between checks that the engine is still up.
    #[arg(long, env = "MODELCACHE_ENGINE_CHECK_INTERVAL", default_value_t = 2)]
    check_interval: u64,
    /// Warm once, print the report as JSON and exit (for jobs and tests).
    #[arg(long)]
    once: bool,
    /// With --once: seconds to wait for the engine.
    #[arg(long, default_value_t = 600)]
    wait: u64,
}

#[derive(clap::Args)]
struct CalibrateArgs {
    /// Labeled pairs: JSONL with a, b and equivalent, optionally gzipped.
    #[arg(long)]
    pairs: PathBuf,
    /// A sentence-transformers BERT directory (config.json,
    /// model.safetensors, tokenizer.json), e.g. all-MiniLM-L6-v2.
    #[arg(long, env = "MODELCACHE_EMBEDDING_MODEL")]
    embedding_model: PathBuf,
    /// The CachePolicy's semantic.maxFalseHitRate.
    #[arg(long, default_value_t = 0.01)]
    max_false_hit_rate: f64,
    /// Use only the first N pairs.
    #[arg(long)]
    limit: Option<usize>,
    /// Share of the pairs held out to check the pick.
    #[arg(long, default_value_t = 0.25)]
    held_out: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct KvSizeArgs {
    /// A Hugging Face config.json.
    #[arg(long, conflicts_with = "gguf")]
    config: Option<PathBuf>,
    /// A GGUF model file (only its metadata is read).
    #[arg(long)]
    gguf: Option<PathBuf>,
    #[arg(long)]
    layers: Option<u64>,
    /// Key/value heads (fewer than attention heads under grouped-query attention).
    #[arg(long)]
    kv_heads: Option<u64>,
    #[arg(long)]
    head_dim: Option<u64>,
    /// Tokens per sequence (context length).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    tokens: u64,
    /// Sequences held at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Element type of the cache.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: modelcache::model::kv_size::KvDtype,
    /// Print JSON instead of the formula.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct S3Args {
    /// S3-compatible endpoint, e.g. http://minio:9000 (AWS S3 when unset).
    #[arg(long, env = "MODELCACHE_S3_ENDPOINT")]
    endpoint: Option<String>,
    /// Region; otherwise the default chain (AWS_REGION, profile), else us-east-1.
    #[arg(long, env = "MODELCACHE_S3_REGION")]
    region: Option<String>,
    /// Address the bucket in the path (most S3-compatible stores).
    #[arg(long, env = "MODELCACHE_S3_PATH_STYLE")]
    path_style: bool,
}

#[derive(clap::Args)]
struct FetchArgs {
    /// s3://bucket/prefix, https://cdn.example/prefix or file:///dir; the
    /// version is at <source>/<model>/<version>/.
    #[arg(long, env = "MODELCACHE_SOURCE")]
    source: String,
    #[arg(long, env = "MODELCACHE_MODEL")]
    model: String,
    #[arg(long, env = "MODELCACHE_VERSION")]
    version: String,
    /// Directory that receives the files (created if missing).
    #[arg(long, env = "MODELCACHE_DEST")]
    dest: PathBuf,
    /// Node-local cache shared by the pods of a node (e.g. a hostPath).
    #[arg(long, env = "MODELCACHE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Most bytes the node cache keeps, as a quantity (200Gi); least recently
    /// used versions that no pod pins are evicted beyond it.
    #[arg(long, env = "MODELCACHE_CACHE_QUOTA", requires = "cache_dir", value_parser = quantity_arg)]
    cache_quota: Option<u64>,
    /// Copy files out of the node cache instead of hard-linking them: for
    /// pods that do not trust each other (another tenant's pod could write
    /// through a link it shares with the cache; a copy shares nothing).
    #[arg(long, env = "MODELCACHE_CACHE_COPY", requires = "cache_dir")]
    cache_copy: bool,
    /// Requests in flight at once: `auto` (more while throughput grows, up
    /// to --max-concurrency) or a number.
    #[arg(long, env = "MODELCACHE_CONCURRENCY", default_value = "auto")]
    concurrency: Concurrency,
    /// The most requests in flight that `--concurrency auto` tries.
    #[arg(long, env = "MODELCACHE_MAX_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_concurrency: u16,
    /// Bytes per ranged request, as a quantity (16Mi); adaptive (8 to 64 MiB) when unset.
    #[arg(long, env = "MODELCACHE_PART_SIZE", value_parser = quantity_arg)]
    part_size: Option<u64>,
    /// Seconds the whole fetch may take.
    #[arg(long, env = "MODELCACHE_DEADLINE", default_value_t = 7200)]
    deadline: u64,
    /// Attempts per request before a transient failure (5xx, 429, reset,
    /// timeout, truncated body) is final.
    #[arg(long, env = "MODELCACHE_RETRIES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    retries: u32,
    /// First retry delay in milliseconds; doubles up to 10 s, with full jitter.
    #[arg(
        long,
        env = "MODELCACHE_RETRY_BASE_MS",
        default_value_t = 200,
        hide = true
    )]
    retry_base_ms: u64,
    /// Seconds without data before a request is retried.
    #[arg(long, env = "MODELCACHE_IDLE_TIMEOUT", default_value_t = 30)]
    idle_timeout: u64,
    #[command(flatten)]
    s3: S3Args,
    /// Extra header for HTTP origins, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// File of `Name: value` lines (a mounted Secret), for headers that are secrets.
    #[arg(long, env = "MODELCACHE_HEADERS_FILE")]
    headers_file: Option<PathBuf>,
    /// A mounted Secret whose keys are header names and whose values are
    /// sent as headers (a CDN source's `headersSecretRef`).
    #[arg(long, env = "MODELCACHE_HEADERS_DIR")]
    headers_dir: Option<PathBuf>,
    /// CloudFront key pair ID (the public key's ID in the key group).
    #[arg(
        long,
        env = "MODELCACHE_CLOUDFRONT_KEY_PAIR_ID",
        requires = "cloudfront_private_key"
    )]
    cloudfront_key_pair_id: Option<String>,
    /// PEM file of the CloudFront private key (a mounted Secret).
    #[arg(
        long,
        env = "MODELCACHE_CLOUDFRONT_PRIVATE_KEY",
        requires = "cloudfront_key_pair_id"
    )]
    cloudfront_private_key: Option<PathBuf>,
    #[arg(
        long,
        env = "MODELCACHE_CLOUDFRONT_MODE",
        value_enum,
        default_value = "signed-url"
    )]
    cloudfront_mode: modelcache::artifact::cloudfront::Mode,
    /// Canned signs each URL; custom signs the version's prefix once.
    #[arg(
        long,
        env = "MODELCACHE_CLOUDFRONT_POLICY",
        value_enum,
        default_value = "custom"
    )]
    cloudfront_policy: modelcache::artifact::cloudfront::Policy,
    /// Lifetime of a signature in seconds; renewed when a fifth is left.
    #[arg(long, env = "MODELCACHE_CLOUDFRONT_EXPIRES", default_value_t = 3600)]
    cloudfront_expires: u64,
    /// The node agent to try first, e.g. http://$(HOST_IP):8095; the origin
    /// serves whatever it cannot.
    #[arg(long, env = "MODELCACHE_NODE_AGENT", requires = "node_token_file")]
    node_agent: Option<String>,
    /// The pod's projected service-account token for the node agent
    /// (audience modelcache-node).
    #[arg(long, env = "MODELCACHE_NODE_TOKEN_FILE", requires = "node_agent")]
    node_token_file: Option<PathBuf>,
    /// The sha256 the version's manifest must have (the controller records
    /// it in the ModelCache's status); any other manifest is refused.
    #[arg(long, env = "MODELCACHE_MANIFEST_DIGEST", value_parser = digest_arg)]
    manifest_digest: Option<String>,
    /// Progress display.
    #[arg(long, env = "MODELCACHE_PROGRESS", value_enum, default_value = "auto")]
    progress: modelcache::artifact::progress::ProgressMode,
    /// Seconds between progress log lines (when not on a TTY).
    #[arg(long, env = "MODELCACHE_PROGRESS_INTERVAL", default_value_t = 5)]
    progress_interval: u64,
}

#[derive(clap::Args)]
struct PublishArgs {
    /// The directory to release; every regular file in it is part of the version.
    #[arg(long, env = "MODELCACHE_PUBLISH_DIR")]
    dir: PathBuf,
    /// s3://bucket/prefix or file:///dir.
    #[arg(long, env = "MODELCACHE_SOURCE")]
    to: String,
    #[arg(long, env = "MODELCACHE_MODEL")]
    model: String,
    #[arg(long, env = "MODELCACHE_VERSION")]
    version: String,
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(clap::Args)]
struct InvalidateArgs {
    /// redis://host:port[/db] or rediss://…, without the password.
    #[arg(long, env = "MODELCACHE_REDIS_URL")]
    redis_url: String,
    /// Password (better from the environment than on the command line).
    #[arg(long, env = "MODELCACHE_REDIS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    #[arg(long, env = "MODELCACHE_MODEL")]
    model: String,
    /// Versions whose keys stay (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    keep: Vec<String>,
    /// Print what would be deleted, and delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keys deleted per second at most: the ceiling of the latency pace, the
    /// rate of a --fixed-pace.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    keys_per_second: u64,
    /// How much slower, in percent, Redis may answer a probe during the sweep
    /// than before it; the sweep slows down to stay within it.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=1000))]
    headroom_percent: u32,
    /// Sweep at --keys-per-second whatever the latency.
    #[arg(long)]
    fixed_pace: bool,
    /// The URL is one node of a Redis Cluster: find, count and sweep keys on
    /// every primary.
    #[arg(long)]
    cluster: bool,
    /// SCAN COUNT and keys per pipeline.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    batch: u64,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Watch only this namespace (a namespaced Role suffices); all namespaces when unset.
    #[arg(long, env = "MODELCACHE_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MODELCACHE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: std::net::SocketAddr,
    /// Seconds between checks of a healthy cache (config drift, INFO).
    #[arg(long, env = "MODELCACHE_HEALTH_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=3600))]
    health_interval: u64,
    /// Take part in leader election through a Lease (run several replicas safely).
    #[arg(long, env = "MODELCACHE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease: the controller's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "modelcache-system")]
    lease_namespace: String,
    #[arg(
        long,
        env = "MODELCACHE_LEASE_NAME",
        default_value = "modelcache-controller"
    )]
    lease_name: String,
    /// Identity in the Lease: the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reach every provisioned Redis at this URL instead of its Service, for a
    /// controller run outside the cluster through a port-forward.
    #[arg(long, env = "MODELCACHE_REDIS_URL_OVERRIDE")]
    redis_url_override: Option<String>,
    /// Serve the pod-injection webhook (HTTPS) on this address.
    #[arg(long, env = "MODELCACHE_WEBHOOK_ADDR")]
    webhook_addr: Option<std::net::SocketAddr>,
    /// The modelcache image injected into pods (fetch and warm).
    #[arg(long, env = "MODELCACHE_IMAGE")]
    image: Option<String>,
    /// What the webhook does with a pod whose annotation names no ModelCache:
    /// `fail` refuses it with the reason, `ignore` admits it unchanged.
    #[arg(
        long,
        env = "MODELCACHE_WEBHOOK_FAILURE_POLICY",
        value_enum,
        default_value = "fail"
    )]
    webhook_failure_policy: controller::inject::FailurePolicy,
    /// The port of the node cache agent (`modelcache node`, the chart's
    /// DaemonSet) on every node: injected fetches try it before the origin.
    #[arg(long, env = "MODELCACHE_NODE_AGENT_PORT")]
    node_agent_port: Option<u16>,
    /// The node cache agents' admin port, where each says how its
    /// prefetches stand (for status.prefetch).
    #[arg(
        long,
        env = "MODELCACHE_NODE_AGENT_ADMIN_PORT",
        requires = "node_agent_selector"
    )]
    node_agent_admin_port: Option<u16>,
    /// A label selector of the node cache agents' pods, in the controller's
    /// namespace (--lease-namespace).
    #[arg(
        long,
        env = "MODELCACHE_NODE_AGENT_SELECTOR",
        requires = "node_agent_admin_port"
    )]
    node_agent_selector: Option<String>,
    /// cert-manager mode: a directory with tls.crt and tls.key. Without it the
    /// controller issues the certificate itself.
    #[arg(long, env = "MODELCACHE_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,
    /// The Secret (in the controller's namespace) that keeps the issued CA and certificate.
    #[arg(
        long,
        env = "MODELCACHE_WEBHOOK_SECRET",
        default_value = "modelcache-webhook-tls"
    )]
    webhook_secret: String,
    /// The webhook's Service (its DNS names go into the certificate).
    #[arg(
        long,
        env = "MODELCACHE_WEBHOOK_SERVICE",
        default_value = "modelcache-webhook"
    )]
    webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle the controller sets.
    #[arg(
        long,
        env = "MODELCACHE_WEBHOOK_CONFIGURATION",
        default_value = "modelcache"
    )]
    webhook_configuration: String,
}

#[derive(clap::Args)]
struct CheckRedisArgs {
    /// redis://host:port[/db] or rediss://…, without the password.
    #[arg(long, env = "MODELCACHE_REDIS_URL")]
    redis_url: String,
    /// Password (better from the environment than on the command line).
    #[arg(long, env = "MODELCACHE_REDIS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// A CachePolicy manifest; the built-in defaults when unset.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Memory limit of the Redis container (overrides the policy's redis.memory).
    #[arg(long)]
    memory: Option<String>,
    /// CONFIG SET what differs; without it the check only compares.
    #[arg(long)]
    apply: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only calibration embeds many sentences at once.
    let batches_side_by_side = matches!(cli.command, Command::Calibrate(_));
    // SAFETY: nothing else runs yet (parsing starts no thread); the runtime
    // and rayon start later.
    #[allow(unsafe_code)]
    unsafe {
        modelcache::model::set_thread_defaults(batches_side_by_side)
    };
    init_logging(cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MODELCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Fetch(args) => fetch(*args),
        Command::KvSize(args) => kv_size(args),
        Command::Calibrate(args) => calibrate(args),
        Command::Warm(args) => warm(args),
        Command::Gateway(args) => gateway(*args),
        Command::Gpu { json } => gpu(json),
        Command::Publish(args) => publish(args),
        Command::Controller(args) => run_controller(args),
        Command::CheckRedis(args) => check_redis(args),
        Command::Crd { out_dir, check } => crd_command(out_dir, check),
        Command::Validate { files } => validate(&files),
        Command::Invalidate(args) => invalidate(args),
        Command::Node(args) => node(args),
        Command::Version => {
            println!("{}", modelcache::version_line());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn gateway(args: GatewayArgs) -> Result<ExitCode> {
    use modelcache::gateway::{self, metrics::Price, server};
    let upstream = match url::Url::parse(&args.upstream) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u,
        _ => {
            return usage(anyhow::anyhow!(
                "--upstream {:?} is not an http(s) URL; give the engine's base URL, e.g. \
                 http://127.0.0.1:8000",
                args.upstream
            ));
        }
    };
    if args.secret.len() < 16 {
        return usage(anyhow::anyhow!(
            "--secret (MODELCACHE_GATEWAY_SECRET) has {} bytes; give at least 16 random bytes, \
             e.g. `openssl rand -hex 32`, the same on every replica",
            args.secret.len()
        ));
    }
    let target = args.redis_url.as_deref().map(|u| {
        let mut target = modelcache::store::RedisTarget::from_url(u, args.password.clone());
        if args.redis_username.is_some() {
            target.username = args.redis_username.clone();
        }
        target
    });
    let rt = runtime()?;
    let _guard = rt.enter();
    let (versions, _follower) = match (&args.version, &target) {
        (Some(v), _) => (modelcache::cache::Versions::Fixed(v.clone()), None),
        (None, Some(target)) => {
            let follower =
                modelcache::keyspace::registry::Follower::start(target.client()?, &args.model);
            (
                modelcache::cache::Versions::Registry(follower.subscribe()),
                Some(follower),
            )
        }
        (None, None) => {
            return usage(anyhow::anyhow!(
                "--follow-registry needs --redis-url: the registry lives in the model's Redis"
            ));
        }
    };
    let mut config = server::Config::new(&args.model, upstream, args.secret.into_bytes(), versions);
    config.upstream_key = args.upstream_key;
    config.sharing = match args.sharing {
        SharingArg::PerCredential => server::Sharing::PerCredential,
        SharingArg::CredentialRequired => server::Sharing::CredentialRequired,
        SharingArg::Shared => server::Sharing::Shared,
    };
    config.allow_sampling = args.allow_sampling;
    config.ttl = (args.ttl > 0).then(|| Duration::from_secs(args.ttl));
    config.latency_budget = Duration::from_millis(args.latency_budget_ms);
    config.upstream_usage = !args.no_upstream_usage;
    if let (Some(dir), Some(threshold)) = (&args.embedding_model, args.semantic_threshold) {
        let embedder =
            match modelcache::model::bert::SentenceEmbedder::load(dir, &candle_core::Device::Cpu) {
                Ok(e) => e,
                Err(e) => return usage(anyhow::Error::new(e)),
            };
        config.semantic = Some(server::SemanticLayer {
            embedder: std::sync::Arc::new(embedder),
            config: modelcache::cache::semantic::SemanticConfig {
                threshold,
                per_entry: None,
                ttl_seconds: i64::try_from(args.ttl).unwrap_or(0),
                max_entries: args.semantic_max_entries,
            },
        });
    }
    let options = gateway::Options {
        report_interval: Duration::from_secs(args.report_interval),
        config,
        listen: args.listen,
        admin: args.admin_addr,
        redis: target,
        price: Price {
            input_per_1k: args.price_input_per_1k,
            output_per_1k: args.price_output_per_1k,
        },
    };
    let shutdown =
        modelcache::signal::shutdown().context("failed to install the signal handler")?;
    tracing::info!(listen = %args.listen, admin = %args.admin_addr, "gateway serving");
    rt.block_on(gateway::run(options, shutdown))?;
    Ok(ExitCode::SUCCESS)
}

fn gpu(json: bool) -> Result<ExitCode> {
    let report = modelcache::gpu::probe()?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.describe());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_controller(args: ControllerArgs) -> Result<ExitCode> {
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("modelcache-{}", std::process::id()));
    let image = args.image.clone();
    let webhook = match (args.webhook_addr, args.image) {
        (None, _) => None,
        (Some(_), None) => {
            return usage(anyhow::anyhow!(
                "--webhook-addr needs --image (MODELCACHE_IMAGE), the modelcache image to inject into pods"
            ));
        }
        (Some(addr), Some(image)) => Some(controller::WebhookSettings {
            addr,
            inject: controller::inject::InjectConfig {
                image,
                failure_policy: args.webhook_failure_policy,
                node_agent_port: args.node_agent_port,
            },
            tls: match args.webhook_cert_dir {
                Some(dir) => controller::WebhookTls::Files(dir),
                None => controller::WebhookTls::Managed {
                    secret: args.webhook_secret,
                    service: args.webhook_service,
                    configuration: args.webhook_configuration,
                },
            },
        }),
    };
    let config = controller::ControllerConfig {
        namespace: args.namespace,
        http_addr: args.http_addr,
        health_interval: Duration::from_secs(args.health_interval),
        leader_election: args.leader_election,
        node_agents: match (args.node_agent_admin_port, args.node_agent_selector) {
            (Some(admin_port), Some(selector)) => Some(controller::prefetch::NodeAgents {
                namespace: args.lease_namespace.clone(),
                selector,
                admin_port,
            }),
            _ => None,
        },
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
        lease_duration: Duration::from_secs(15),
        redis_url_override: args.redis_url_override,
        webhook,
        image,
    };
    runtime()?.block_on(controller::run(config))?;
    Ok(ExitCode::SUCCESS)
}

fn check_redis(args: CheckRedisArgs) -> Result<ExitCode> {
    let policy = match &args.policy {
        None => CachePolicySpec::default(),
        Some(path) => crd::load::cache_policy(path)?,
    };
    let overrides = args.memory.map(|m| RedisOverrides {
        memory: Some(Quantity(m)),
        ..Default::default()
    });
    let target = RedisTarget::from_url(&args.redis_url, args.password);
    let report = runtime()?.block_on(controller::check::check_redis(
        &target,
        &policy,
        overrides.as_ref(),
        args.apply,
    ))?;
    print!("{}", controller::check::render(&report));
    let ready = report
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn crd_command(out_dir: Option<PathBuf>, check: Option<PathBuf>) -> Result<ExitCode> {
    if let Some(dir) = out_dir {
        for path in crd::write_dir(&dir)? {
            eprintln!("wrote {}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(dir) = check else {
        print!("{}", crd::render_stream()?);
        return Ok(ExitCode::SUCCESS);
    };
    let drift = crd::check_dir(&dir)?;
    if drift.is_empty() {
        eprintln!("{}: CRDs match the types", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    for d in &drift {
        eprintln!("{}: {d}", dir.display());
    }
    eprintln!(
        "regenerate with `modelcache crd --out-dir {}` and commit the result",
        dir.display()
    );
    Ok(ExitCode::FAILURE)
}

fn validate(files: &[PathBuf]) -> Result<ExitCode> {
    let (report, invalid) = crd::load::check_files(files)?;
    print!("{report}");
    if invalid == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{invalid} invalid resource(s); fix the fields named above");
    Ok(ExitCode::FAILURE)
}

fn invalidate(args: InvalidateArgs) -> Result<ExitCode> {
    let target = RedisTarget::from_url(&args.redis_url, args.password);
    let keep: std::collections::BTreeSet<String> = args.keep.into_iter().collect();
    let pace = sweep::Pace {
        keys_per_second: args.keys_per_second,
        batch: args.batch,
        headroom_percent: (!args.fixed_pace).then_some(args.headroom_percent),
    };
    let run = sweep::invalidate_target(
        &target,
        &args.model,
        &keep,
        args.dry_run,
        pace,
        args.cluster,
    );
    let outcomes = match runtime()?.block_on(run) {
        Ok(o) => o,
        Err(e @ sweep::InvalidateError::ActiveVersion { .. }) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    if outcomes.is_empty() {
        println!("model {:?}: no keys outside the kept versions", args.model);
    }
    for o in &outcomes {
        println!("{}", o.describe());
    }
    Ok(ExitCode::SUCCESS)
}

fn source_config(s3: &S3Args) -> modelcache::artifact::source::SourceConfig {
    modelcache::artifact::source::SourceConfig {
        endpoint: s3.endpoint.clone(),
        region: s3.region.clone(),
        path_style: s3.path_style,
        ..Default::default()
    }
}

/// Bad input: the error with its causes, and exit code 2.
fn usage(e: anyhow::Error) -> Result<ExitCode> {
    eprintln!("error: {e:#}");
    Ok(ExitCode::from(2))
}

/// The JSON summary on stdout, or the error (with its causes) on stderr and
/// the command's exit code for it.
fn summary_or_exit<T: serde::Serialize, E: std::error::Error + Send + Sync + 'static>(
    result: std::result::Result<T, E>,
    exit_code: impl Fn(&E) -> u8,
) -> Result<ExitCode> {
    match result {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("error: {:#}", anyhow::Error::new(e));
            Ok(ExitCode::from(code))
        }
    }
}

fn fetch(args: FetchArgs) -> Result<ExitCode> {
    use modelcache::artifact::{cloudfront, fetch, headers};
    let location = match args.source.parse() {
        Ok(l) => l,
        Err(e) => return usage(anyhow::Error::new(e)),
    };
    let mut opts = fetch::FetchOptions::new(location, &args.model, &args.version, &args.dest);
    opts.source = source_config(&args.s3);
    let file = args.headers_file.as_deref();
    opts.source.headers = match headers::collect(&args.headers, file, args.headers_dir.as_deref()) {
        Ok(h) => h,
        Err(e) => return usage(e.into()),
    };
    opts.source.idle_timeout = Some(Duration::from_secs(args.idle_timeout.max(1)));
    if let (Some(id), Some(key)) = (&args.cloudfront_key_pair_id, &args.cloudfront_private_key) {
        let (mode, policy) = (args.cloudfront_mode, args.cloudfront_policy);
        let expires = Duration::from_secs(args.cloudfront_expires);
        match cloudfront::Signer::from_pem_file(key, id, mode, policy, expires) {
            Ok(signer) => opts.source.signer = Some(std::sync::Arc::new(signer)),
            Err(e) => return usage(anyhow::Error::new(e)),
        }
    }
    opts.cache_dir = args.cache_dir;
    opts.cache_quota = args.cache_quota;
    opts.cache_copy = args.cache_copy;
    opts.part_size = args.part_size;
    opts.concurrency = args.concurrency.with_max(args.max_concurrency.into());
    opts.deadline = Duration::from_secs(args.deadline.max(1));
    opts.max_attempts = args.retries;
    opts.retry_base = Duration::from_millis(args.retry_base_ms.max(1));
    opts.progress = args.progress;
    opts.progress_interval = Duration::from_secs(args.progress_interval.max(1));
    opts.manifest_digest = args.manifest_digest;
    if let (Some(url), Some(token_file)) = (&args.node_agent, &args.node_token_file) {
        let url = match fetch::node_agent_url(url) {
            Some(u) => u,
            None => {
                return usage(anyhow::anyhow!(
                    "--node-agent {url:?} is not an http(s) URL; give the agent's address, e.g. \
                     http://$(HOST_IP):8095"
                ));
            }
        };
        let token = match std::fs::read_to_string(token_file) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                return usage(anyhow::anyhow!(
                    "--node-token-file {} is missing or empty; mount a projected \
                     service-account token with audience modelcache-node there",
                    token_file.display()
                ));
            }
        };
        opts.node_agent = Some(fetch::NodeAgent { url, token });
    }
    let result = runtime()?.block_on(fetch::fetch(opts));
    summary_or_exit(result, |e| e.exit_code())
}

fn node(args: NodeArgs) -> Result<ExitCode> {
    use modelcache::node;
    if args.node_name.is_empty() {
        return usage(anyhow::anyhow!(
            "--node-name (NODE_NAME) is empty; set it from the downward API's spec.nodeName"
        ));
    }
    let config = node::AgentConfig {
        listen: args.listen,
        admin_listen: args.admin_listen,
        node: args.node_name,
        cache_dir: args.cache_dir,
        fill: node::fills::FillSettings {
            concurrency: args.concurrency.with_max(args.max_concurrency.into()),
            quota: args.cache_quota,
            deadline: Duration::from_secs(args.deadline.max(1)),
            max_attempts: args.retries,
        },
        prefetch_every: (args.prefetch_interval > 0)
            .then(|| Duration::from_secs(args.prefetch_interval)),
        namespace: args.namespace.filter(|n| !n.is_empty()),
    };
    runtime()?.block_on(async {
        let shutdown = modelcache::signal::shutdown().context("failed to handle SIGTERM")?;
        let client = kube::Client::try_default()
            .await
            .context("failed to reach the API server (in-cluster config or KUBECONFIG)")?;
        node::run(config, client, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `ip:port`; an IPv6 `ip` may come without brackets (`$(HOST_IP):8095`).
fn listen_arg(s: &str) -> std::result::Result<std::net::SocketAddr, String> {
    modelcache::artifact::fetch::socket_addr(s).ok_or_else(|| {
        format!("{s:?} is not ip:port; give an address of this node, e.g. 10.0.0.7:8095")
    })
}

/// A quantity (`16Mi`, `200Gi`) in bytes.
fn quantity_arg(s: &str) -> std::result::Result<u64, String> {
    modelcache::quantity::to_units(s).map_err(|e| e.to_string())
}

fn publish(args: PublishArgs) -> Result<ExitCode> {
    use modelcache::artifact::publish;
    let location = match args.to.parse() {
        Ok(l) => l,
        Err(e) => return usage(anyhow::Error::new(e)),
    };
    let opts = publish::PublishOptions {
        dir: args.dir,
        location,
        source: source_config(&args.s3),
        model: args.model,
        version: args.version,
        concurrency: args.concurrency as usize,
    };
    let result = runtime()?.block_on(publish::publish(opts));
    summary_or_exit(result, |e| e.exit_code())
}

fn kv_size(args: KvSizeArgs) -> Result<ExitCode> {
    use modelcache::model::kv_size;
    let size = kv_size::shape_from_files(args.config.as_deref(), args.gguf.as_deref())
        .and_then(|base| kv_size::with_overrides(base, args.layers, args.kv_heads, args.head_dim))
        .and_then(|shape| kv_size::kv_size(shape, args.dtype, args.tokens, args.batch));
    match size {
        Ok(size) if args.json => println!("{}", serde_json::to_string(&size)?),
        Ok(size) => println!("{}", size.explain()),
        Err(e) => return usage(e.into()),
    }
    Ok(ExitCode::SUCCESS)
}

fn calibrate(args: CalibrateArgs) -> Result<ExitCode> {
    use modelcache::cache::calibrate;
    if let Err(e) = calibrate::check_targets(args.max_false_hit_rate, args.held_out) {
        return usage(e.into());
    }
    let mut pairs = match calibrate::read_pairs(&args.pairs) {
        Ok(p) => p,
        Err(e) => return usage(anyhow::Error::new(e)),
    };
    if let Some(limit) = args.limit {
        pairs.truncate(limit);
    }
    let cpu = candle_core::Device::Cpu;
    let embedder =
        match modelcache::model::bert::SentenceEmbedder::load(&args.embedding_model, &cpu) {
            Ok(e) => e,
            Err(e) => return usage(anyhow::Error::new(e)),
        };
    let (target, held_out) = (args.max_false_hit_rate, args.held_out);
    let result = calibrate::calibrate(&embedder, &pairs, target, held_out, args.seed)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print!("{}", result.table(pairs.len()));
    }
    if let Some(why) = result.unmet() {
        eprintln!("error: {why}");
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// The sha256 of a version's manifest, in any case.
fn digest_arg(s: &str) -> std::result::Result<String, String> {
    let digest = s.to_ascii_lowercase();
    if modelcache::digest::is_sha256_hex(&digest) {
        Ok(digest)
    } else {
        Err("expected 64 hex digits (the sha256 of the version's manifest)".into())
    }
}

fn warm(args: WarmArgs) -> Result<ExitCode> {
    use modelcache::warm::{engine, in_process, prompts};
    let prompts = match prompts::load(&args.prompts) {
        Ok(p) => p,
        Err(e) => return usage(anyhow::Error::new(e)),
    };
    let Some(engine_url) = args.engine_url else {
        let (Some(weights_path), Some(prefix_cache)) = (args.weights, args.prefix_cache) else {
            return usage(anyhow::anyhow!(
                "--weights needs --prefix-cache, the directory the KV blocks go to"
            ));
        };
        let opts = in_process::InProcessOptions {
            weights_path,
            weights: if args.dequantize {
                modelcache::model::llama::Weights::Dequantized
            } else {
                modelcache::model::llama::Weights::Quantized
            },
            tokenizer: args.tokenizer,
            prefix_cache,
            manifest_digest: args.manifest_digest,
            device: args.device,
        };
        return summary_or_exit(in_process::run(&opts, &prompts), |e| e.exit_code());
    };
    let concurrency = args.concurrency as usize;
    let warmer = engine::EngineWarmer::new(&engine_url, args.model, prompts, concurrency)?;
    let rt = runtime()?;
    if !args.once {
        let interval = Duration::from_secs(args.check_interval.max(1));
        rt.block_on(engine::serve_sidecar(warmer, args.ready_addr, interval))?;
        return Ok(ExitCode::SUCCESS);
    }
    let result = rt.block_on(async {
        warmer
            .wait_for_engine(Duration::from_secs(args.wait))
            .await?;
        warmer.warm().await
    });
    summary_or_exit(result, |e| e.exit_code())
}
