//! `modelcache warm` in engine mode against a real engine on loopback:
//! llama-cpp-python's OpenAI-compatible server serving SmolLM2-135M.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{LlamaServer, free_port};

/// GET `path` with `Connection: close`, reading to the end (no half-close:
/// hyper drops a request whose client shuts down its write side).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    ))
}

const BIN: &str = env!("CARGO_BIN_EXE_modelcache");

/// The tests that run an engine take turns. Retention is judged from
/// timings (a warmed prefix answers in under half its cold time), and two
/// engines prefilling side by side on this machine's two cores made a cold
/// measurement slow enough that a later re-prefill passed for a hit.
static ENGINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_engine_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ENGINE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A shared system prompt of a few hundred tokens, different per `tag`.
fn prompt(tag: &str) -> String {
    format!(
        "System ({tag}): you are the support assistant of the ACME model store. {}\nUser:",
        "Answer politely, cite the documentation, never invent prices, and keep answers short. "
            .repeat(12)
    )
}

fn prompts_file(dir: &std::path::Path, prompts: &[String]) -> std::path::PathBuf {
    let path = dir.join("prompts.txt");
    std::fs::write(&path, prompts.join("\n---\n")).unwrap();
    path
}

#[test]
fn once_warms_each_prefix_and_reports_what_the_engine_kept() {
    let _turn = one_engine_at_a_time();
    let engine = LlamaServer::start(None).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let file = prompts_file(dir.path(), &[prompt("first"), prompt("second")]);
    let out = Command::new(BIN)
        .args([
            "warm",
            "--once",
            "--engine-url",
            &engine.base_url(),
            "--prompts",
        ])
        .arg(&file)
        .args(["--concurrency", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let prefixes = report["prefixes"].as_array().unwrap();
    assert_eq!(prefixes.len(), 2);
    for p in prefixes {
        let (cold, warm) = (p["coldMs"].as_f64().unwrap(), p["warmMs"].as_f64().unwrap());
        assert!(warm < cold, "the warmed prefix's TTFT drops: {p}");
    }
    // llama-cpp-python keeps only the last prompt's state by default: one of
    // two is retained, the warmer says so and warms the first prompt last.
    assert_eq!(report["retained"], 1, "{report}");
    let warning = report["warning"].as_str().unwrap();
    assert!(warning.contains("kept 1 of 2"), "{warning}");
}

fn ready_status(port: u16) -> Option<u16> {
    get(port, "/readyz").map(|(status, _)| status)
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report(port: u16) -> serde_json::Value {
    let (_, body) = get(port, "/report").unwrap();
    serde_json::from_str(&body).unwrap()
}

#[test]
fn the_sidecar_turns_ready_only_when_warm_and_again_after_an_engine_restart() {
    let _turn = one_engine_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let file = prompts_file(dir.path(), &[prompt("sidecar")]);
    let engine_port = free_port();
    let ready_port = free_port();
    // The sidecar starts first, as a native sidecar does, and waits.
    let mut sidecar = Command::new(BIN)
        .args([
            "warm",
            "--engine-url",
            &format!("http://127.0.0.1:{engine_port}"),
            "--prompts",
        ])
        .arg(&file)
        .args([
            "--ready-addr",
            &format!("127.0.0.1:{ready_port}"),
            "--check-interval",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the readiness endpoint", Duration::from_secs(30), || {
        ready_status(ready_port).is_some()
    });
    assert_eq!(
        ready_status(ready_port),
        Some(503),
        "not ready without an engine"
    );

    let engine = LlamaServer::start(Some(engine_port)).unwrap_or_else(|e| panic!("{e}"));
    wait_for("ready after warming", Duration::from_secs(120), || {
        ready_status(ready_port) == Some(200)
    });
    let first = report(ready_port);
    assert_eq!(first["warmups"], 1);
    let p = &first["last"]["prefixes"][0];
    assert!(
        p["warmMs"].as_f64().unwrap() < p["coldMs"].as_f64().unwrap(),
        "{p}"
    );

    // The engine restarts and loses its cache: unready, then warm again.
    drop(engine);
    wait_for(
        "unready while the engine is down",
        Duration::from_secs(30),
        || ready_status(ready_port) == Some(503),
    );
    let _engine = LlamaServer::start(Some(engine_port)).unwrap_or_else(|e| panic!("{e}"));
    wait_for("ready after re-warming", Duration::from_secs(120), || {
        ready_status(ready_port) == Some(200)
    });
    assert_eq!(report(ready_port)["warmups"], 2);
    let _ = sidecar.kill();
    let _ = sidecar.wait();
}

#[test]
fn a_missing_prompts_file_and_an_absent_engine_have_their_exit_codes() {
    let out = Command::new(BIN)
        .args([
            "warm",
            "--once",
            "--engine-url",
            "http://127.0.0.1:9",
            "--prompts",
            "/nonexistent/prompts",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/prompts"));
    let dir = tempfile::tempdir().unwrap();
    let file = prompts_file(dir.path(), &["hello".to_string()]);
    let out = Command::new(BIN)
        .args([
            "warm",
            "--once",
            "--wait",
            "1",
            "--engine-url",
            &format!("http://127.0.0.1:{}", free_port()),
            "--prompts",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed to reach the engine"));
}
