//! The sweeper on a real redis-server: exact on a million keys, resumable
//! after a kill -9 of the process, and harmless to writers of live versions.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelcache::keyspace::keys::{self, Layer};
use modelcache::keyspace::sweep::{self, Pace};
use redis::aio::MultiplexedConnection;
use support::RedisServer;

const MODELS: [&str; 2] = ["chat", "chat2"];
/// `v1` and `v10` share a prefix; the third has every glob character.
const VERSIONS: [&str; 3] = ["v1", "v10", "v*[1]?\\"];

async fn start() -> (RedisServer, MultiplexedConnection) {
    // DEBUG POPULATE loads a million keys in a second; allowed on loopback only.
    let redis = RedisServer::start_with(None, &[("enable-debug-command", "local")])
        .unwrap_or_else(|e| panic!("{e}"));
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    (redis, conn)
}

/// Loads `per_group` keys for each model and version, plus keys that look
/// close: a model whose name extends another, a version key without its
/// trailing colon, foreign keys.
async fn load(conn: &mut MultiplexedConnection, per_group: u64) {
    for model in MODELS {
        for version in VERSIONS {
            // Keys `<prefix>:<n>` under the version's result layer.
            let prefix = keys::entry(model, version, Layer::Result, "d");
            let _: () = redis::cmd("DEBUG")
                .arg("POPULATE")
                .arg(per_group)
                .arg(&prefix)
                .arg(8)
                .query_async(conn)
                .await
                .unwrap();
        }
    }
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.set(format!("other-app:{i}"), "x").ignore();
        // A version that starts like v1, and a key that is v1 without its colon.
        pipe.set(format!("mc:chat:v1x:result:{i}"), "x").ignore();
        pipe.set("mc:chat:v1", "no trailing colon").ignore();
        pipe.set(format!("mc:chatty:v1:result:{i}"), "x").ignore();
    }
    let _: () = pipe.query_async(conn).await.unwrap();
}

/// Counts keys per group by plain prefix checks on a full SCAN, independent
/// of the code under test.
async fn census(conn: &mut MultiplexedConnection) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .unwrap();
        for key in found {
            let group = MODELS
                .iter()
                .flat_map(|m| VERSIONS.iter().map(move |v| (m, v)))
                .find(|(m, v)| key.starts_with(&keys::version_prefix(m, v)))
                .map(|(m, v)| format!("{m}/{v}"))
                .unwrap_or_else(|| "other".into());
            *counts.entry(group).or_insert(0) += 1;
        }
        cursor = next;
        if cursor == 0 {
            return counts;
        }
    }
}

#[tokio::test]
async fn sweeping_one_version_of_a_million_keys_deletes_exactly_its_keys() {
    let (_redis, mut conn) = start().await;
    load(&mut conn, 166_667).await;
    let before = census(&mut conn).await;
    let total: u64 = before.values().sum();
    assert!(total >= 1_000_000, "{before:?}");
    assert_eq!(before["chat/v1"], 166_667);

    for version in ["v1", "v*[1]?\\"] {
        let report = sweep::sweep_version(
            &mut conn,
            None,
            "chat",
            version,
            Pace::fixed(10_000_000, 1000),
        )
        .await
        .unwrap();
        assert_eq!(report.deleted, 166_667, "{version}: {report:?}");
        assert!(!report.resumed);
    }
    let after = census(&mut conn).await;
    assert_eq!(after.get("chat/v1"), None);
    assert_eq!(after.get("chat/v*[1]?\\"), None);
    for (group, n) in &before {
        if group != "chat/v1" && group != "chat/v*[1]?\\" {
            assert_eq!(after.get(group), Some(n), "{group} lost keys");
        }
    }
    // The checkpoint is gone once a sweep completes, and a second sweep is a no-op.
    let report = sweep::sweep_version(&mut conn, None, "chat", "v1", Pace::default())
        .await
        .unwrap();
    assert_eq!(report.deleted, 0);
    let checkpoint: bool = redis::cmd("EXISTS")
        .arg(keys::sweep_checkpoint("chat", "v1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!checkpoint);
}

/// Redis made slow for everyone mid-sweep (a client blocking it with DEBUG
/// SLEEP, as a burst of heavy commands would): a latency-paced sweep sees its
/// probes slow down and halves its rate, then still deletes exactly the
/// version. A fixed pace under the same stalls does not slow down.
#[tokio::test]
async fn a_latency_paced_sweep_slows_down_while_redis_is_slow_and_ends_exact() {
    let (redis, mut conn) = start().await;
    load(&mut conn, 50_000).await;
    let before = census(&mut conn).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let connect = || async {
        client
            .get_multiplexed_async_connection_with_config(&support::patient())
            .await
            .unwrap()
    };
    for (version, pace) in [
        (
            "v1",
            Pace {
                batch: 100,
                ..Pace::default()
            },
        ),
        ("v10", Pace::fixed(200_000, 100)),
    ] {
        let (mut sweeper, mut probe) = (connect().await, connect().await);
        let sweep = tokio::spawn(async move {
            sweep::sweep_version(&mut sweeper, Some(&mut probe), "chat", version, pace)
                .await
                .unwrap()
        });
        // Once the sweep has written its first checkpoint (its baseline is
        // measured by then), block Redis for 5 ms in every 6 for 1.5 s.
        let checkpoint = keys::sweep_checkpoint("chat", version);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !redis::cmd("EXISTS")
            .arg(&checkpoint)
            .query_async::<bool>(&mut conn)
            .await
            .unwrap()
        {
            assert!(Instant::now() < deadline, "{version}: no checkpoint");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut staller = connect().await;
        let stalls_end = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < stalls_end && !sweep.is_finished() {
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("0.005")
                .query_async(&mut staller)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let report = sweep.await.unwrap();
        eprintln!("{version}: {report:?}");
        assert_eq!(report.deleted, 50_000, "{version}: {report:?}");
        if pace.headroom_percent.is_some() {
            let baseline = report
                .baseline_probe
                .expect("a latency pace has a baseline");
            assert!(baseline < Duration::from_millis(5), "{report:?}");
            assert!(report.slowdowns >= 1, "the stalls slowed it: {report:?}");
        } else {
            assert_eq!(report.baseline_probe, None);
            assert_eq!(report.slowdowns, 0);
        }
    }
    let after = census(&mut conn).await;
    assert_eq!(after.get("chat/v1"), None);
    assert_eq!(after.get("chat/v10"), None);
    for (group, n) in &before {
        if group != "chat/v1" && group != "chat/v10" {
            assert_eq!(after.get(group), Some(n), "{group} lost keys");
        }
    }
}

#[tokio::test]
async fn a_sweep_killed_mid_way_resumes_and_ends_exact() {
    let (redis, mut conn) = start().await;
    load(&mut conn, 100_000).await;
    let before = census(&mut conn).await;

    // A paced sweep in its own process, killed with SIGKILL half-way.
    let invalidate = |rate: &str| {
        Command::new(env!("CARGO_BIN_EXE_modelcache"))
            .args([
                "invalidate",
                "--redis-url",
                &redis.url(),
                "--model",
                "chat",
                "--keep",
                "v10,v*[1]?\\,v1x",
            ])
            .args(["--keys-per-second", rate, "--batch", "500", "--fixed-pace"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = invalidate("20000");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let deleted: Option<u64> = redis::cmd("HGET")
            .arg(keys::sweep_checkpoint("chat", "v1"))
            .arg("deleted")
            .query_async(&mut conn)
            .await
            .unwrap();
        if deleted.unwrap_or(0) >= 20_000 {
            break;
        }
        assert!(Instant::now() < deadline, "the sweep made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mid = census(&mut conn).await;
    let left = mid.get("chat/v1").copied().unwrap_or(0);
    assert!(
        left > 0 && left < 100_000,
        "killed mid-way: {left} keys left"
    );

    let out = invalidate("10000000").wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("resumed"), "{stdout}");
    assert!(
        stdout.contains(&format!("deleted {left} keys of version \"v1\"")),
        "{stdout}"
    );

    let after = census(&mut conn).await;
    assert_eq!(after.get("chat/v1"), None);
    for (group, n) in &before {
        if group != "chat/v1" {
            assert_eq!(after.get(group), Some(n), "{group} lost keys");
        }
    }
}

#[tokio::test]
async fn writers_of_a_live_version_lose_nothing_during_a_sweep() {
    let (redis, mut conn) = start().await;
    load(&mut conn, 200_000).await;
    let writer = {
        let url = redis.url();
        tokio::spawn(async move {
            let mut conn = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection_with_config(&support::patient())
                .await
                .unwrap();
            let mut written = 0u64;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(2) {
                let mut pipe = redis::pipe();
                for i in written..written + 100 {
                    pipe.set(
                        keys::entry("chat", "v10", Layer::Feature, &format!("w{i}")),
                        i,
                    )
                    .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
                written += 100;
            }
            written
        })
    };
    let report = sweep::sweep_version(&mut conn, None, "chat", "v1", Pace::fixed(10_000_000, 1000))
        .await
        .unwrap();
    let written = writer.await.unwrap();
    assert_eq!(report.deleted, 200_000);
    let kept = sweep::count_version(&mut conn, "chat", "v10", 10_000)
        .await
        .unwrap();
    assert_eq!(
        kept,
        200_000 + written,
        "every key written to the live version survives"
    );
}

#[tokio::test]
async fn invalidate_dry_run_deletes_nothing_and_the_active_version_is_refused() {
    let (redis, mut conn) = start().await;
    load(&mut conn, 1000).await;
    modelcache::keyspace::registry::transition(
        &mut conn,
        "chat",
        "v1",
        modelcache::keyspace::registry::Transition::Activate,
    )
    .await
    .unwrap();
    let before = census(&mut conn).await;
    let run = |keep: &str, dry_run: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelcache"));
        cmd.args([
            "invalidate",
            "--redis-url",
            &redis.url(),
            "--model",
            "chat",
            "--keep",
            keep,
        ]);
        if dry_run {
            cmd.arg("--dry-run");
        }
        cmd.output().unwrap()
    };
    let out = run("v1,v10,v1x", true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(
        stdout.trim(),
        "would delete 1000 keys of version \"v*[1]?\\\\\"",
        "{stdout}"
    );
    assert_eq!(census(&mut conn).await, before);

    // v1 is the registry's active version: sweeping it is refused, exit 3.
    let out = run("v10,v1x", false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("it is the active version"), "{stderr}");
    assert_eq!(census(&mut conn).await, before);
}

/// A Redis (or something in its place) that answers SCAN with keys that do
/// not match the pattern asked for: they are skipped, not a panic on a slice.
#[tokio::test]
async fn a_scan_reply_with_keys_outside_the_pattern_is_skipped() {
    let mut conn = fake_redis(|command| match command {
        "SCAN" => b"*2\r\n$1\r\n0\r\n*2\r\n$1\r\nx\r\n$2\r\nmc\r\n",
        "DBSIZE" => b":2\r\n",
        _ => b"+OK\r\n",
    })
    .await
    .0;
    let versions = modelcache::keyspace::sweep::versions_with_keys(&mut conn, "chat", 100)
        .await
        .unwrap();
    assert!(versions.is_empty(), "{versions:?}");
}

/// A peer whose SCAN cursor never returns to 0 ends each iteration in an
/// error after a bounded number of calls (about 4 * DBSIZE / COUNT + 1024);
/// before, sweeps, counts and version discovery looped forever.
#[tokio::test]
async fn a_scan_cursor_that_never_returns_to_0_is_an_error() {
    let (mut conn, scans) = fake_redis(|command| match command {
        "SCAN" => b"*2\r\n$1\r\n7\r\n*0\r\n",
        "DBSIZE" => b":10\r\n",
        "HGET" => b"$-1\r\n",
        _ => b"+OK\r\n",
    })
    .await;
    use modelcache::keyspace::sweep;
    let bounded = |what: &str, message: String| {
        assert!(
            message.contains("SCAN cursor did not return to 0")
                && message.contains("in a database of 10 keys"),
            "{what}: {message}"
        );
        let calls = scans.swap(0, std::sync::atomic::Ordering::SeqCst);
        assert!((1000..=1100).contains(&calls), "{what}: {calls} SCAN calls");
    };
    let pace = sweep::Pace::fixed(1_000_000, 100);
    let err = sweep::sweep_version(&mut conn, None, "chat", "v1", pace)
        .await
        .unwrap_err();
    bounded("sweep", modelcache::error::chain(&err));
    let err = sweep::count_version(&mut conn, "chat", "v1", 100)
        .await
        .unwrap_err();
    bounded("count", modelcache::error::chain(&err));
    let err = sweep::versions_with_keys(&mut conn, "chat", 100)
        .await
        .unwrap_err();
    bounded("discovery", modelcache::error::chain(&err));
}

/// A RESP peer on loopback that answers each command by its name with
/// `reply`, and a connection to it; the counter counts SCAN calls.
async fn fake_redis(
    reply: fn(&str) -> &'static [u8],
) -> (
    redis::aio::MultiplexedConnection,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let scans = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = scans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(resp_peer(stream, reply, counter.clone()));
        }
    });
    let target = modelcache::store::RedisTarget {
        url: format!("redis://127.0.0.1:{port}"),
        username: None,
        password: None,
    };
    (target.connect().await.unwrap(), scans)
}

/// Reads RESP commands and answers each with `reply` of its name.
async fn resp_peer(
    stream: tokio::net::TcpStream,
    reply: fn(&str) -> &'static [u8],
    scans: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Some(n) = line.strip_prefix('*').and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        let mut args = Vec::new();
        for _ in 0..n {
            let _len = lines.next_line().await;
            if let Ok(Some(arg)) = lines.next_line().await {
                args.push(arg);
            }
        }
        let command = args
            .first()
            .map(|c| c.to_ascii_uppercase())
            .unwrap_or_default();
        if command == "SCAN" {
            scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if write.write_all(reply(&command)).await.is_err() {
            return;
        }
    }
}
