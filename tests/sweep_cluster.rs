//! The sweeper on a real three-primary Redis Cluster on loopback: a version's
//! keys spread over every primary, and the sweep visits each one.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use modelcache::keyspace::keys::{self, Layer};
use modelcache::keyspace::sweep::{self, Pace, parse_cluster_nodes};
use modelcache::store::RedisTarget;
use redis::aio::MultiplexedConnection;
use support::{RedisServer, free_port};

async fn connect(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap()
}

/// Three empty cluster-enabled redis-servers joined with `redis-cli --cluster create`.
async fn start_cluster() -> Vec<RedisServer> {
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| {
            let bus = free_port().to_string();
            RedisServer::start_with_args(
                None,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port()))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli (Debian's redis-tools, installed with redis-server)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        let mut conn = connect(node.port()).await;
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form: {info}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    nodes
}

/// Writes `n` result keys per (model, version), each to the primary that owns
/// its slot; returns the primaries.
async fn load(nodes: &[RedisServer], groups: &[(&str, &str, usize)]) -> Vec<sweep::Primary> {
    let mut seed = connect(nodes[0].port()).await;
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut seed)
        .await
        .unwrap();
    let primaries = parse_cluster_nodes(&text);
    assert_eq!(primaries.len(), 3);
    let mut pipes: BTreeMap<String, redis::Pipeline> = BTreeMap::new();
    for (model, version, n) in groups {
        for i in 0..*n {
            let key = keys::entry(model, version, Layer::Result, &format!("{i:x}"));
            let owner = sweep::owner(&primaries, &key).unwrap();
            pipes
                .entry(owner.address.clone())
                .or_insert_with(redis::pipe)
                .set(key, i)
                .ignore();
        }
    }
    for (address, pipe) in &pipes {
        let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
        let _: () = pipe.query_async(&mut connect(port).await).await.unwrap();
    }
    primaries
}

fn groups() -> Vec<(&'static str, &'static str, usize)> {
    vec![
        ("chat", "v1", 30_000),
        ("chat", "v10", 10_000),
        ("chat", "v*[1]?", 10_000),
        ("chat2", "v1", 5_000),
    ]
}

#[tokio::test]
async fn a_sweep_visits_every_primary_and_deletes_exactly_one_version() {
    let nodes = start_cluster().await;
    load(&nodes, &groups()).await;

    let seed_target = RedisTarget {
        url: format!("redis://127.0.0.1:{}", nodes[0].port()),
        username: None,
        password: None,
    };
    // Latency-paced: each primary is probed on a connection of its own.
    let pace = Pace {
        batch: 500,
        ..Pace::default()
    };
    let report = sweep::sweep_cluster_version(&seed_target, "chat", "v1", pace)
        .await
        .unwrap();
    assert_eq!(report.primaries.len(), 3);
    assert!(
        report
            .primaries
            .iter()
            .all(|(_, r)| r.baseline_probe.is_some()),
        "{report:?}"
    );
    assert!(
        report.primaries.iter().all(|(_, r)| r.deleted > 0),
        "every primary held v1 keys: {report:?}"
    );
    assert_eq!(report.deleted(), 30_000);

    // Count what is left on every node, independently of the sweeper.
    let mut left: BTreeMap<String, usize> = BTreeMap::new();
    for node in &nodes {
        let mut conn = connect(node.port()).await;
        let mut cursor = 0u64;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            for key in found {
                let group = groups()
                    .into_iter()
                    .find(|(m, v, _)| key.starts_with(&keys::version_prefix(m, v)))
                    .map(|(m, v, _)| format!("{m}/{v}"))
                    .unwrap_or(key);
                *left.entry(group).or_insert(0) += 1;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    assert_eq!(left.get("chat/v1"), None, "{left:?}");
    assert_eq!(left.get("chat/v10"), Some(&10_000));
    assert_eq!(left.get("chat/v*[1]?"), Some(&10_000));
    assert_eq!(left.get("chat2/v1"), Some(&5_000));
    assert_eq!(left.len(), 3, "no checkpoint is left behind: {left:?}");

    // A cluster node taken for a single Redis refuses an UNLINK whose keys
    // span slots; the sweep goes on one UNLINK per slot, on that node.
    let primaries = sweep::cluster_primaries(&seed_target).await.unwrap();
    let node = sweep::owner(&primaries, &keys::sweep_checkpoint("chat2", "v1")).unwrap();
    let port: u16 = node.address.rsplit(':').next().unwrap().parse().unwrap();
    let mut conn = connect(port).await;
    let on_node = sweep::count_version(&mut conn, "chat2", "v1", 1000)
        .await
        .unwrap();
    assert!(on_node > 100, "{on_node}");
    let report = sweep::sweep_version(&mut conn, None, "chat2", "v1", Pace::fixed(10_000_000, 500))
        .await
        .unwrap();
    assert_eq!(report.deleted, on_node);
    let left = sweep::count_version(&mut conn, "chat2", "v1", 1000)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn invalidate_on_a_cluster_counts_and_sweeps_every_primary() {
    let nodes = start_cluster().await;
    load(&nodes, &[("chat", "v1", 3000), ("chat", "v2", 1000)]).await;
    let url = format!("redis://127.0.0.1:{}", nodes[0].port());
    let run = |dry: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelcache"));
        cmd.args([
            "invalidate",
            "--cluster",
            "--redis-url",
            &url,
            "--model",
            "chat",
            "--keep",
            "v2",
        ]);
        if dry {
            cmd.arg("--dry-run");
        }
        cmd.output().unwrap()
    };
    let out = run(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "would delete 3000 keys of version \"v1\"");
    let out = run(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("deleted 3000 keys of version \"v1\""),
        "{stdout}"
    );
    let out = run(true);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "model \"chat\": no keys outside the kept versions"
    );
}
