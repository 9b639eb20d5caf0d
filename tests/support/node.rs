//! Node cache agents as processes, each a "node" on a loopback address of
//! its own, and the faked API server over HTTP that they ask about pods,
//! tokens and ModelCaches: shared by the node tests and the fetch benchmark.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::fake_api::FakeApiServer;
use super::free_port;

/// Where the pods and ModelCaches live.
pub const NS: &str = "ml";
/// The audience the agents accept.
pub const AUDIENCE: &str = "modelcache-node";

/// A `modelcache node` process; killed on drop.
pub struct Agent {
    pub child: Child,
    pub ip: &'static str,
    pub port: u16,
    pub admin: u16,
    pub cache: PathBuf,
    pub log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` on the admin port.
    pub fn admin_get(&self, path: &str) -> String {
        let mut s = std::net::TcpStream::connect((self.ip, self.admin)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The value of one sample of `/metrics`, e.g.
    /// `modelcache_node_served_bytes_total{from="cache"}`; 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.admin_get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

/// The faked API server, listening on loopback, and a kubeconfig for it.
pub struct Nodes {
    pub api: FakeApiServer,
    /// A client of the same API server (for the controller's side).
    pub client: kube::Client,
    pub kubeconfig: PathBuf,
    /// Every agent's admin port, each on its own address.
    pub admin_port: u16,
    dir: PathBuf,
    uid: std::cell::Cell<u32>,
}

impl Nodes {
    /// The API server on `rt`; agents' files under `dir`.
    pub fn new(rt: &tokio::runtime::Runtime, dir: &Path) -> Nodes {
        let (client, api, port) = rt.block_on(async {
            let (client, api) = FakeApiServer::start();
            let port = api.listen().await;
            (client, api, port)
        });
        let kubeconfig = dir.join("kubeconfig");
        FakeApiServer::kubeconfig(port, &kubeconfig);
        Nodes {
            api,
            client,
            kubeconfig,
            admin_port: free_port(),
            dir: dir.into(),
            uid: std::cell::Cell::new(0),
        }
    }

    /// A ModelCache `name` in [`NS`] for `model` (version v1) from `source`
    /// (the `spec.source` object).
    pub fn model_cache(&self, name: &str, model: &str, source: Value) {
        self.api.insert(
            &format!("/apis/modelcache.dev/v1alpha1/namespaces/{NS}/modelcaches/{name}"),
            json!({
                "apiVersion": "modelcache.dev/v1alpha1",
                "kind": "ModelCache",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"model": model, "version": "v1", "source": source}
            }),
        );
    }

    /// A Node object named `name` with `labels`.
    pub fn node(&self, name: &str, labels: Value) {
        self.api.insert(
            &format!("/api/v1/nodes/{name}"),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}),
        );
    }

    /// Sets `spec.prefetch` of ModelCache `name` to `prefetch`.
    pub fn prefetch(&self, name: &str, prefetch: Value) {
        let path = format!("/apis/modelcache.dev/v1alpha1/namespaces/{NS}/modelcaches/{name}");
        let mut mc = self.api.get(&path).expect("the ModelCache");
        mc["spec"]["prefetch"] = prefetch;
        self.api.insert(&path, mc);
    }

    /// An agent (`bin`) for `node` on `ip`, with a cache directory of its
    /// own, `env` (an origin's credentials) and more `args`.
    pub fn agent(
        &self,
        bin: &str,
        node: &str,
        ip: &'static str,
        concurrency: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Agent {
        let (port, admin) = (free_port(), self.admin_port);
        let cache = self.dir.join(format!("{node}-cache"));
        let log = self.dir.join(format!("{node}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(bin);
        command
            .args(["node", "--node-name", node])
            .args(["--listen", &format!("{ip}:{port}")])
            .args(["--admin-listen", &format!("{ip}:{admin}")])
            .args(["--cache-dir", cache.to_str().unwrap()])
            .args(["--concurrency", concurrency])
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("MODELCACHE_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut agent = Agent {
            child: command.spawn().unwrap(),
            ip,
            port,
            admin,
            cache,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((ip, port)).is_err() {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!("the agent exited with {status}: {}", agent.log());
            }
            assert!(Instant::now() < deadline, "no agent: {}", agent.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(agent.admin_get("/healthz").contains("200 OK"));
        agent
    }

    /// A pod named `name` on `node`, injected for `injected_for` (no
    /// annotation when `None`), with a token issued for `audiences`; returns
    /// the token's file.
    pub fn pod(
        &self,
        name: &str,
        node: &str,
        injected_for: Option<&str>,
        audiences: &[&str],
    ) -> PathBuf {
        self.uid.set(self.uid.get() + 1);
        let uid = format!("pod-uid-{}", self.uid.get());
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "uid": uid},
            "spec": {"nodeName": node, "containers": [{"name": "engine", "image": "engine"}]}
        });
        if let Some(mc) = injected_for {
            pod["metadata"]["annotations"] = json!({"modelcache.dev/inject": mc});
        }
        self.api
            .insert(&format!("/api/v1/namespaces/{NS}/pods/{name}"), pod);
        let token = format!("token-of-{name}");
        self.api.pod_token(&token, NS, name, &uid, audiences);
        let file = self.dir.join(format!("{name}.token"));
        std::fs::write(&file, &token).unwrap();
        file
    }
}
