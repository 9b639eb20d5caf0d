//! A semantic cache in front of a paid LLM, on one Redis, with two serving
//! replicas: questions arrive in paraphrased forms, each replica embeds them
//! with all-MiniLM-L6-v2 (candle), serves a cached answer when one is close
//! enough (the threshold `modelcache calibrate` picked) and the guard allows
//! it, and otherwise "calls the LLM" and stores the answer for both
//! replicas. Near misses (another number, a negation) must reach the LLM.
//! Run by `scripts/demo.sh`:
//!
//! ```sh
//! MODELCACHE_REDIS_PASSWORD=… cargo run --example semantic -- redis://127.0.0.1:6379 MODEL_DIR THRESHOLD
//! ```

use std::time::{Duration, Instant};

use anyhow::Context as _;
use modelcache::cache::Versions;
use modelcache::cache::semantic::{SemanticCache, SemanticConfig};
use modelcache::model::bert::SentenceEmbedder;
use modelcache::store::RedisTarget;
use serde_json::json;

/// (topic, the forms it is asked in). The first form of each topic reaches
/// the LLM; the others should be served from the cache.
const TRAFFIC: &[&[&str]] = &[
    &[
        "How can I reset my password?",
        "How do I reset my password?",
        "How can I reset my password?",
        "how do i reset my password",
    ],
    &[
        "What is the refund policy for annual plans?",
        "What's the refund policy for annual plans?",
        "What is the refund policy for annual plans",
    ],
    &[
        "How do I export my data to CSV?",
        "How can I export my data to CSV?",
        "How do I export my data as CSV?",
    ],
    &[
        "Is it safe to share my API key with support?",
        "Is it safe to share my API key with support?",
    ],
    &[
        "How do I add a team member to my workspace?",
        "How can I add a team member to my workspace?",
    ],
];

/// Close to a stored question but wanting another answer.
const NEAR_MISSES: &[&str] = &[
    "Is it not safe to share my API key with support?",
    "What is the refund policy for 3 annual plans?",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let model_dir = args
        .next()
        .context("usage: semantic REDIS_URL MODEL_DIR THRESHOLD")?;
    let threshold: f32 = args
        .next()
        .context("usage: semantic REDIS_URL MODEL_DIR THRESHOLD")?
        .parse()
        .context("THRESHOLD is a number such as 0.91")?;
    let target = RedisTarget {
        url,
        username: None,
        password: std::env::var("MODELCACHE_REDIS_PASSWORD").ok(),
    };
    let embedder = SentenceEmbedder::load(model_dir.as_ref(), &candle_core::Device::Cpu)?;
    let config = SemanticConfig {
        threshold,
        per_entry: None,
        ttl_seconds: 3600,
        max_entries: 10_000,
    };
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let cache = SemanticCache::new(
            target.connect().await?,
            "support-bot",
            Versions::Fixed("v1".into()),
            embedder.dim(),
            config.clone(),
        );
        cache.start(target.client()?).await?;
        replicas.push(cache);
    }

    let (mut hits, mut llm_calls, mut wrong) = (0, 0, 0);
    let started = Instant::now();
    let mut turn = 0;
    let ask = |question: &'static str, turn: usize| {
        let cache = replicas[turn % 2].clone();
        let v = embedder.embed(&[question]).map(|mut v| v.remove(0));
        async move {
            let v = v?;
            let hit = cache.get(question, &v).await?;
            anyhow::Ok((cache, v, hit))
        }
    };
    // Round-robin over the topics, so that replicas alternate and answers
    // stored by one are served by the other.
    let rounds = TRAFFIC.iter().map(|t| t.len()).max().unwrap_or(0);
    for round in 0..rounds {
        for topic in TRAFFIC {
            let Some(&question) = topic.get(round) else {
                continue;
            };
            let (cache, v, hit) = ask(question, turn).await?;
            match hit {
                Some(hit) => {
                    hits += 1;
                    if hit.query != topic[0] {
                        wrong += 1;
                    }
                    println!(
                        "  replica {}  hit  {:.3}  {question:?} -> answer stored for {:?}",
                        turn % 2,
                        hit.similarity,
                        hit.query
                    );
                }
                None => {
                    llm_calls += 1;
                    let answer = json!({"text": format!("(LLM answer to: {question})")});
                    cache
                        .put(question, &v, &answer, &json!({"costUsd": 0.002}))
                        .await?;
                    println!(
                        "  replica {}  miss        {question:?} -> LLM called, answer stored",
                        turn % 2
                    );
                }
            }
            turn += 1;
            // Let the other replica's follower apply the event.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut near_miss_hits = 0;
    for &question in NEAR_MISSES {
        let (_, _, hit) = ask(question, turn).await?;
        turn += 1;
        match hit {
            Some(hit) => {
                near_miss_hits += 1;
                println!("  near miss HIT  {question:?} -> {:?}", hit.query);
            }
            None => {
                llm_calls += 1;
                println!("  near miss      {question:?} -> not served from the cache (LLM called)");
            }
        }
    }
    let asked = turn;
    println!(
        "  {asked} questions: {hits} served from the cache, {llm_calls} LLM calls ({} avoided, {:.0}%), {wrong} wrong answers served, {near_miss_hits} near misses served; {:.1} s",
        hits,
        100.0 * hits as f64 / asked as f64,
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        wrong == 0 && near_miss_hits == 0,
        "the cache served a wrong answer"
    );
    Ok(())
}
