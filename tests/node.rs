//! The node cache agent (`modelcache node`) end to end, as processes. Each
//! agent is a "node" on a loopback address of its own (127.0.0.2, 127.0.0.3)
//! with its own cache directory; `modelcache fetch --node-agent` runs as the
//! pods; nginx is the origin (a CDN), behind a proxy that counts what reaches
//! it; and the faked API server, over loopback HTTP, answers the agents'
//! TokenReviews and their pod and ModelCache lookups.

mod support;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::node::{AUDIENCE, Agent, Nodes};
use support::proxy::{Proxy, ProxyConfig};
use support::{HttpServer, model_dir, stderr, summary, tree};

const BIN: &str = env!("CARGO_BIN_EXE_modelcache");

/// The faked API server over HTTP, the origin behind counting proxies, and
/// the directory the pods and nodes live in.
struct Cluster {
    rt: tokio::runtime::Runtime,
    nodes: Nodes,
    tmp: tempfile::TempDir,
    src: PathBuf,
    /// The published manifest's digest, which the controller pins.
    digest: String,
    _origin: HttpServer,
    /// Counts every request and byte that reaches the origin.
    counter: Proxy,
    _shaper: Option<Proxy>,
}

impl Cluster {
    /// A model of `big_mib` MiB published to nginx as `m`/`v1`, and a
    /// ModelCache `chat` in `ml` whose source is that origin. With
    /// `bandwidth`, each origin connection is capped to it (bytes/s).
    fn new(big_mib: usize, bandwidth: Option<u64>) -> Cluster {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let src = model_dir(tmp.path(), 7, big_mib);
        let root = tmp.path().join("origin");
        std::fs::create_dir_all(&root).unwrap();
        let origin = HttpServer::start(&root).unwrap_or_else(|e| panic!("{e}"));
        let published = Command::new(BIN)
            .args(["publish", "--dir", src.to_str().unwrap()])
            .args(["--to", &format!("file://{}", root.display())])
            .args(["--model", "m", "--version", "v1"])
            .output()
            .unwrap();
        let digest = summary(&published)["manifestDigest"]
            .as_str()
            .unwrap()
            .to_owned();
        let nodes = Nodes::new(&rt, tmp.path());
        let (shaper, counter) = rt.block_on(async {
            let shaper = match bandwidth {
                Some(b) => Some(
                    Proxy::start(
                        origin.port(),
                        ProxyConfig {
                            bandwidth: Some(b),
                            rtt: Some(Duration::from_millis(2)),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap(),
                ),
                None => None,
            };
            let upstream = shaper.as_ref().map_or(origin.port(), |s| s.port);
            let counter = Proxy::start(upstream, ProxyConfig::default())
                .await
                .unwrap();
            (shaper, counter)
        });
        let cluster = Cluster {
            rt,
            nodes,
            tmp,
            src,
            digest,
            _origin: origin,
            counter,
            _shaper: shaper,
        };
        cluster.model_cache("chat", "m");
        cluster
    }

    fn origin(&self) -> String {
        self.counter.endpoint()
    }

    fn model_cache(&self, name: &str, model: &str) {
        self.nodes
            .model_cache(name, model, json!({"uri": self.origin()}));
    }

    fn agent(&self, node: &str, ip: &'static str, concurrency: &str) -> Agent {
        self.nodes.agent(BIN, node, ip, concurrency, &[], &[])
    }

    /// The injected fetch of pod `name` through `agent` into its own
    /// emptyDir, started, pinned to the published digest unless `extra`
    /// pins another.
    fn start_fetch(&self, name: &str, agent: &Agent, token: &Path, extra: &[&str]) -> Child {
        let pin = ["--manifest-digest", self.digest.as_str()];
        let pin: &[&str] = if extra.contains(&"--manifest-digest") {
            &[]
        } else {
            &pin
        };
        self.start_unpinned(name, agent, token, &[pin, extra].concat())
    }

    /// [`Cluster::start_fetch`] without a pinned digest.
    fn start_unpinned(&self, name: &str, agent: &Agent, token: &Path, extra: &[&str]) -> Child {
        let dest = self.dest(name);
        Command::new(BIN)
            .args(["fetch", "--source", &self.origin(), "--model", "m"])
            .args(["--version", "v1", "--dest", dest.to_str().unwrap()])
            .args(["--node-agent", &agent.url()])
            .args(["--node-token-file", token.to_str().unwrap()])
            .args(["--progress", "off", "--retry-base-ms", "10"])
            .args(extra)
            .env("MODELCACHE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn fetch(&self, name: &str, agent: &Agent, token: &Path, extra: &[&str]) -> Output {
        self.start_fetch(name, agent, token, extra)
            .wait_with_output()
            .unwrap()
    }

    fn dest(&self, pod: &str) -> PathBuf {
        self.tmp.path().join("pods").join(pod)
    }

    fn origin_requests(&self) -> u64 {
        self.counter.stats.requests.load(Ordering::Relaxed)
    }

    fn origin_bytes(&self) -> u64 {
        self.counter.stats.body_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the version's distinct contents: what one download costs.
    fn version_bytes(&self) -> u64 {
        let mut distinct = BTreeMap::new();
        for content in tree(&self.src).into_values() {
            distinct.insert(content.clone(), content.len() as u64);
        }
        distinct.values().sum()
    }
}

#[test]
fn eight_pods_starting_together_cost_one_origin_download_and_the_next_pod_none() {
    // Capped origin connections, so that the pods arrive while the agent is
    // still downloading and stream what it has verified so far.
    let cluster = Cluster::new(24, Some(6 << 20));
    let agent = cluster.agent("node-a", "127.0.0.2", "2");
    let pods: Vec<(String, PathBuf)> = (0..8)
        .map(|i| {
            let name = format!("chat-{i}");
            let token = cluster
                .nodes
                .pod(&name, "node-a", Some("chat"), &[AUDIENCE]);
            (name, token)
        })
        .collect();
    let started: Vec<Child> = pods
        .iter()
        .map(|(name, token)| cluster.start_fetch(name, &agent, token, &[]))
        .collect();
    let src = tree(&cluster.src);
    for (child, (name, _)) in started.into_iter().zip(&pods) {
        let s = summary(&child.wait_with_output().unwrap());
        assert_eq!(s["nodeAgent"], true, "{name}: {s}");
        assert!(s.get("nodeAgentFallback").is_none(), "{name}: {s}");
        assert_eq!(tree(&cluster.dest(name)), src, "{name} is byte-identical");
    }
    let one_download = cluster.version_bytes();
    let origin_bytes = cluster.origin_bytes();
    assert!(
        origin_bytes >= one_download && origin_bytes < one_download + (1 << 20),
        "8 pods cost one download: {origin_bytes} bytes from the origin for a version of {one_download}"
    );
    assert!(
        agent.metric("modelcache_node_downloads_coalesced_total") >= 1.0,
        "pods joined the running download"
    );
    assert!(
        agent.metric(r#"modelcache_node_served_bytes_total{from="origin"}"#) > 0.0,
        "some bytes were streamed to pods while they arrived from the origin"
    );
    // What the agent counts: the files' bytes once, and no more than reached
    // it (a split range may overlap a little; the manifest is not counted).
    let counted = agent.metric("modelcache_node_origin_bytes_total") as u64;
    assert!(
        counted >= one_download && counted <= origin_bytes,
        "{counted} counted, {origin_bytes} through the proxy, for {one_download}"
    );
    assert!(agent.metric("modelcache_node_cache_bytes") as u64 >= one_download);

    // A ninth pod, later: all from the node cache, not one origin request.
    let requests = cluster.origin_requests();
    let from_cache = agent.metric(r#"modelcache_node_served_bytes_total{from="cache"}"#);
    let token = cluster
        .nodes
        .pod("chat-late", "node-a", Some("chat"), &[AUDIENCE]);
    let s = summary(&cluster.fetch("chat-late", &agent, &token, &[]));
    assert_eq!(s["nodeAgent"], true, "{s}");
    assert_eq!(tree(&cluster.dest("chat-late")), src);
    assert_eq!(cluster.origin_requests(), requests, "no origin request");
    let served = agent.metric(r#"modelcache_node_served_bytes_total{from="cache"}"#) - from_cache;
    assert!(
        served as u64 >= one_download,
        "served {served} from the cache"
    );

    // Without a pinned digest, a pod reads the manifest from the origin
    // (one request) and the files from the agent.
    let requests = cluster.origin_requests();
    let manifests = cluster.counter.stats.requests_for("/manifest.json");
    let token = cluster
        .nodes
        .pod("chat-unpinned", "node-a", Some("chat"), &[AUDIENCE]);
    let child = cluster.start_unpinned("chat-unpinned", &agent, &token, &[]);
    let s = summary(&child.wait_with_output().unwrap());
    assert_eq!(s["nodeAgent"], true, "{s}");
    assert_eq!(s["manifestDigest"], cluster.digest.as_str());
    assert_eq!(tree(&cluster.dest("chat-unpinned")), src);
    assert_eq!(cluster.origin_requests(), requests + 1, "the manifest only");
    assert_eq!(
        cluster.counter.stats.requests_for("/manifest.json"),
        manifests + 1
    );

    // The agent's log names no token.
    assert!(!agent.log().contains("token-of-"), "{}", agent.log());
}

#[test]
fn pods_the_agent_may_not_serve_are_refused_and_fetch_from_the_origin() {
    let cluster = Cluster::new(2, None);
    let agent = cluster.agent("node-a", "127.0.0.2", "4");
    // Another node's agent holds nothing of node-a's pods.
    let other = cluster.agent("node-b", "127.0.0.3", "4");
    cluster.model_cache("other", "another-model");
    let src = tree(&cluster.src);
    struct Case {
        pod: &'static str,
        node: &'static str,
        injected: Option<&'static str>,
        audiences: &'static [&'static str],
        reason: &'static str,
    }
    let case = |pod, node, injected, audiences, reason| Case {
        pod,
        node,
        injected,
        audiences,
        reason,
    };
    let cases = [
        case("on-b", "node-b", Some("chat"), &[AUDIENCE], "other_node"),
        case("plain", "node-a", None, &[AUDIENCE], "not_injected"),
        case(
            "api-token",
            "node-a",
            Some("chat"),
            &["https://kubernetes.default.svc"],
            "unauthenticated",
        ),
        case(
            "nope",
            "node-a",
            Some("missing"),
            &[AUDIENCE],
            "no_model_cache",
        ),
        case(
            "elsewhere",
            "node-a",
            Some("other"),
            &[AUDIENCE],
            "other_model",
        ),
    ];
    for Case {
        pod,
        node,
        injected,
        audiences,
        reason,
    } in cases
    {
        let asked = &agent;
        let token = cluster.nodes.pod(pod, node, injected, audiences);
        let before = cluster.origin_requests();
        let o = cluster.fetch(pod, asked, &token, &[]);
        let s = summary(&o);
        assert_eq!(s["nodeAgent"], false, "{pod}: {s}");
        let why = s["nodeAgentFallback"].as_str().unwrap_or_default();
        assert!(why.contains("403") || why.contains("401"), "{pod}: {why}");
        assert_eq!(
            tree(&cluster.dest(pod)),
            src,
            "{pod} fetched from the origin"
        );
        assert!(
            cluster.origin_requests() > before,
            "{pod} went to the origin"
        );
        let refused = asked.metric(&format!(
            "modelcache_node_refusals_total{{reason=\"{reason}\"}}"
        ));
        assert!(refused >= 1.0, "{pod}: {reason} counted");
        assert!(!stderr(&o).contains("token-of-"), "{}", stderr(&o));
    }
    // Nothing of the version reached any refused pod from an agent.
    for a in [&agent, &other] {
        assert_eq!(a.metric("modelcache_node_origin_bytes_total"), 0.0);
        assert_eq!(
            a.metric(r#"modelcache_node_served_bytes_total{from="cache"}"#)
                + a.metric(r#"modelcache_node_served_bytes_total{from="origin"}"#),
            0.0
        );
    }
    // The pod of node-b is served by node-b's agent.
    let token = cluster
        .nodes
        .pod("on-b-right", "node-b", Some("chat"), &[AUDIENCE]);
    let s = summary(&cluster.fetch("on-b-right", &other, &token, &[]));
    assert_eq!(s["nodeAgent"], true, "{s}");
    assert_eq!(tree(&cluster.dest("on-b-right")), src);

    // A request without a token, or without the origin's name, is refused
    // before anything is looked up.
    let mut s = std::net::TcpStream::connect((agent.ip, agent.port)).unwrap();
    write!(
        s,
        "GET /v1/m/v1/manifest.json HTTP/1.0\r\nx-modelcache-source: {}\r\n\r\n",
        cluster.origin()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 401") || out.starts_with("HTTP/1.1 401"),
        "{out}"
    );
}

#[test]
fn an_agent_killed_mid_download_leaves_its_pods_to_finish_from_the_origin() {
    // 24 MiB over two connections of 3 MiB/s: about 4 s, killed after 1.
    let cluster = Cluster::new(24, Some(3 << 20));
    let agent = cluster.agent("node-a", "127.0.0.2", "2");
    let names = ["chat-a", "chat-b"];
    let started: Vec<Child> = names
        .iter()
        .map(|name| {
            let token = cluster.nodes.pod(name, "node-a", Some("chat"), &[AUDIENCE]);
            cluster.start_fetch(name, &agent, &token, &[])
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.metric(r#"modelcache_node_served_bytes_total{from="origin"}"#) < (2 << 20) as f64 {
        assert!(
            Instant::now() < deadline,
            "no bytes streamed: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut agent = agent;
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let src = tree(&cluster.src);
    for (child, name) in started.into_iter().zip(names) {
        let s = summary(&child.wait_with_output().unwrap());
        assert_eq!(s["nodeAgent"], false, "{name}: {s}");
        assert!(s["nodeAgentFallback"].is_string(), "{name}: {s}");
        assert_eq!(tree(&cluster.dest(name)), src, "{name}: nothing corrupt");
    }
    // Nothing was left half-written in the agent's cache at a final path:
    // every blob it holds is one of the version's files, whole.
    let contents: Vec<Vec<u8>> = src.into_values().collect();
    if let Ok(blobs) = std::fs::read_dir(agent.cache.join("blobs")) {
        for blob in blobs.flatten() {
            let bytes = std::fs::read(blob.path()).unwrap();
            assert!(
                contents.contains(&bytes),
                "{} is whole",
                blob.path().display()
            );
        }
    }
}

#[test]
fn a_tampered_blob_in_the_agents_cache_is_caught_in_the_pod_and_fetched_from_the_origin() {
    let cluster = Cluster::new(4, None);
    let agent = cluster.agent("node-a", "127.0.0.2", "4");
    let token = cluster
        .nodes
        .pod("first", "node-a", Some("chat"), &[AUDIENCE]);
    let s = summary(&cluster.fetch("first", &agent, &token, &[]));
    assert_eq!(s["nodeAgent"], true, "{s}");
    let digest = s["manifestDigest"].as_str().unwrap().to_owned();

    // Someone with the node's disk changes the big blob in place and puts
    // its mtime back, so that the agent's own proof of it still holds.
    let big = std::fs::read(cluster.src.join("model.safetensors")).unwrap();
    let blob = std::fs::read_dir(agent.cache.join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read(p).is_ok_and(|b| b == big))
        .expect("the agent holds the big blob");
    let mtime = std::fs::metadata(&blob).unwrap().modified().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
        f.write_all_at(&[big[1000] ^ 0xff], 1000).unwrap();
        f.set_modified(mtime).unwrap();
    }
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o444)).unwrap();

    let before = cluster.origin_requests();
    let token = cluster
        .nodes
        .pod("second", "node-a", Some("chat"), &[AUDIENCE]);
    let pinned = ["--manifest-digest", digest.as_str()];
    let s = summary(&cluster.fetch("second", &agent, &token, &pinned));
    assert_eq!(s["nodeAgent"], false, "{s}");
    let why = s["nodeAgentFallback"].as_str().unwrap();
    assert!(
        why.contains("model.safetensors") || why.contains("digest"),
        "{why}"
    );
    assert_eq!(
        tree(&cluster.dest("second")),
        tree(&cluster.src),
        "the pod's weights are intact"
    );
    assert!(
        cluster.counter.stats.requests_for("/model.safetensors") > 0
            && cluster.origin_requests() > before,
        "the file came from the origin"
    );
}

#[test]
fn a_manifest_other_than_the_pinned_digest_is_refused_from_the_agent_and_the_origin() {
    let cluster = Cluster::new(1, None);
    let agent = cluster.agent("node-a", "127.0.0.2", "4");
    let token = cluster
        .nodes
        .pod("pinned", "node-a", Some("chat"), &[AUDIENCE]);
    let wrong = "0".repeat(64);
    let o = cluster.fetch("pinned", &agent, &token, &["--manifest-digest", &wrong]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(&wrong), "names the pinned digest: {err}");
    assert!(tree(&cluster.dest("pinned")).is_empty(), "nothing placed");

    // The right digest: served by the agent.
    let right = summary(&cluster.fetch("pinned", &agent, &token, &[]))["manifestDigest"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = cluster
        .nodes
        .pod("pinned-2", "node-a", Some("chat"), &[AUDIENCE]);
    let s = summary(&cluster.fetch("pinned-2", &agent, &token, &["--manifest-digest", &right]));
    assert_eq!(s["nodeAgent"], true, "{s}");
    // A complete destination pinned to another digest is fetched again, and refused.
    let o = cluster.fetch("pinned-2", &agent, &token, &["--manifest-digest", &wrong]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
}

/// The agent's `/v1/prefetch` report.
fn prefetch_report(agent: &Agent) -> Value {
    let response = agent.admin_get("/v1/prefetch");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("{}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

/// The agent's prefetches, as its admin port shows them.
fn prefetches(agent: &Agent) -> Vec<Value> {
    prefetch_report(agent)["prefetches"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_prefetch_fills_every_matching_node_before_the_rollouts_pods_appear() {
    let cluster = Cluster::new(8, None);
    let nodes = &cluster.nodes;
    nodes.node("node-a", json!({"gpu": "a100"}));
    nodes.node("node-b", json!({"gpu": "a100"}));
    nodes.node("node-c", json!({"gpu": "t4"}));
    nodes.prefetch("chat", json!({"nodeSelector": {"gpu": "a100"}}));
    let every = ["--prefetch-interval", "1"];
    let agent = |node, ip| nodes.agent(BIN, node, ip, "4", &[], &every);
    let (a, b, c) = (
        agent("node-a", "127.0.0.2"),
        agent("node-b", "127.0.0.3"),
        agent("node-c", "127.0.0.4"),
    );
    let ready = |agent: &Agent| {
        prefetches(agent)
            .iter()
            .any(|p| p["modelCache"] == "ml/chat" && p["version"] == "v1" && p["phase"] == "Ready")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(ready(&a) && ready(&b)) {
        assert!(
            Instant::now() < deadline,
            "not prefetched: {:?} {:?}\n{}",
            prefetches(&a),
            prefetches(&b),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let one_download = cluster.version_bytes();
    for p in [&a, &b] {
        let state = &prefetches(p)[0];
        assert_eq!(state["versionBytes"], one_download, "{state}");
        assert!(p.metric("modelcache_node_cache_bytes") as u64 >= one_download);
    }
    // The t4 node pulled nothing.
    assert_eq!(prefetches(&c), Vec::<Value>::new());
    assert_eq!(c.metric("modelcache_node_origin_bytes_total"), 0.0);
    let origin = cluster.origin_bytes();
    assert!(
        origin >= 2 * one_download && origin < 2 * one_download + (2 << 20),
        "one download per matching node: {origin} for {one_download}"
    );

    // What the controller reads of it: 2/2 before any pod of the rollout.
    let agents = modelcache::controller::prefetch::NodeAgents {
        namespace: "modelcache-system".into(),
        selector: "app.kubernetes.io/component=node-cache".into(),
        admin_port: nodes.admin_port,
    };
    for (node, ip) in [
        ("node-a", "127.0.0.2"),
        ("node-b", "127.0.0.3"),
        ("node-c", "127.0.0.4"),
    ] {
        nodes.api.insert(
            &format!("/api/v1/namespaces/modelcache-system/pods/agent-{node}"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("agent-{node}"), "namespace": "modelcache-system",
                                "labels": {"app.kubernetes.io/component": "node-cache"}},
                   "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
                   "status": {"hostIP": ip}}),
        );
    }
    let mc: modelcache::crd::ModelCache = serde_json::from_value(
        nodes
            .api
            .get("/apis/modelcache.dev/v1alpha1/namespaces/ml/modelcaches/chat")
            .unwrap(),
    )
    .unwrap();
    let observe = || {
        cluster
            .rt
            .block_on(modelcache::controller::prefetch::observe(
                &nodes.client,
                &agents,
                &mc,
            ))
    };
    let status = observe();
    assert_eq!(status.nodes, "2/2", "{status:?}");
    assert_eq!(status.version, "v1");
    for p in &status.progress {
        assert_eq!((p.phase.as_str(), p.percent), ("Ready", Some(100)), "{p:?}");
        assert_eq!(p.version_bytes, Some(one_download as i64));
    }
    let (state, reason, _) = modelcache::controller::prefetch::condition(&status);
    assert_eq!((state, reason), ("True", "Prefetched"));

    // The rollout's pods: served by their nodes, not one origin request.
    let requests = cluster.origin_requests();
    let src = tree(&cluster.src);
    for (name, node, agent) in [("chat-a", "node-a", &a), ("chat-b", "node-b", &b)] {
        let token = cluster.nodes.pod(name, node, Some("chat"), &[AUDIENCE]);
        let s = summary(&cluster.fetch(name, agent, &token, &[]));
        assert_eq!(s["nodeAgent"], true, "{s}");
        assert_eq!(tree(&cluster.dest(name)), src);
    }
    assert_eq!(cluster.origin_requests(), requests, "no origin request");
    // Rounds after it is Ready download nothing more.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(cluster.origin_bytes(), origin);

    // An agent that does not answer may be on a matching node: it counts,
    // and the condition says which.
    drop(c);
    let status = observe();
    assert_eq!(status.nodes, "2/3", "{status:?}");
    let (state, _, message) = modelcache::controller::prefetch::condition(&status);
    assert_eq!(state, "False");
    assert!(message.contains("node-c"), "{message}");
}

#[test]
fn an_old_version_stays_on_a_node_while_a_pod_of_the_node_uses_it() {
    let cluster = Cluster::new(4, None);
    let nodes = &cluster.nodes;
    nodes.node("node-a", json!({}));
    // v2: other bytes under the same model, on the same origin.
    let v2_src = model_dir(&cluster.tmp.path().join("v2-src"), 8, 4);
    let root = cluster.tmp.path().join("origin");
    summary(
        &Command::new(BIN)
            .args(["publish", "--dir", v2_src.to_str().unwrap()])
            .args(["--to", &format!("file://{}", root.display())])
            .args(["--model", "m", "--version", "v2"])
            .output()
            .unwrap(),
    );
    let one_version = cluster.version_bytes();
    // Room for one version and a half: v2 cannot come in beside v1 unless v1 goes.
    let quota = (one_version * 3 / 2).to_string();
    let args = ["--prefetch-interval", "1", "--cache-quota", &quota];
    let agent = nodes.agent(BIN, "node-a", "127.0.0.2", "4", &[], &args);
    let token = nodes.pod("chat-v1", "node-a", Some("chat"), &[AUDIENCE]);
    let s = summary(&cluster.fetch("chat-v1", &agent, &token, &[]));
    assert_eq!(s["nodeAgent"], true, "{s}");
    // The pod may finish streaming before the agent's download has recorded
    // v1 in the node cache: the rollout starts once v1 is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (agent.metric("modelcache_node_cache_bytes") as u64) < one_version {
        assert!(
            Instant::now() < deadline,
            "v1 never reached the node cache: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The rollout: v2, prefetched while the v1 pod still runs.
    let path = "/apis/modelcache.dev/v1alpha1/namespaces/ml/modelcaches/chat";
    let mut mc = nodes.api.get(path).unwrap();
    mc["spec"]["version"] = json!("v2");
    mc["spec"]["prefetch"] = json!({});
    nodes.api.insert(path, mc);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !prefetches(&agent)
        .iter()
        .any(|p| p["version"] == "v2" && p["phase"] == "Ready")
    {
        assert!(
            Instant::now() < deadline,
            "v2 not prefetched: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let held = agent.metric("modelcache_node_cache_bytes") as u64;
    assert!(
        held >= 2 * one_version - (1 << 20),
        "v1 kept over the quota: {held}; {}",
        agent.log()
    );
    assert_eq!(agent.metric("modelcache_node_evicted_versions_total"), 0.0);

    // The v1 pod goes: v1 leaves the node within a round or two.
    nodes.api.remove("/api/v1/namespaces/ml/pods/chat-v1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.metric("modelcache_node_evicted_versions_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "v1 never evicted: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let blobs = std::fs::read_dir(agent.cache.join("blobs"))
        .unwrap()
        .count();
    let v2_files: std::collections::BTreeSet<Vec<u8>> = tree(&v2_src).into_values().collect();
    assert_eq!(blobs, v2_files.len(), "only v2's blobs are left");
    let held = agent.metric("modelcache_node_cache_bytes") as u64;
    assert!(
        held <= quota.parse::<u64>().unwrap(),
        "within the quota again: {held}"
    );
    assert!(
        prefetches(&agent)
            .iter()
            .any(|p| p["version"] == "v2" && p["phase"] == "Ready")
    );
}

#[test]
fn a_prefetched_version_evicted_after_its_download_is_pulled_again_not_reported_ready() {
    let cluster = Cluster::new(4, None);
    let nodes = &cluster.nodes;
    nodes.node("node-a", json!({}));
    nodes.prefetch("chat", json!({}));
    // Rounds far enough apart for the version to go between the round that
    // starts its download and the next one.
    let args = ["--prefetch-interval", "2"];
    let agent = nodes.agent(BIN, "node-a", "127.0.0.2", "4", &[], &args);
    let versions = agent.cache.join("versions");
    let records = || -> Vec<PathBuf> {
        std::fs::read_dir(&versions)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while records().is_empty() {
        assert!(
            Instant::now() < deadline,
            "never downloaded: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let round = prefetch_report(&agent)["rounds"].as_u64().unwrap();
    // What an eviction does (another version's recording under a tight
    // quota): the version's record goes.
    for record in records() {
        std::fs::remove_file(record).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let next = loop {
        let report = prefetch_report(&agent);
        if report["rounds"].as_u64().unwrap() > round {
            break report;
        }
        assert!(Instant::now() < deadline, "no next round: {}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let state = &next["prefetches"][0];
    assert_eq!(
        state["phase"],
        "Downloading",
        "a version the cache no longer holds is not Ready: {next}; {}",
        agent.log()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !prefetches(&agent).iter().any(|p| p["phase"] == "Ready") {
        assert!(
            Instant::now() < deadline,
            "not pulled again: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(records().len(), 1, "recorded again");
    // Its blobs were still there: recorded again without a download.
    let one_download = cluster.version_bytes();
    assert!(
        cluster.origin_bytes() < one_download + (2 << 20),
        "{} bytes from the origin for {one_download}",
        cluster.origin_bytes()
    );
}
