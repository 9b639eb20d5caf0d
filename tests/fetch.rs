//! `modelcache publish` and `modelcache fetch` end to end, as processes,
//! against a real S3-compatible server (moto; s3s-fs where signatures must be
//! checked), nginx as an HTTP origin, and a proxy on loopback that counts,
//! injects faults or shapes traffic.

#![allow(unsafe_code)] // set_var before threads start

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::proxy::{Proxy, ProxyConfig};
use support::{HttpServer, S3Server, model_dir, stderr, summary, tree};

const BIN: &str = env!("CARGO_BIN_EXE_modelcache");

fn modelcache(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("MODELCACHE_LOG", "info");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    modelcache(args, env).output().expect("modelcache runs")
}

fn creds(s3: &S3Server) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("AWS_REGION", s3.region.clone()),
    ]
}

fn env_of<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A runtime and an S3 client with the server's credentials, for what a
/// test does to the bucket outside the code under test.
fn admin_client(s3: &S3Server) -> (tokio::runtime::Runtime, aws_sdk_s3::Client) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        let cfg = modelcache::artifact::source::SourceConfig {
            endpoint: Some(s3.endpoint()),
            region: Some(s3.region.clone()),
            path_style: true,
            ..Default::default()
        };
        // SAFETY: set before any thread of this test reads the environment.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", &s3.access_key);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", &s3.secret_key);
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        }
        modelcache::artifact::source::s3_client(&cfg, Duration::from_secs(30), true).await
    });
    (rt, client)
}

fn create_bucket(s3: &S3Server, bucket: &str) {
    let (rt, client) = admin_client(s3);
    rt.block_on(client.create_bucket().bucket(bucket).send())
        .unwrap();
}

/// `modelcache publish` of `dir` as model `m` to `s3://models/prod`.
fn run_publish_s3(s3: &S3Server, dir: &Path, version: &str) -> Output {
    let env = creds(s3);
    run(
        &[
            "publish",
            "--dir",
            dir.to_str().unwrap(),
            "--to",
            "s3://models/prod",
            "--model",
            "m",
            "--version",
            version,
            "--endpoint",
            &s3.endpoint(),
            "--path-style",
        ],
        &env_of(&env),
    )
}

fn publish_s3(s3: &S3Server, dir: &Path, version: &str) -> serde_json::Value {
    summary(&run_publish_s3(s3, dir, version))
}

fn fetch_args<'a>(endpoint: &'a str, version: &'a str, dest: &'a str) -> Vec<&'a str> {
    vec![
        "fetch",
        "--source",
        "s3://models/prod",
        "--model",
        "m",
        "--version",
        version,
        "--dest",
        dest,
        "--endpoint",
        endpoint,
        "--path-style",
        "--progress",
        "off",
        "--retry-base-ms",
        "10",
    ]
}

fn moto_with_bucket() -> S3Server {
    let s3 = S3Server::moto().unwrap_or_else(|e| panic!("{e}"));
    create_bucket(&s3, "models");
    s3
}

#[test]
fn s3_fetch_is_byte_identical_and_the_node_cache_serves_the_second_pod_without_requests() {
    let s3 = moto_with_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(tmp.path(), 1, 20);
    let published = publish_s3(&s3, &src, "v1");
    assert_eq!(published["files"], 6);
    // Publishing the same bytes again is a no-op; other bytes are refused.
    assert_eq!(publish_s3(&s3, &src, "v1")["alreadyPublished"], true);
    let other = model_dir(tmp.path(), 2, 1);
    let env = creds(&s3);
    let refused = run_publish_s3(&s3, &other, "v1");
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("versions are immutable"),
        "{}",
        stderr(&refused)
    );

    let (_rt, proxy) = Proxy::start_blocking(s3.port(), ProxyConfig::default());
    let endpoint = proxy.endpoint();
    let cache = tmp.path().join("node-cache");
    let pod1 = tmp.path().join("pod1");
    let mut args = fetch_args(&endpoint, "v1", pod1.to_str().unwrap());
    args.extend(["--cache-dir", cache.to_str().unwrap(), "--part-size", "4Mi"]);
    let first = summary(&run(&args, &env_of(&env)));
    assert_eq!(tree(&pod1), tree(&src), "byte-identical to the source");
    assert_eq!(first["manifestDigest"], published["manifestDigest"]);
    assert_eq!(
        first["downloadedBytes"].as_u64().unwrap(),
        first["bytes"].as_u64().unwrap() - 14,
        "duplicate content downloads once"
    );
    assert_eq!(first["cacheHits"], 0);
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pod1.join(".modelcache/complete")).unwrap()).unwrap();
    assert_eq!(marker["manifestDigest"], published["manifestDigest"]);
    let requests_after_first = proxy
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        proxy.stats.requests_for("/model.safetensors") >= 5,
        "20 MiB in 4 MiB parts"
    );

    // A second pod on the node: everything from the cache, nothing from S3.
    let pod2 = tmp.path().join("pod2");
    let mut args = fetch_args(&endpoint, "v1", pod2.to_str().unwrap());
    args.extend(["--cache-dir", cache.to_str().unwrap()]);
    let second = summary(&run(&args, &env_of(&env)));
    assert_eq!(tree(&pod2), tree(&src));
    assert_eq!(second["cacheHits"], 6);
    assert_eq!(second["downloadedBytes"], 0);
    assert_eq!(second["requests"], 0);
    assert_eq!(
        proxy
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        requests_after_first,
        "the second fetch made no request"
    );
    // Hard links: the pod's file is the cache's blob.
    use std::os::unix::fs::MetadataExt as _;
    assert!(
        std::fs::metadata(pod2.join("model.safetensors"))
            .unwrap()
            .nlink()
            >= 3
    );

    // The same pod again (a restarted init container): complete, no request.
    let again = summary(&run(&args, &env_of(&env)));
    assert_eq!(again["reusedFiles"], 6);
    assert_eq!(
        proxy
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        requests_after_first
    );
}

#[test]
fn v2_replaces_v1_in_a_destination_and_removes_what_v2_does_not_have() {
    let s3 = moto_with_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let v1 = model_dir(tmp.path(), 3, 1);
    publish_s3(&s3, &v1, "v1");
    let v2 = tmp.path().join("v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("model.safetensors"), b"version two").unwrap();
    publish_s3(&s3, &v2, "v2");
    let env = creds(&s3);
    let dest = tmp.path().join("dest");
    let endpoint = s3.endpoint();
    summary(&run(
        &fetch_args(&endpoint, "v1", dest.to_str().unwrap()),
        &env_of(&env),
    ));
    std::fs::write(dest.join("user-notes.txt"), b"not ours").unwrap();
    let s = summary(&run(
        &fetch_args(&endpoint, "v2", dest.to_str().unwrap()),
        &env_of(&env),
    ));
    assert_eq!(s["version"], "v2");
    let mut want = tree(&v2);
    want.insert("user-notes.txt".into(), b"not ours".to_vec());
    assert_eq!(
        tree(&dest),
        want,
        "v1's files are gone, files modelcache did not place stay"
    );
}

#[test]
fn faults_from_a_proxy_end_in_success() {
    let s3 = moto_with_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(tmp.path(), 4, 12);
    publish_s3(&s3, &src, "v1");
    let (_rt, proxy) = Proxy::start_blocking(
        s3.port(),
        ProxyConfig {
            fault_rate: 0.3,
            seed: 7,
            ..Default::default()
        },
    );
    let endpoint = proxy.endpoint();
    let dest = tmp.path().join("dest");
    let mut args = fetch_args(&endpoint, "v1", dest.to_str().unwrap());
    args.extend([
        "--part-size",
        "1Mi",
        "--concurrency",
        "6",
        "--retries",
        "30",
    ]);
    let s = summary(&run(&args, &env_of(&creds(&s3))));
    assert_eq!(tree(&dest), tree(&src));
    let faults = proxy
        .stats
        .faults
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(faults >= 5, "the proxy injected {faults} faults");
    assert!(s["retries"].as_u64().unwrap() >= faults / 2, "{s}");
    // A cut body is resumed from where it stopped, not downloaded again whole.
    let body = proxy
        .stats
        .body_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let total = s["bytes"].as_u64().unwrap();
    assert!(body < total + total / 4, "{body} bytes sent for {total}");
}

/// Kill -9 at random moments; after each kill no final path holds a wrong
/// file, and the last run leaves the version byte-identical.
#[test]
fn kill_nine_at_random_moments_resumes_to_identical_files() {
    let s3 = moto_with_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(tmp.path(), 5, 40);
    publish_s3(&s3, &src, "v1");
    let want = tree(&src);
    // 4 connections at 24 MiB/s each: a full fetch takes about half a second.
    let (_rt, proxy) = Proxy::start_blocking(
        s3.port(),
        ProxyConfig {
            bandwidth: Some(1 << 20),
            rtt: Some(Duration::from_millis(2)),
            ..Default::default()
        },
    );
    let endpoint = proxy.endpoint();
    let env = creds(&s3);
    let dest = tmp.path().join("dest");
    let dest_s = dest.to_str().unwrap().to_string();
    let mut args = fetch_args(&endpoint, "v1", &dest_s);
    let at = args.iter().position(|a| *a == "--progress").unwrap();
    args[at + 1] = "log";
    args.extend([
        "--concurrency",
        "4",
        "--part-size",
        "16Mi",
        "--progress-interval",
        "1",
    ]);

    // First a kill once a checkpoint is in the journal; the next run resumes.
    let mut child = modelcache(&args, &env_of(&env))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let journal_dir = dest.join(".modelcache/partial");
    let started = Instant::now();
    loop {
        let checkpointed = std::fs::read_dir(&journal_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.path().extension().is_some_and(|x| x == "parts")
                    && std::fs::read_to_string(e.path()).is_ok_and(|t| t.lines().count() > 1)
            });
        if checkpointed {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the fetch ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = run(&args, &env_of(&env));
    let s = summary(&resumed);
    assert!(s["resumedBytes"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["downloadedBytes"].as_u64().unwrap() < s["bytes"].as_u64().unwrap(),
        "{s}"
    );
    assert_eq!(tree(&dest), want);
    let log = stderr(&resumed);
    assert!(
        log.contains("MB/s") && log.contains("ETA"),
        "progress lines: {log}"
    );

    // Then 20 kills at random moments of fresh downloads.
    std::fs::remove_dir_all(&dest).unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    let mut kills = 0;
    let mut runs = 0;
    while kills < 20 {
        runs += 1;
        assert!(runs < 200, "the fetch kept finishing before the kill");
        let mut child = modelcache(&args, &env_of(&env))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(20..500)));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        for (path, bytes) in tree(&dest) {
            assert_eq!(
                Some(&bytes),
                want.get(&path),
                "after kill {kills}, {path} is wrong at its final path"
            );
        }
        if finished {
            // Complete: start over so that the next kill lands mid-download.
            std::fs::remove_dir_all(&dest).unwrap();
        }
    }
    let s = summary(&run(&args, &env_of(&env)));
    assert_eq!(tree(&dest), want);
    assert_eq!(s["files"], 6);
}

/// When each connection is capped, idle workers split the ranges in flight:
/// many ranged requests for one big file, and the bytes still exact.
#[test]
fn capped_connections_make_the_fetcher_split_ranges() {
    let s3 = moto_with_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(tmp.path(), 12, 24);
    publish_s3(&s3, &src, "v1");
    let (_rt, proxy) = Proxy::start_blocking(
        s3.port(),
        ProxyConfig {
            bandwidth: Some(6 << 20),
            rtt: Some(Duration::from_millis(2)),
            ..Default::default()
        },
    );
    let endpoint = proxy.endpoint();
    let dest = tmp.path().join("dest");
    let mut args = fetch_args(&endpoint, "v1", dest.to_str().unwrap());
    args.extend(["--concurrency", "8"]);
    let s = summary(&run(&args, &env_of(&creds(&s3))));
    assert_eq!(tree(&dest), tree(&src));
    // The manifest and five distinct files take six requests; every split
    // adds one. A 24 MiB file at 6 MiB/s per connection is split at least
    // twice (never below 4 MiB per range).
    let requests = s["requests"].as_u64().unwrap();
    assert!(requests >= 8, "{requests} requests: {s}");
}

#[test]
fn adaptive_concurrency_adds_requests_while_capped_connections_gain() {
    let tmp = tempfile::tempdir().unwrap();
    let (http, root) = http_origin(tmp.path());
    // Big enough for more than 16 ranges of at least 8 MiB.
    let src = model_dir(tmp.path(), 13, 160);
    publish_dir(&src, &root, "v1");
    // Each connection capped at 3 MiB/s: throughput grows with every request
    // added, so the climb leaves its start (16) behind.
    let (_rt, proxy) = Proxy::start_blocking(
        http.port(),
        ProxyConfig {
            bandwidth: Some(3 << 20),
            rtt: Some(Duration::from_millis(2)),
            ..Default::default()
        },
    );
    let base = format!("{}/", proxy.endpoint());
    let dest = tmp.path().join("auto");
    let s = summary(&http_fetch(&base, "v1", &dest, &[]));
    assert_eq!(tree(&dest), tree(&src));
    let peak = s["peakConcurrency"].as_u64().unwrap();
    assert!(peak > 16, "auto stayed at its start: {s}");
    // A number fixes it.
    let dest = tmp.path().join("fixed");
    let s = summary(&http_fetch(&base, "v1", &dest, &["--concurrency", "24"]));
    assert_eq!(tree(&dest), tree(&src));
    let peak = s["peakConcurrency"].as_u64().unwrap();
    assert!((2..=24).contains(&peak), "{s}");
    // Anything else is refused by name.
    let o = http_fetch(&base, "v1", &dest, &["--concurrency", "lots"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("expected `auto` or a number"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn concurrent_fetchers_into_one_cache_download_once() {
    let s3 = moto_with_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(tmp.path(), 6, 16);
    publish_s3(&s3, &src, "v1");
    let (_rt, proxy) = Proxy::start_blocking(s3.port(), ProxyConfig::default());
    let endpoint = proxy.endpoint();
    let env = creds(&s3);
    let cache = tmp.path().join("cache");
    let children: Vec<_> = ["a", "b"]
        .iter()
        .map(|pod| {
            let dest = tmp.path().join(pod);
            let mut args = fetch_args(&endpoint, "v1", dest.to_str().unwrap());
            args.extend(["--cache-dir", cache.to_str().unwrap()]);
            modelcache(&args, &env_of(&env))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let summaries: Vec<_> = children
        .into_iter()
        .map(|c| summary(&c.wait_with_output().unwrap()))
        .collect();
    assert_eq!(tree(&tmp.path().join("a")), tree(&src));
    assert_eq!(tree(&tmp.path().join("b")), tree(&src));
    let unique: u64 = summaries[0]["bytes"].as_u64().unwrap() - 14;
    let body = proxy
        .stats
        .body_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let manifest = std::fs::metadata(tmp.path().join("a/.modelcache/manifest.json"))
        .unwrap()
        .len();
    // Once, not twice: a range that a fetcher split under load adds at most
    // the bytes in flight when it stopped, never a second copy.
    let once = unique + manifest;
    assert!(
        (once..once + once / 4).contains(&body),
        "the version crossed the wire once: {body} bytes for {once}"
    );
    let hits: Vec<u64> = summaries
        .iter()
        .map(|s| s["cacheHits"].as_u64().unwrap())
        .collect();
    assert!(hits.contains(&6) && hits.contains(&0), "{hits:?}");
}

#[test]
fn wrong_credentials_are_a_clear_error() {
    let s3 = S3Server::s3s_fs().unwrap_or_else(|e| panic!("{e}"));
    create_bucket(&s3, "models");
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(tmp.path(), 8, 1);
    publish_s3(&s3, &src, "v1");
    let dest = tmp.path().join("dest");
    let endpoint = s3.endpoint();
    let wrong = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
        ("AWS_REGION", "us-east-1"),
    ];
    let o = run(&fetch_args(&endpoint, "v1", dest.to_str().unwrap()), &wrong);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("manifest.json"), "{err}");
    assert!(err.contains("403"), "{err}");
    assert!(err.contains("check the credentials"), "{err}");
    assert!(
        !err.contains("not-the-secret"),
        "secrets never reach messages"
    );
    assert!(tree(&dest).is_empty());
    // The right secret works against the same strict server.
    let ok = run(
        &fetch_args(&endpoint, "v1", dest.to_str().unwrap()),
        &env_of(&creds(&s3)),
    );
    summary(&ok);
    assert_eq!(tree(&dest), tree(&src));
}

/// A version placed on nginx's root the way `publish --to file://` does.
fn http_origin(tmp: &Path) -> (HttpServer, PathBuf) {
    let root = tmp.join("origin");
    std::fs::create_dir_all(&root).unwrap();
    let http = HttpServer::start(&root).unwrap_or_else(|e| panic!("{e}"));
    (http, root)
}

fn publish_dir(dir: &Path, root: &Path, version: &str) {
    summary(&run(
        &[
            "publish",
            "--dir",
            dir.to_str().unwrap(),
            "--to",
            &format!("file://{}", root.display()),
            "--model",
            "m",
            "--version",
            version,
        ],
        &[],
    ));
}

fn http_fetch(base: &str, version: &str, dest: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "fetch",
        "--source",
        base,
        "--model",
        "m",
        "--version",
        version,
        "--dest",
        dest.to_str().unwrap(),
        "--progress",
        "off",
        "--retry-base-ms",
        "10",
    ];
    args.extend(extra);
    run(&args, &[])
}

#[test]
fn http_origin_with_headers_and_a_corrupted_object_that_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let (http, root) = http_origin(tmp.path());
    let src = model_dir(tmp.path(), 9, 9);
    publish_dir(&src, &root, "v1");
    let (_rt, proxy) = Proxy::start_blocking(http.port(), ProxyConfig::default());
    let dest = tmp.path().join("dest");
    let base = format!("{}/", proxy.endpoint());
    let s = summary(&http_fetch(
        &base,
        "v1",
        &dest,
        &["--header", "X-Team: ml-platform", "--part-size", "2Mi"],
    ));
    assert_eq!(tree(&dest), tree(&src));
    assert_eq!(s["files"], 6);
    let heads = proxy.stats.heads.lock().unwrap().clone();
    assert!(
        heads.iter().all(|h| h.contains("x-team: ml-platform")),
        "{:?}",
        heads.first()
    );
    assert!(
        heads.iter().any(|h| h.contains("range: bytes=")),
        "ranged requests"
    );

    // Same size, other bytes: the digest gives it away, twice.
    let published = root.join("m/v1/shards/part 2.bin");
    let mut bytes = std::fs::read(&published).unwrap();
    bytes[12345] ^= 0xff;
    std::fs::write(&published, bytes).unwrap();
    let dest2 = tmp.path().join("dest2");
    let o = http_fetch(&base, "v1", &dest2, &[]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("failed to verify shards/part 2.bin"), "{err}");
    assert!(
        err.contains("/m/v1/shards/part%202.bin"),
        "names the URL: {err}"
    );
    assert!(err.contains("expected sha256"), "{err}");
    assert!(
        !dest2.join("shards/part 2.bin").exists(),
        "nothing at the final path"
    );
    assert!(!dest2.join(".modelcache/complete").exists());
}

#[test]
fn manifests_that_escape_the_destination_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (http, root) = http_origin(tmp.path());
    for (version, path) in [
        ("dotdot", "../escaped.txt"),
        ("absolute", "/tmp/escaped.txt"),
        ("nested", "a/../../escaped.txt"),
    ] {
        let dir = root.join("m").join(version);
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = serde_json::json!({
            "formatVersion": 1, "model": "m", "version": version,
            "files": [{"path": path, "size": 3, "sha256": modelcache::digest::sha256_hex(b"abc")}]
        });
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        let dest = tmp.path().join("pods").join(version);
        let o = http_fetch(&http.base_url(), version, &dest, &[]);
        assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
        assert!(stderr(&o).contains("is not allowed"), "{}", stderr(&o));
        assert!(!tmp.path().join("pods/escaped.txt").exists());
        assert!(tree(&dest).is_empty());
    }
}

#[test]
fn not_enough_disk_fails_before_any_download() {
    let tmp = tempfile::tempdir().unwrap();
    let (http, root) = http_origin(tmp.path());
    let dir = root.join("m/huge");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = serde_json::json!({
        "formatVersion": 1, "model": "m", "version": "huge",
        "files": [{"path": "weights.bin", "size": 1u64 << 50, "sha256": "0".repeat(64)}]
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let (_rt, proxy) = Proxy::start_blocking(http.port(), ProxyConfig::default());
    let dest = tmp.path().join("dest");
    let o = http_fetch(&proxy.endpoint(), "huge", &dest, &[]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1024.0 TiB more are needed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        proxy.stats.requests_for("weights.bin"),
        0,
        "no download started"
    );
    assert_eq!(proxy.stats.requests_for("manifest.json"), 1);
}

#[test]
fn missing_versions_and_bad_arguments_exit_with_their_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let (http, _root) = http_origin(tmp.path());
    let dest = tmp.path().join("dest");
    let o = http_fetch(&http.base_url(), "v404", &dest, &[]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("404; is the version published there?"),
        "{}",
        stderr(&o)
    );
    let o = http_fetch("ftp://x", "v1", &dest, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("expected s3://"), "{}", stderr(&o));
    let o = http_fetch(&http.base_url(), "../v1", &dest, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("version \"../v1\" is not valid"),
        "{}",
        stderr(&o)
    );
    // Every option also comes from the environment, as in an init container.
    let o = Command::new(BIN)
        .arg("fetch")
        .env("MODELCACHE_SOURCE", http.base_url())
        .env("MODELCACHE_MODEL", "m")
        .env("MODELCACHE_VERSION", "v404")
        .env("MODELCACHE_DEST", &dest)
        .env("MODELCACHE_PROGRESS", "off")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
}

/// The signature over a policy as openssl computes it, in CloudFront's base64.
fn openssl_signature(key: &Path, policy: &str) -> String {
    let signature = support::run_with_input(
        "openssl",
        &[
            "dgst".as_ref(),
            "-sha1".as_ref(),
            "-sign".as_ref(),
            key.as_os_str(),
        ],
        policy.as_bytes(),
        "openssl dgst -sign",
    );
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(signature)
        .replace('+', "-")
        .replace('=', "_")
        .replace('/', "~")
}

#[test]
fn cloudfront_signatures_match_openssl_and_never_reach_logs() {
    use modelcache::artifact::cloudfront::{self, Mode, Policy, Signer};
    let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cloudfront-test-key.pem");
    let signer = Signer::from_pem_file(
        &key,
        "KTESTKEYPAIR",
        Mode::SignedUrl,
        Policy::Canned,
        Duration::from_secs(600),
    )
    .unwrap();
    for policy in [
        cloudfront::canned_policy(
            "https://d111111abcdef8.cloudfront.net/m/v1/model.safetensors",
            1_900_000_000,
        ),
        cloudfront::custom_policy(
            "https://d111111abcdef8.cloudfront.net/m/v1/*",
            1_900_000_000,
        ),
    ] {
        assert_eq!(
            signer.signature(&policy),
            openssl_signature(&key, &policy),
            "{policy}"
        );
    }

    // Signed URLs and signed cookies reach the origin; logs and errors never
    // show them.
    let tmp = tempfile::tempdir().unwrap();
    let (http, root) = http_origin(tmp.path());
    let src = model_dir(tmp.path(), 10, 1);
    publish_dir(&src, &root, "v1");
    let (_rt, proxy) = Proxy::start_blocking(http.port(), ProxyConfig::default());
    let key_s = key.to_str().unwrap();
    for (mode, policy, marker) in [
        ("signed-url", "canned", "Expires="),
        ("signed-url", "custom", "Policy="),
        ("signed-cookies", "custom", "cookie: CloudFront-Policy="),
        ("signed-cookies", "canned", "cookie: CloudFront-Expires="),
    ] {
        let dest = tmp.path().join(format!("{mode}-{policy}"));
        let extra = [
            "--cloudfront-key-pair-id",
            "KTESTKEYPAIR",
            "--cloudfront-private-key",
            key_s,
            "--cloudfront-mode",
            mode,
            "--cloudfront-policy",
            policy,
        ];
        let o = http_fetch(&proxy.endpoint(), "v1", &dest, &extra);
        summary(&o);
        assert_eq!(tree(&dest), tree(&src));
        let heads = proxy.stats.heads.lock().unwrap().clone();
        let last = heads.last().unwrap();
        assert!(
            last.contains(marker) && last.contains("Key-Pair-Id=KTESTKEYPAIR"),
            "{mode}/{policy}: {last}"
        );
        assert!(!stderr(&o).contains("Signature"), "{}", stderr(&o));
        // An unpublished version: the error names the URL without its signature.
        let o = http_fetch(&proxy.endpoint(), "v9", &tmp.path().join("none"), &extra);
        assert_eq!(o.status.code(), Some(4));
        assert!(stderr(&o).contains("/m/v9/manifest.json"), "{}", stderr(&o));
        assert!(!stderr(&o).contains("Signature"), "{}", stderr(&o));
    }
}

/// What a pod running as the file's owner or root can do to its read-only
/// file: make it writable and overwrite its start with as many bytes, so
/// that its size does not change.
fn write_through(file: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    std::io::Write::write_all(&mut f, b"EVIL!").unwrap();
}

/// A pod that writes through its copy of a file (a hard link to the node
/// cache's blob) must not change what the next pod on the node gets: blobs
/// are read-only, and a hit is proven (the blob's inode, size and times as
/// recorded when it was verified) or re-hashed; a blob that no longer
/// matches its digest is downloaded again.
#[test]
fn a_pod_writing_through_its_file_cannot_poison_the_node_cache() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path(), 11, 1);
    let root = tmp.path().join("origin");
    publish_dir(&model, &root, "v1");
    let source = format!("file://{}", root.display());
    let cache = tmp.path().join("node-cache");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    let (a, b) = (tmp.path().join("pod-a"), tmp.path().join("pod-b"));
    summary(&http_fetch(&source, "v1", &a, &cache_arg));

    let file = a.join("tokenizer.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o444,
        "a cached blob (and every link to it) is read-only"
    );
    // Root (or the file's owner) can still write: that is what must not spread.
    write_through(&file);

    let second = summary(&http_fetch(&source, "v1", &b, &cache_arg));
    assert!(
        tree(&b) == tree(&model),
        "pod B gets the published bytes, not pod A's"
    );
    assert_eq!(
        second["downloadedBytes"], 40_000,
        "only the damaged file again"
    );
}

/// With `--cache-copy` (pods that do not trust each other) a pod's files are
/// copies: they share no inode with the cache's blobs, so whatever a pod
/// does to them, the next pod is served from the cache, untouched, with no
/// re-hash and no download.
#[test]
fn with_cache_copy_a_pods_files_share_nothing_with_the_node_cache() {
    use std::os::unix::fs::MetadataExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path(), 12, 1);
    let root = tmp.path().join("origin");
    publish_dir(&model, &root, "v1");
    let source = format!("file://{}", root.display());
    let cache = tmp.path().join("node-cache");
    let args = ["--cache-dir", cache.to_str().unwrap(), "--cache-copy"];
    let (a, b) = (tmp.path().join("pod-a"), tmp.path().join("pod-b"));
    summary(&http_fetch(&source, "v1", &a, &args));

    let file = a.join("tokenizer.json");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.nlink(), 1, "a copy, not a link to the blob");
    write_through(&file);

    let second = summary(&http_fetch(&source, "v1", &b, &args));
    assert_eq!(tree(&b), tree(&model));
    assert_eq!(second["downloadedBytes"], 0, "{second}");
    assert_eq!(second["cacheHits"], 6, "{second}");
}

/// A manifest whose sizes add up past what u64 holds (or past any model) is
/// refused as the integrity failure it is: before, the sum panicked in a
/// debug build and wrapped in a release build, which skipped the free-space
/// check.
#[test]
fn a_manifest_whose_sizes_overflow_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("origin");
    let dir = root.join("m").join("huge");
    std::fs::create_dir_all(&dir).unwrap();
    let digest = modelcache::digest::sha256_hex(b"abc");
    let manifest = serde_json::json!({
        "formatVersion": 1, "model": "m", "version": "huge",
        "files": [
            {"path": "a.bin", "size": u64::MAX / 2 + 1, "sha256": digest},
            {"path": "b.bin", "size": u64::MAX / 2 + 1, "sha256": digest}
        ]
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let dest = tmp.path().join("pod");
    let source = format!("file://{}", root.display());
    let o = http_fetch(&source, "huge", &dest, &[]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("add up to more than"), "{}", stderr(&o));
    assert!(tree(&dest).is_empty());
}

/// An object at the origin shorter than its manifest entry is not what the
/// manifest says: an integrity failure (exit 5) at once, not a transient one
/// retried until the attempts run out (exit 7). Both the directory and the
/// HTTP origin (416, or a Content-Range total short of the manifest) say so.
#[test]
fn an_object_shorter_than_its_manifest_entry_is_an_integrity_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path(), 12, 1);
    let (http, root) = http_origin(tmp.path());
    publish_dir(&model, &root, "v1");
    let object = root.join("m/v1/tokenizer.json");
    let bytes = std::fs::read(&object).unwrap();
    std::fs::write(&object, &bytes[..bytes.len() / 2]).unwrap();
    let file_source = format!("file://{}", root.display());
    for (source, dest) in [
        (file_source.as_str(), "pod-file"),
        (http.base_url().as_str(), "pod-http"),
    ] {
        let dest = tmp.path().join(dest);
        let o = http_fetch(source, "v1", &dest, &[]);
        assert_eq!(o.status.code(), Some(5), "{source}: {}", stderr(&o));
        assert!(stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));
        assert!(!dest.join("tokenizer.json").exists());
    }
}

/// The destination's `.modelcache` (locks, partial files, the marker) must be
/// a directory of its own: a symlink there would have the fetcher write
/// wherever it points.
#[test]
fn a_symlinked_state_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path(), 13, 1);
    let root = tmp.path().join("origin");
    publish_dir(&model, &root, "v1");
    let dest = tmp.path().join("pod");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dest.join(".modelcache")).unwrap();
    let o = http_fetch(&format!("file://{}", root.display()), "v1", &dest, &[]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(".modelcache") && stderr(&o).contains("symlink"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written through the link"
    );
}

/// A version of many files fetches under a small open-files limit: only a
/// bounded number of transfers is open at once (each holds its partial file
/// and its journal). Every file was opened at once before, so 600 files
/// under `ulimit -n 256` ended in EMFILE.
#[test]
fn many_files_fetch_under_a_small_open_files_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("many");
    for i in 0..600 {
        let p = model
            .join(format!("shard-{:03}/part.bin", i % 7))
            .with_file_name(format!("part-{i}.bin"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("file {i}\n").repeat(i % 5 + 1)).unwrap();
    }
    let root = tmp.path().join("origin");
    publish_dir(&model, &root, "v1");
    let dest = tmp.path().join("pod");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 256 && exec "$0" "$@""#)
        .arg(BIN)
        .args(["fetch", "--source", &format!("file://{}", root.display())])
        .args(["--model", "m", "--version", "v1", "--progress", "off"])
        .arg("--dest")
        .arg(&dest)
        .output()
        .unwrap();
    let summary = summary(&out);
    assert_eq!(summary["files"], 600);
    assert!(tree(&dest) == tree(&model), "the files arrive intact");
}

/// Two versions that share files, fetched at once into one node cache (two
/// pods of a rollout on one node): each shared blob is downloaded once, by
/// one of them, and the other waits for it. The lock was per version, so
/// both wrote the same partial file.
#[test]
fn two_versions_sharing_files_fetched_at_once_download_them_once() {
    let s3 = moto_with_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let v1 = model_dir(tmp.path(), 14, 16);
    let v2 = tmp.path().join("model-14-v2");
    std::fs::create_dir_all(&v2).unwrap();
    for (rel, data) in tree(&v1) {
        let p = v2.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    std::fs::write(
        v2.join("release-notes.txt"),
        b"v2: a configuration release\n",
    )
    .unwrap();
    publish_s3(&s3, &v1, "v1");
    publish_s3(&s3, &v2, "v2");
    let (_rt, proxy) = Proxy::start_blocking(s3.port(), ProxyConfig::default());
    let endpoint = proxy.endpoint();
    let env = creds(&s3);
    let cache = tmp.path().join("cache");
    let children: Vec<_> = [("a", "v1"), ("b", "v2")]
        .iter()
        .map(|(pod, version)| {
            let dest = tmp.path().join(pod);
            let mut args = fetch_args(&endpoint, version, dest.to_str().unwrap());
            args.extend(["--cache-dir", cache.to_str().unwrap()]);
            modelcache(&args, &env_of(&env))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        summary(&c.wait_with_output().unwrap());
    }
    assert!(tree(&tmp.path().join("a")) == tree(&v1));
    assert!(tree(&tmp.path().join("b")) == tree(&v2));
    let body = proxy
        .stats
        .body_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    // The distinct content of both versions (two files of v1 are equal),
    // plus the two manifests; a split range may add what was in flight.
    let distinct: u64 = tree(&v2).values().map(|d| d.len() as u64).sum::<u64>() - 14;
    assert!(
        body < distinct + distinct / 4 + 4096,
        "the shared files crossed the wire once: {body} bytes for {distinct}"
    );
}

/// Two directories that differ in one file, as two publishes of one version
/// would carry (two CI jobs releasing at once).
fn rival_dirs(root: &Path) -> (PathBuf, PathBuf) {
    let make = |name: &str, seed: u64| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{\"layers\": 2}\n").unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        let weights: Vec<u8> = (0..(4 << 20)).map(|_| rng.u8(..)).collect();
        std::fs::write(dir.join("weights.bin"), weights).unwrap();
        dir
    };
    (make("rival-a", 1), make("rival-b", 2))
}

/// Publishes of one version running at the same time (issue 16, item 12):
/// each object is written only where none is, so exactly one publish wins
/// and the other is refused (exit 3), and the version that stays is whole.
/// Before, both checked for a manifest, found none, and both reported
/// success while overwriting each other's files and manifest (a version
/// whose bytes changed after its publish had succeeded).
#[test]
fn concurrent_publishes_of_one_version_leave_one_whole_winner() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = rival_dirs(tmp.path());
    let root = tmp.path().join("origin");
    let to = format!("file://{}", root.display());
    for round in 0..6 {
        let version = format!("r{round}");
        let start = |dir: &Path| {
            modelcache(
                &[
                    "publish",
                    "--dir",
                    dir.to_str().unwrap(),
                    "--to",
                    &to,
                    "--model",
                    "m",
                    "--version",
                    &version,
                ],
                &[],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        };
        let (first, second) = (start(&a), start(&b));
        let outcomes = [
            first.wait_with_output().unwrap(),
            second.wait_with_output().unwrap(),
        ];
        let codes: Vec<Option<i32>> = outcomes.iter().map(|o| o.status.code()).collect();
        let winners: Vec<usize> = (0..2).filter(|&i| codes[i] == Some(0)).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exit codes {codes:?}: {} / {}",
            stderr(&outcomes[0]),
            stderr(&outcomes[1])
        );
        let loser = &outcomes[1 - winners[0]];
        assert_eq!(loser.status.code(), Some(3), "{}", stderr(loser));
        assert!(
            stderr(loser).contains("versions are immutable"),
            "{}",
            stderr(loser)
        );
        // What stays is the winner's directory, byte for byte, and a fetch
        // verifies it.
        let winner = [&a, &b][winners[0]];
        let dest = tmp.path().join(format!("dest-{round}"));
        let fetched = run(
            &[
                "fetch",
                "--source",
                &to,
                "--model",
                "m",
                "--version",
                &version,
                "--dest",
                dest.to_str().unwrap(),
                "--progress",
                "off",
            ],
            &[],
        );
        summary(&fetched);
        assert_eq!(tree(&dest), tree(winner), "round {round}");
    }
}

/// On S3 (s3s-fs), the objects of a publish that stopped before its manifest
/// are not overwritten by another directory's publish of the same version
/// (If-None-Match: *); the first publish resumes over its own objects.
#[test]
fn an_s3_publish_never_overwrites_another_publishs_objects() {
    let s3 = S3Server::s3s_fs().unwrap_or_else(|e| panic!("{e}"));
    create_bucket(&s3, "models");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = rival_dirs(tmp.path());
    publish_s3(&s3, &a, "v1");
    // As if the publish of `a` had stopped after its files.
    delete_object(&s3, "models", "prod/m/v1/manifest.json");

    let env = creds(&s3);
    let refused = run_publish_s3(&s3, &b, "v1");
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("already holds other bytes for weights.bin"),
        "{message}"
    );

    // The first directory's publish resumes: its objects are its own.
    let resumed = publish_s3(&s3, &a, "v1");
    assert_eq!(resumed["alreadyPublished"], false);
    let dest = tmp.path().join("dest");
    summary(&run(
        &fetch_args(&s3.endpoint(), "v1", dest.to_str().unwrap()),
        &env_of(&env),
    ));
    assert_eq!(tree(&dest), tree(&a));
}

fn delete_object(s3: &S3Server, bucket: &str, key: &str) {
    let (rt, client) = admin_client(s3);
    rt.block_on(client.delete_object().bucket(bucket).key(key).send())
        .unwrap();
}

/// Fault injection (issue 16): as `kill_nine_at_random_moments_...` but
/// through a node cache, whose blobs, proofs and locks a kill can cut too:
/// `fetch` killed with SIGKILL again and again, into one destination and one
/// node cache, at a moment
/// drawn uniformly from the time a whole fetch takes here (measured first),
/// so that it is cut anywhere: manifest, ranges, verification, placing.
/// After every kill, no file at a final path and no blob in the node cache
/// holds bytes other than its manifest digest; the fetch that finally runs to the end
/// leaves the published tree, byte for byte. The counts are printed for the
/// closing note (`--nocapture`).
#[test]
fn fetch_killed_at_random_points_never_leaves_a_wrong_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (http, root) = http_origin(tmp.path());
    let src = model_dir(tmp.path(), 13, 24);
    publish_dir(&src, &root, "v1");
    let base = http.base_url();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("m/v1/manifest.json")).unwrap()).unwrap();
    let digests: BTreeMap<String, String> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let dest = tmp.path().join("pod");
    let cache = tmp.path().join("node-cache");
    let mut rng = fastrand::Rng::with_seed(16);
    let fetch = |dest: &Path, cache: &Path| {
        modelcache(
            &[
                "fetch",
                "--source",
                &base,
                "--model",
                "m",
                "--version",
                "v1",
                "--dest",
                dest.to_str().unwrap(),
                "--cache-dir",
                cache.to_str().unwrap(),
                "--progress",
                "off",
            ],
            &[],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
    };
    // The second of two whole fetches: the first also pays for loading the
    // binary and a cold page cache, which would put most kills after the end.
    let mut took = 0;
    for attempt in ["timed-1", "timed-2"] {
        let started = Instant::now();
        let dir = tmp.path().join(attempt);
        let whole = fetch(&dir.join("pod"), &dir.join("cache")).wait().unwrap();
        assert!(whole.success());
        took = started.elapsed().as_micros() as u64;
    }
    let (mut kills, mut finished_before_kill) = (0, 0);
    let check = |when: &str| {
        for (path, bytes) in tree(&dest) {
            let want = digests
                .get(&path)
                .unwrap_or_else(|| panic!("{when}: stray {path}"));
            assert_eq!(
                &modelcache::digest::sha256_hex(&bytes),
                want,
                "{when}: {path}"
            );
        }
        if let Ok(blobs) = std::fs::read_dir(cache.join("blobs")) {
            for blob in blobs.flatten() {
                let name = blob.file_name().to_string_lossy().into_owned();
                let bytes = std::fs::read(blob.path()).unwrap();
                assert_eq!(modelcache::digest::sha256_hex(&bytes), name, "{when}: blob");
            }
        }
    };
    // Runs go on until enough of them were cut: a resumed fetch has less
    // left to do than the timed one, so how many finish before their kill
    // depends on the machine. Bounded, so that a fetch that never gets cut
    // fails the count below instead of looping.
    let mut runs = 0;
    while kills < 30 && runs < 300 {
        let run = runs;
        runs += 1;
        let mut child = fetch(&dest, &cache);
        std::thread::sleep(Duration::from_micros(rng.u64(0..took)));
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "run {run}: {status}");
                finished_before_kill += 1
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
        check(&format!("after run {run}"));
        // A finished fetch would make every later run a no-op: start over
        // from nothing. Until then each run resumes what the killed ones left.
        if tree(&dest).len() == digests.len() {
            std::fs::remove_dir_all(&dest).unwrap();
            std::fs::remove_dir_all(&cache).unwrap();
        }
    }
    let last = summary(&http_fetch(
        &base,
        "v1",
        &dest,
        &["--cache-dir", cache.to_str().unwrap()],
    ));
    assert_eq!(tree(&dest), tree(&src), "{last}");
    check("at the end");
    println!(
        "fault injection: {runs} fetch runs, {kills} killed with SIGKILL within a whole fetch's \
         {} ms, {finished_before_kill} finished first; 0 wrong files at final paths or in the \
         node cache; the last fetch byte-identical",
        took / 1000
    );
    assert!(kills >= 20, "too few kills to mean anything: {kills}");
}

/// An origin on loopback that answers every request with `reply` (and keeps
/// the connection open); `None` answers nothing at all.
fn raw_origin(reply: Option<&'static [u8]>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // One read per request is enough for these small GETs.
                while let Ok(n) = std::io::Read::read(&mut &stream, &mut buf) {
                    if n == 0 {
                        return;
                    }
                    if let Some(bytes) = reply {
                        let _ = std::io::Write::write_all(&mut &stream, bytes);
                    }
                }
            });
        }
    });
    port
}

/// Fault injection (issue 16): an origin that accepts and never answers ends
/// the fetch at its deadline (exit 7, transient: the next run may succeed),
/// and one that answers garbage for the manifest ends it as the integrity
/// failure it is (exit 5); neither leaves anything at a final path.
#[test]
fn a_stalled_or_garbage_speaking_origin_ends_the_fetch_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, reply, code) in [
        ("stalled", None, 7),
        (
            "garbage",
            Some(&b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"files\":"[..]),
            5,
        ),
    ] {
        let port = raw_origin(reply);
        let dest = tmp.path().join(name);
        let started = Instant::now();
        let out = http_fetch(
            &format!("http://127.0.0.1:{port}"),
            "v1",
            &dest,
            &["--deadline", "3"],
        );
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(code), "{name}: {}", stderr(&out));
        assert!(took < Duration::from_secs(20), "{name}: took {took:?}");
        assert!(tree(&dest).is_empty(), "{name}: {:?}", tree(&dest).keys());
        println!(
            "fault injection: {name} origin: exit {code} after {:.1} s",
            took.as_secs_f64()
        );
    }
}
