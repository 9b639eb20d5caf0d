//! Sweep benchmark: `cargo bench --bench sweep` (or `scripts/bench.sh sweep`).
//!
//! One redis-server, a retired version with a million keys and a live
//! version with 200k. A reader GETs random live keys the whole time; its
//! latency is measured with no sweep (the baseline), during modelcache's
//! sweep (paced by latency, the policy default; unpaced; and at a fixed
//! 100k keys/s), during
//! `KEYS` + `DEL`, and during the reference design's `SCAN` (COUNT 1000) +
//! `DEL`. Ratios are against the baseline of the same run.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use modelcache::keyspace::keys::{self, Layer};
use modelcache::keyspace::sweep::{self, Pace};
use redis::aio::MultiplexedConnection;

const RETIRED: u64 = 1_000_000;
const LIVE: u64 = 200_000;

struct Run {
    name: &'static str,
    keys_per_second: Option<f64>,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    reads: usize,
}

async fn connect(url: &str) -> MultiplexedConnection {
    // Loading a million keys takes longer than the default response timeout.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(120)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

async fn load(conn: &mut MultiplexedConnection) {
    let _: () = redis::cmd("FLUSHALL")
        .arg("SYNC")
        .query_async(conn)
        .await
        .unwrap();
    for (version, n) in [("v1", RETIRED), ("v2", LIVE)] {
        let prefix = keys::entry("chat", version, Layer::Result, "d");
        let _: () = redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(n)
            .arg(prefix)
            .arg(64)
            .query_async(conn)
            .await
            .unwrap();
    }
}

/// Reads random live keys until told to stop; returns latencies in µs.
fn reader(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<f64>> {
    tokio::spawn(async move {
        let mut conn = connect(&url).await;
        let prefix = keys::entry("chat", "v2", Layer::Result, "d");
        let mut latencies = Vec::with_capacity(1 << 20);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("{prefix}:{}", x % LIVE);
            let t = Instant::now();
            let v: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            latencies.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(v.is_some(), "a live key went missing: {key}");
        }
        latencies
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure<F, Fut>(url: &str, name: &'static str, op: F) -> Run
where
    F: FnOnce(MultiplexedConnection) -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    let mut conn = connect(url).await;
    load(&mut conn).await;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = reader(url.to_owned(), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let deleted = op(conn.clone()).await;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = handle.await.unwrap();
    latencies.sort_by(|a, b| a.total_cmp(b));
    if let Some(n) = deleted {
        let left = sweep::count_version(&mut conn, "chat", "v1", 10_000)
            .await
            .unwrap();
        assert_eq!(
            (n, left),
            (RETIRED, 0),
            "{name} must delete exactly the retired version"
        );
        let live = sweep::count_version(&mut conn, "chat", "v2", 10_000)
            .await
            .unwrap();
        assert_eq!(live, LIVE, "{name} must leave the live version");
    }
    Run {
        name,
        keys_per_second: deleted.map(|n| n as f64 / seconds),
        seconds,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        reads: latencies.len(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let redis = support::RedisServer::start_with(None, &[("enable-debug-command", "local")])
        .unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let mut runs = Vec::new();

    runs.push(
        measure(&url, "no sweep (baseline)", |_| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            None
        })
        .await,
    );
    // The policy default: paced by latency, batches of 100.
    for (name, pace) in [
        ("modelcache sweep, latency-paced (default)", Pace::default()),
        (
            "modelcache sweep, unpaced, batch 1000",
            Pace::fixed(10_000_000, 1000),
        ),
        (
            "modelcache sweep, unpaced, batch 100",
            Pace::fixed(10_000_000, 100),
        ),
        (
            "modelcache sweep, 100k/s, batch 100",
            Pace::fixed(100_000, 100),
        ),
    ] {
        let probe_url = url.clone();
        runs.push(
            measure(&url, name, |mut c| async move {
                // The probe a latency pace times: a connection of its own.
                let mut probe = connect(&probe_url).await;
                Some(
                    sweep::sweep_version(&mut c, Some(&mut probe), "chat", "v1", pace)
                        .await
                        .unwrap()
                        .deleted,
                )
            })
            .await,
        );
    }
    runs.push(
        measure(&url, "KEYS + DEL", |mut c| async move {
            let found: Vec<Vec<u8>> = redis::cmd("KEYS")
                .arg(keys::version_pattern("chat", "v1"))
                .query_async(&mut c)
                .await
                .unwrap();
            let mut deleted = 0;
            for chunk in found.chunks(1000) {
                let n: u64 = redis::cmd("DEL")
                    .arg(chunk)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                deleted += n;
            }
            Some(deleted)
        })
        .await,
    );
    runs.push(
        measure(&url, "reference SCAN 1000 + DEL", |mut c| async move {
            let mut cursor = 0u64;
            let mut deleted = 0;
            loop {
                let (next, found): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(keys::version_pattern("chat", "v1"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                if !found.is_empty() {
                    let n: u64 = redis::cmd("DEL")
                        .arg(&found)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    deleted += n;
                }
                cursor = next;
                if cursor == 0 {
                    break Some(deleted);
                }
            }
        })
        .await,
    );

    let base = &runs[0];
    let (b50, b99) = (base.p50_us, base.p99_us);
    println!(
        "\nSweep of {RETIRED} keys beside {LIVE} live keys; a reader GETs live keys throughout.\n\
         Machine: {} cores; redis-server {}.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        redis_version(&url).await
    );
    println!(
        "| {:<46} | {:>12} | {:>8} | {:>9} | {:>9} | {:>8} | {:>8} | {:>9} |",
        "run", "keys/s", "seconds", "p50 µs", "p99 µs", "p50 ×", "p99 ×", "reads"
    );
    println!(
        "|{:-<48}|{:->14}|{:->10}|{:->11}|{:->11}|{:->10}|{:->10}|{:->11}|",
        "", "", "", "", "", "", "", ""
    );
    for r in &runs {
        println!(
            "| {:<46} | {:>12} | {:>8.2} | {:>9.1} | {:>9.1} | {:>8.2} | {:>8.2} | {:>9} |",
            r.name,
            r.keys_per_second
                .map(|k| format!("{k:.0}"))
                .unwrap_or_else(|| "-".into()),
            r.seconds,
            r.p50_us,
            r.p99_us,
            r.p50_us / b50,
            r.p99_us / b99,
            r.reads
        );
    }
}

async fn redis_version(url: &str) -> String {
    let mut c = connect(url).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap();
    modelcache::store::info::parse_info(&info)
        .redis_version
        .unwrap_or_default()
}
