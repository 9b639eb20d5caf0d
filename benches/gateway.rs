//! Gateway benchmark: `scripts/bench.sh gateway`.
//!
//! One upstream stub (50 ms before it answers, as a fast LLM would), one
//! redis-server, and in front of the stub: `modelcache gateway` (the release
//! binary), LiteLLM's proxy with its Redis cache, and the ceiling
//! (`examples/ceiling.rs`: one Redis GET of a fixed key per request, on the
//! gateway's own stack). The same load generator drives each at 1, 16 and
//! 256 concurrent clients: exact-hit throughput and p50/p99 latency; then
//! the latency a miss adds over calling the stub directly, the first-byte
//! time of a streamed hit, and the gateway's peak RSS. Ratios are against
//! the same run's figures.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use futures::StreamExt;
use serde_json::{Value, json};

const STUB_LATENCY: Duration = Duration::from_millis(50);
const SECONDS_PER_POINT: Duration = Duration::from_secs(4);
const CONCURRENCY: [usize; 3] = [1, 16, 256];

/// The upstream: 50 ms, then an answer (an SSE stream of 8 chunks when asked).
async fn stub(body: axum::body::Bytes) -> axum::response::Response {
    tokio::time::sleep(STUB_LATENCY).await;
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let head = json!({"id": "cmpl-bench", "created": 1_700_000_000, "model": "bench"});
    if request["stream"] == json!(true) {
        let mut out = String::new();
        for i in 0..8 {
            let mut c = head.clone();
            c["object"] = json!("chat.completion.chunk");
            c["choices"] = json!([{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": null}]);
            out.push_str(&format!("data: {c}\n\n"));
        }
        let mut last = head.clone();
        last["choices"] = json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]);
        out.push_str(&format!("data: {last}\n\n"));
        if request["stream_options"]["include_usage"] == json!(true) {
            let mut u = head.clone();
            u["choices"] = json!([]);
            u["usage"] = json!({"prompt_tokens": 24, "completion_tokens": 16, "total_tokens": 40});
            out.push_str(&format!("data: {u}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        return ([("content-type", "text/event-stream")], out).into_response();
    }
    let mut answer = head;
    answer["object"] = json!("chat.completion");
    answer["choices"] = json!([{"index": 0, "message": {"role": "assistant",
        "content": "New employees get 25 vacation days a year, from their first month."},
        "logprobs": null, "finish_reason": "stop"}]);
    answer["usage"] = json!({"prompt_tokens": 24, "completion_tokens": 16, "total_tokens": 40});
    ([("content-type", "application/json")], answer.to_string()).into_response()
}

/// The stub on a runtime of its own, so that it never waits for the load.
fn start_stub() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().fallback(axum::routing::post(stub));
            axum::serve(listener, app).await.unwrap();
        });
    });
    port
}

fn chat(question: &str, stream: bool) -> String {
    json!({"model": "bench", "temperature": 0, "stream": stream, "messages": [
        {"role": "system", "content": "You are the HR assistant of ACME."},
        {"role": "user", "content": question}]})
    .to_string()
}

struct Point {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `clients` loops posting `body()` to `url` for `SECONDS_PER_POINT`.
async fn drive(
    url: &str,
    clients: usize,
    body: impl Fn(u64) -> String + Send + Sync + 'static,
) -> Point {
    let until = Instant::now() + SECONDS_PER_POINT;
    drive_until(
        url,
        clients,
        body,
        Arc::new(move || Instant::now() >= until),
    )
    .await
}

/// [`drive`] until `done` says so.
async fn drive_until(
    url: &str,
    clients: usize,
    body: impl Fn(u64) -> String + Send + Sync + 'static,
    done: Arc<dyn Fn() -> bool + Send + Sync>,
) -> Point {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let body = Arc::new(body);
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.to_owned(), Arc::clone(&body));
            let (counter, errors) = (Arc::clone(&counter), Arc::clone(&errors));
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !done() {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .bearer_auth("sk-bench")
                        .body(body(n))
                        .send()
                        .await;
                    let ok = match sent {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    if ok {
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Point {
        rps: all.len() as f64 / seconds,
        p50_ms: quantile(&all, 0.5),
        p99_ms: quantile(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Time to the first byte of the body of `requests` streamed requests, p50.
async fn first_byte_ms(url: &str, body: &str, requests: usize) -> f64 {
    let client = reqwest::Client::new();
    let mut times = Vec::new();
    for _ in 0..requests {
        let t = Instant::now();
        let resp = client
            .post(url)
            .header("content-type", "application/json")
            .bearer_auth("sk-bench")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let mut stream = resp.bytes_stream();
        if let Some(Ok(_)) = stream.next().await {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        while stream.next().await.is_some() {}
    }
    times.sort_by(f64::total_cmp);
    quantile(&times, 0.5)
}

/// Whether `url` answers a GET with 2xx. Only the status line is read, and
/// the request is not half-closed (hyper drops a request whose client shut
/// its side before the answer was ready).
fn answers(url: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", parsed.port().unwrap_or(80)))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        parsed.path()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 2")
}

fn wait_http(url: &str, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if answers(url) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} did not answer {url} within {limit:?}");
}

/// Kills the child when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn litellm() -> std::path::PathBuf {
    let venv = std::env::var("MODELCACHE_BENCH_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/modelcache/venv-litellm",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let path = std::path::Path::new(&venv).join("bin/litellm");
    assert!(
        path.exists(),
        "LiteLLM's proxy is not installed at {}: run scripts/setup.sh --bench",
        path.display()
    );
    path
}

fn start_litellm(stub_port: u16, redis_port: u16, work: &std::path::Path) -> (Child, String) {
    let port = support::free_port();
    let config = work.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      \
             api_base: http://127.0.0.1:{stub_port}/v1\n      api_key: sk-stub\n\
             litellm_settings:\n  cache: true\n  cache_params:\n    type: redis\n    \
             host: 127.0.0.1\n    port: {redis_port}\n\
             general_settings:\n  master_key: sk-bench\n"
        ),
    )
    .unwrap();
    let child = Command::new(litellm())
        .args(["--config"])
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        // No network here: the bundled model-cost map, no telemetry.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY", "False")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("litellm.log")).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let child = Child(child);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !answers(&format!("{url}/health/liveliness")) {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(work.join("litellm.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "LiteLLM's proxy did not answer within 180 s; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    (child, url)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let work = tempfile::tempdir().unwrap();
    // DEBUG POPULATE loads the retired version for the sweep phase.
    let redis = support::RedisServer::start_with(None, &[("enable-debug-command", "local")])
        .unwrap_or_else(|e| panic!("{e}"));
    let stub_port = start_stub();
    let stub_url = format!("http://127.0.0.1:{stub_port}/v1/chat/completions");

    let (port, admin) = (support::free_port(), support::free_port());
    let gateway = Child(
        Command::new(env!("CARGO_BIN_EXE_modelcache"))
            .args(["gateway", "--model", "bench", "--version", "v1"])
            .args(["--upstream", &format!("http://127.0.0.1:{stub_port}")])
            .args(["--redis-url", &redis.url()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .env("MODELCACHE_GATEWAY_SECRET", "bench-secret-0123456789abcdef")
            .env("MODELCACHE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_http(
        &format!("http://127.0.0.1:{admin}/readyz"),
        "the gateway",
        Duration::from_secs(30),
    );
    let gateway_url = format!("http://127.0.0.1:{port}/v1/chat/completions");

    let (litellm, litellm_base) = start_litellm(stub_port, redis.port(), work.path());
    let litellm_url = format!("{litellm_base}/v1/chat/completions");

    // The ceiling serves the stored bytes of the gateway's one entry.
    let question = "How many vacation days do new employees get?";
    let client = reqwest::Client::new();
    for url in [&gateway_url, &litellm_url] {
        for stream in [false, true] {
            client
                .post(url)
                .header("content-type", "application/json")
                .bearer_auth("sk-bench")
                .body(chat(question, stream))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let entries: Vec<String> = redis::cmd("KEYS")
        .arg("mc:bench:v1:response:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        entries.len(),
        1,
        "the gateway stored its answer: {entries:?}"
    );
    let ceiling_port = support::free_port();
    // Beside this bench in the same target directory (target/release/deps/..),
    // wherever CARGO_TARGET_DIR puts it.
    let ceiling_bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/ceiling");
    let _ceiling = Child(
        Command::new(&ceiling_bin)
            .args([
                &format!("127.0.0.1:{ceiling_port}"),
                &redis.url(),
                &entries[0],
            ])
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; build it: cargo build --release --example ceiling",
                    ceiling_bin.display()
                )
            }),
    );
    let ceiling_url = format!("http://127.0.0.1:{ceiling_port}/");
    wait_http(&ceiling_url, "the ceiling", Duration::from_secs(10));

    println!(
        "\nGateway benchmark: exact hits of one chat request; upstream stub answering after {} ms.\n\
         Machine: {} cores; redis-server {}; the load generator shares the machine.\n",
        STUB_LATENCY.as_millis(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        String::from_utf8_lossy(
            &Command::new("redis-server")
                .arg("--version")
                .output()
                .unwrap()
                .stdout
        )
        .split_whitespace()
        .nth(2)
        .unwrap_or("?")
        .trim_start_matches("v="),
    );
    println!(
        "| {:<34} | {:>8} | {:>10} | {:>9} | {:>9} | {:>6} |",
        "target", "clients", "req/s", "p50 ms", "p99 ms", "errors"
    );
    println!(
        "|{:-<36}|{:->10}|{:->12}|{:->11}|{:->11}|{:->8}|",
        "", "", "", "", "", ""
    );
    let hit = move |_: u64| chat(question, false);
    let mut results = std::collections::BTreeMap::new();
    for (name, url) in [
        ("stub directly (50 ms, no cache)", stub_url.as_str()),
        ("ceiling (one Redis GET)", ceiling_url.as_str()),
        ("modelcache gateway, exact hit", gateway_url.as_str()),
        ("LiteLLM proxy + Redis cache, hit", litellm_url.as_str()),
    ] {
        for clients in CONCURRENCY {
            let p = drive(url, clients, hit).await;
            println!(
                "| {name:<34} | {clients:>8} | {:>10.0} | {:>9.2} | {:>9.2} | {:>6} |",
                p.rps, p.p50_ms, p.p99_ms, p.errors
            );
            results.insert((name, clients), p);
        }
    }

    // A miss: a new question each time, one client.
    let miss = |n: u64| chat(&format!("Question number {n} about the dress code?"), false);
    let direct = drive(&stub_url, 1, miss).await;
    let via_gateway = drive(&gateway_url, 1, move |n| miss(n + 1_000_000)).await;
    let via_litellm = drive(&litellm_url, 1, move |n| miss(n + 2_000_000)).await;
    let first_gateway = first_byte_ms(&gateway_url, &chat(question, true), 200).await;
    let first_litellm = first_byte_ms(&litellm_url, &chat(question, true), 200).await;
    let rss = peak_rss_mib(gateway.0.id());
    drop(litellm);

    let g = |c| &results[&("modelcache gateway, exact hit", c)];
    let l = |c| &results[&("LiteLLM proxy + Redis cache, hit", c)];
    let ceil = |c| &results[&("ceiling (one Redis GET)", c)];
    println!();
    for c in CONCURRENCY {
        println!(
            "{c:>3} clients: gateway hits {:.1}x LiteLLM's throughput (goal ≥ 10x), {:.2}x the ceiling's (goal ≥ 0.5x)",
            g(c).rps / l(c).rps,
            g(c).rps / ceil(c).rps
        );
    }
    println!(
        "hit p99 at 256 clients: gateway {:.2} ms (goal ≤ 5 ms), LiteLLM {:.2} ms",
        g(256).p99_ms,
        l(256).p99_ms
    );
    println!(
        "a miss adds (p50 over the stub called directly, {:.2} ms): gateway {:.2} ms (goal ≤ 1 ms), LiteLLM {:.2} ms",
        direct.p50_ms,
        via_gateway.p50_ms - direct.p50_ms,
        via_litellm.p50_ms - direct.p50_ms
    );
    println!(
        "first byte of a streamed hit, p50: gateway {first_gateway:.2} ms, LiteLLM {first_litellm:.2} ms"
    );
    println!("gateway peak RSS: {rss:.1} MiB (goal ≤ 128 MiB, no embedding model)");

    under_sweep(&redis.url(), &gateway_url, question).await;
}

/// Keys of the retired version swept while the gateway serves hits.
const RETIRED: u64 = 1_000_000;

/// Exact-hit latency through the gateway (16 clients) with 1M keys of a
/// retired version in Redis, then while they are swept at two paces; and
/// the keys per second each sweep removed.
async fn under_sweep(redis_url: &str, gateway_url: &str, question: &'static str) {
    use modelcache::keyspace::keys::{self, Layer};
    use modelcache::keyspace::sweep::{self, Pace};
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(120)));
    let client = redis::Client::open(redis_url).unwrap();
    let connect = || async {
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    };
    let mut conn = connect().await;
    let populate = |mut conn: redis::aio::MultiplexedConnection| async move {
        let prefix = keys::entry("bench", "v0", Layer::Response, "d");
        let _: () = redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(RETIRED)
            .arg(prefix)
            .arg(512)
            .query_async(&mut conn)
            .await
            .unwrap();
    };
    populate(conn.clone()).await;
    let clients = 16;
    let hit = move |_: u64| chat(question, false);
    let baseline = drive(gateway_url, clients, hit).await;
    println!(
        "\nUnder a sweep: {RETIRED} keys of a retired version (512-byte values) beside the \
         gateway's entry; exact hits at {clients} clients.\n"
    );
    println!(
        "| {:<44} | {:>10} | {:>9} | {:>9} | {:>7} | {:>12} |",
        "sweep", "req/s", "p50 ms", "p99 ms", "p99 ×", "keys/s"
    );
    println!(
        "|{:-<46}|{:->12}|{:->11}|{:->11}|{:->9}|{:->14}|",
        "", "", "", "", "", ""
    );
    println!(
        "| {:<44} | {:>10.0} | {:>9.2} | {:>9.2} | {:>7.2} | {:>12} |",
        "none (baseline)", baseline.rps, baseline.p50_ms, baseline.p99_ms, 1.0, "-"
    );
    for (name, pace) in [
        ("modelcache, latency-paced (default)", Pace::default()),
        (
            "modelcache, fixed 100k keys/s, batch 100",
            Pace::fixed(100_000, 100),
        ),
        (
            "modelcache, unpaced, batch 1000",
            Pace::fixed(10_000_000, 1000),
        ),
    ] {
        let (mut sweeper, mut probe) = (connect().await, connect().await);
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweep = tokio::spawn({
            let finished = Arc::clone(&finished);
            async move {
                let report =
                    sweep::sweep_version(&mut sweeper, Some(&mut probe), "bench", "v0", pace)
                        .await
                        .unwrap();
                finished.store(true, Ordering::Relaxed);
                report
            }
        });
        // Only while the sweep runs: a sweep that ends early must not be
        // judged on traffic after it.
        let during = drive_until(
            gateway_url,
            clients,
            hit,
            Arc::new(move || finished.load(Ordering::Relaxed)),
        )
        .await;
        let report = sweep.await.unwrap();
        let rate = report.deleted as f64 / report.elapsed.as_secs_f64();
        println!(
            "| {name:<44} | {:>10.0} | {:>9.2} | {:>9.2} | {:>7.2} | {:>12.0} |",
            during.rps,
            during.p50_ms,
            during.p99_ms,
            during.p99_ms / baseline.p99_ms,
            rate
        );
        assert_eq!(report.deleted, RETIRED, "{name}");
        if let Some(baseline) = report.baseline_probe {
            println!(
                "  ({name}: probe baseline {:.0} µs, {} slowdowns, {:.2} s)",
                baseline.as_secs_f64() * 1e6,
                report.slowdowns,
                report.elapsed.as_secs_f64()
            );
        }
        populate(conn.clone()).await;
    }
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    println!("\nGoal: p99 within 1.5x of the baseline while the sweep removes ≥ 250k keys/s.");
}
