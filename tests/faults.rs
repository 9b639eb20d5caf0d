//! Fault injection on the serving path (issue 16): Redis killed with SIGKILL
//! under traffic and replaced (as a Redis pod is, behind its Service), and
//! Redis peers that stall or speak garbage. Serving code answers every
//! request (from the model when the cache fails), never panics, recovers
//! when Redis is back (on a connection that reconnects), and never serves an
//! answer of a version other than the active one once it knows of it. The counts are printed for the closing note
//! (`--nocapture`). The fetch faults are in `tests/fetch.rs`, the sweeper
//! racing writers in `tests/sweep.rs`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use modelcache::cache::{ResultCache, Versions};
use modelcache::keyspace::registry::{self, Follower, Transition};
use serde_json::{Value, json};
use support::RedisServer;

/// A stable address in front of a replaceable Redis, as a Service is in
/// front of its pod: connections go to the port in `backend` when they are
/// made, and die with the backend.
async fn service(backend: Arc<AtomicU16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let to = backend.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

/// What the controller does on a rollout: makes `version` the registry's
/// active one. Returns its connection.
async fn activate(url: &str, version: &str) -> redis::aio::MultiplexedConnection {
    let mut admin = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    registry::transition(&mut admin, "chat", version, Transition::Activate)
        .await
        .unwrap();
    admin
}

/// What one serving replica counts.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    hits: AtomicU64,
    cache_errors: AtomicU64,
    stale: AtomicU64,
    hits_after_restart: AtomicU64,
}

/// One request the way serving code makes it: the cache first, the model
/// (here: the deployed version and the question) on a miss or a cache error,
/// which is counted and never fails the request.
async fn serve<C: modelcache::cache::Connection>(
    cache: &ResultCache<C>,
    deployed: &str,
    q: &str,
    tally: &Tally,
) -> String {
    let inputs = json!({"q": q, "temperature": 0});
    let answer = match cache.get(&inputs).await {
        Ok(Some(Value::String(a))) => {
            tally.hits.fetch_add(1, Ordering::Relaxed);
            a
        }
        Ok(_) => {
            let a = format!("{deployed}:{q}");
            if cache.put(&inputs, &json!(a)).await.is_err() {
                tally.cache_errors.fetch_add(1, Ordering::Relaxed);
            }
            a
        }
        Err(_) => {
            tally.cache_errors.fetch_add(1, Ordering::Relaxed);
            format!("{deployed}:{q}")
        }
    };
    tally.served.fetch_add(1, Ordering::Relaxed);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_replaced_under_traffic() {
    let first = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let backend = Arc::new(AtomicU16::new(first.port()));
    let url = format!("redis://127.0.0.1:{}", service(backend.clone()).await);
    let client = redis::Client::open(url.as_str()).unwrap();
    activate(&url, "v1").await;
    let follower = Follower::start(client.clone(), "chat");
    follower
        .wait_for(Duration::from_secs(10), |s| {
            s.active.as_deref() == Some("v1")
        })
        .await
        .expect("the follower sees v1");
    let conn = modelcache::store::RedisTarget::from_url(&url, None)
        .connect_managed()
        .await
        .unwrap();
    let cache = Arc::new(ResultCache::new(
        conn,
        "chat",
        Versions::Registry(follower.subscribe()),
        600,
    ));

    let deployed = Arc::new(parking_lot::RwLock::new("v1".to_string()));
    let switched = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut replicas = Vec::new();
    for replica in 0..4u64 {
        let (cache, deployed, switched, restarted, stop, tally) = (
            cache.clone(),
            deployed.clone(),
            switched.clone(),
            restarted.clone(),
            stop.clone(),
            tally.clone(),
        );
        replicas.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(replica);
            while !stop.load(Ordering::SeqCst) {
                let q = format!("question {}", rng.u32(0..40));
                let was_switched = switched.load(Ordering::SeqCst);
                let was_restarted = restarted.load(Ordering::SeqCst);
                let hits = tally.hits.load(Ordering::Relaxed);
                let version = deployed.read().clone();
                let answer = serve(&cache, &version, &q, &tally).await;
                if was_switched && !answer.starts_with("v2:") {
                    tally.stale.fetch_add(1, Ordering::Relaxed);
                }
                if was_restarted && tally.hits.load(Ordering::Relaxed) > hits {
                    tally.hits_after_restart.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(800)).await;
    let hits_before = tally.hits.load(Ordering::SeqCst);
    assert!(hits_before > 0, "the cache served before the fault");
    // SIGKILL (Process's drop), then traffic without a Redis for a while.
    drop(first);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let errors_while_down = tally.cache_errors.load(Ordering::SeqCst);
    assert!(errors_while_down > 0, "the outage was seen");

    // A new Redis behind the same address, restored from a snapshot that
    // still holds v1's answers and names v1 active; then the rollout to v2.
    let second = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mut admin = activate(&second.url(), "v1").await;
    let restored = ResultCache::new(admin.clone(), "chat", Versions::Fixed("v1".into()), 600);
    for i in 0..40 {
        let q = format!("question {i}");
        restored
            .put(
                &json!({"q": q, "temperature": 0}),
                &json!(format!("v1:{q}")),
            )
            .await
            .unwrap();
    }
    backend.store(second.port(), Ordering::SeqCst);
    restarted.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    *deployed.write() = "v2".into();
    registry::transition(&mut admin, "chat", "v2", Transition::Activate)
        .await
        .unwrap();
    let seen = follower
        .wait_for(Duration::from_secs(20), |s| {
            s.active.as_deref() == Some("v2")
        })
        .await;
    assert!(
        seen.is_some(),
        "the follower reconnected: {:?}",
        follower.current()
    );
    let recovered_after = killed_at.elapsed();
    switched.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for r in replicas {
        r.await.expect("no serving task panicked");
    }

    let t = &tally;
    println!(
        "fault injection: Redis SIGKILLed under 4 serving tasks and replaced: {} requests \
         served, {} from the cache, {} cache errors answered from the model, {} stale \
         answers after the switch to v2, {} hits after the restart; the follower saw v2 \
         {:.1}s after the kill",
        t.served.load(Ordering::SeqCst),
        t.hits.load(Ordering::SeqCst),
        t.cache_errors.load(Ordering::SeqCst),
        t.stale.load(Ordering::SeqCst),
        t.hits_after_restart.load(Ordering::SeqCst),
        recovered_after.as_secs_f64()
    );
    assert_eq!(
        t.stale.load(Ordering::SeqCst),
        0,
        "a v1 answer after the switch"
    );
    assert!(
        t.hits_after_restart.load(Ordering::SeqCst) > 0,
        "the cache never served again after Redis came back"
    );
}

/// A RESP peer that answers the connection handshake (+OK) and then, for
/// cache reads and writes, what `reply` makes of a random number: garbage,
/// or nothing at all (`None`: a stalled Redis).
async fn peer(reply: fn(&mut fastrand::Rng) -> Option<Vec<u8>>) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut seed = 0;
        while let Ok((stream, _)) = listener.accept().await {
            seed += 1;
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed);
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Some(n) = line.strip_prefix('*').and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let mut args = Vec::new();
                    for _ in 0..n {
                        let _len = lines.next_line().await;
                        if let Ok(Some(arg)) = lines.next_line().await {
                            args.push(arg.to_ascii_uppercase());
                        }
                    }
                    let answer = match args.first().map(String::as_str) {
                        Some("GET" | "SET" | "MGET") => reply(&mut rng),
                        _ => Some(b"+OK\r\n".to_vec()),
                    };
                    match answer {
                        Some(bytes) => {
                            if write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        None => std::future::pending::<()>().await,
                    }
                }
            });
        }
    });
    port
}

/// Bytes that are rarely RESP: a type byte of any kind and random content.
fn garbage(rng: &mut fastrand::Rng) -> Option<Vec<u8>> {
    let first = *rng.choice(b"+-:$*%_,#!=(|~>?x\r\n".iter()).unwrap();
    let mut bytes = vec![first];
    bytes.extend((0..rng.usize(0..64)).map(|_| rng.u8(..)));
    bytes.extend_from_slice(b"\r\n");
    Some(bytes)
}

/// A Redis that speaks garbage, or stops answering, costs each request at
/// most the serving timeout and no panic: every request is answered from the
/// model and the error counted.
#[tokio::test]
async fn garbage_speaking_and_stalled_redis_peers_cost_a_bounded_wait() {
    let limit = modelcache::store::live::SERVING_TIMEOUT;
    for (name, reply, requests) in [
        (
            "garbage",
            garbage as fn(&mut fastrand::Rng) -> Option<Vec<u8>>,
            300,
        ),
        ("stalled", |_: &mut fastrand::Rng| None, 3),
    ] {
        let port = peer(reply).await;
        let url = format!("redis://127.0.0.1:{port}");
        let conn = modelcache::store::RedisTarget::from_url(&url, None)
            .connect_managed()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let cache = ResultCache::new(conn, "chat", Versions::Fixed("v1".into()), 60);
        let tally = Tally::default();
        let mut slowest = Duration::ZERO;
        for i in 0..requests {
            let started = Instant::now();
            let q = format!("question {i}");
            let answer = serve(&cache, "v1", &q, &tally).await;
            slowest = slowest.max(started.elapsed());
            assert!(answer == format!("v1:{q}"), "{name}: {answer}");
        }
        let errors = tally.cache_errors.load(Ordering::SeqCst);
        println!(
            "fault injection: {name} Redis peer: {requests} requests answered, {errors} cache \
             errors, {} hits, slowest request {:.0} ms",
            tally.hits.load(Ordering::SeqCst),
            slowest.as_secs_f64() * 1000.0
        );
        assert!(errors >= requests as u64 / 2, "{name}: {errors} errors");
        assert!(slowest < limit * 3, "{name}: a request took {slowest:?}");
    }
}
