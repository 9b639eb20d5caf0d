//! The node cache agent on one machine, for `scripts/demo.sh`. The tests'
//! faked API server stands in for the cluster's (TokenReviews, the pod, the
//! node, the ModelCache); `modelcache node` runs as the node's agent on
//! 127.0.0.2; a ModelCache with `spec.prefetch` makes it pull the version
//! before any pod exists; then a pod's fetch, pinned to the manifest digest
//! as the controller pins it, is served from the node, with the requests
//! that reach S3 counted by a proxy in front of it.
//!
//! ```sh
//! cargo run --example node_agent -- target/debug/modelcache http://127.0.0.1:9000 \
//!     all-minilm-l6-v2 v1 /tmp/work
//! ```
//! (the version published at `s3://models/prod`; AWS_* in the environment).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use support::node::{AUDIENCE, Nodes};
use support::proxy::{Proxy, ProxyConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bin, endpoint, model, version, work] = args.as_slice() else {
        bail!("usage: node_agent <modelcache binary> <s3 endpoint> <model> <version> <work dir>");
    };
    if version != "v1" {
        bail!("the demo's ModelCache serves v1");
    }
    let work = PathBuf::from(work);
    let rt = tokio::runtime::Runtime::new()?;
    let port: u16 = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .context("the endpoint names no port")?;
    // Everything that reaches S3 from here on goes through this proxy.
    let origin = rt.block_on(Proxy::start(port, ProxyConfig::default()))?;
    let requests = || origin.stats.requests.load(Ordering::Relaxed);

    let dir = work.join("node-agent");
    std::fs::create_dir_all(&dir)?;
    let nodes = Nodes::new(&rt, &dir);
    nodes.node("gpu-node-1", json!({"gpu": "a100"}));
    let source = json!({"uri": "s3://models/prod", "endpoint": origin.endpoint(),
                        "pathStyle": true, "region": "us-east-1"});
    nodes.model_cache("chat", model, source);
    nodes.prefetch("chat", json!({"nodeSelector": {"gpu": "a100"}}));
    println!("  ModelCache chat: {model} {version}, spec.prefetch.nodeSelector gpu=a100");
    let agent = nodes.agent(
        bin,
        "gpu-node-1",
        "127.0.0.2",
        "auto",
        &[],
        &["--prefetch-interval", "1"],
    );
    println!(
        "  modelcache node on {} for node gpu-node-1 (gpu=a100)",
        agent.url()
    );

    let started = Instant::now();
    let report = loop {
        let response = agent.admin_get("/v1/prefetch");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("{}");
        let report: Value = serde_json::from_str(body).unwrap_or_default();
        let ready = report["prefetches"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["phase"] == "Ready");
        if ready {
            break report;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the agent did not prefetch: {report}\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let p = &report["prefetches"][0];
    println!(
        "  prefetched before any pod: {} {} {} ({} bytes) in {:.1} s; {} requests to S3",
        p["modelCache"].as_str().unwrap_or_default(),
        p["version"].as_str().unwrap_or_default(),
        p["phase"].as_str().unwrap_or_default(),
        p["versionBytes"],
        started.elapsed().as_secs_f64(),
        requests()
    );

    // What the controller reads of it, into status.prefetch.
    nodes.api.insert(
        "/api/v1/namespaces/modelcache-system/pods/agent-gpu-node-1",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "agent-gpu-node-1", "namespace": "modelcache-system",
                            "labels": {"app.kubernetes.io/component": "node-cache"}},
               "spec": {"nodeName": "gpu-node-1", "containers": [{"name": "agent"}]},
               "status": {"hostIP": "127.0.0.2"}}),
    );
    let agents = modelcache::controller::prefetch::NodeAgents {
        namespace: "modelcache-system".into(),
        selector: "app.kubernetes.io/component=node-cache".into(),
        admin_port: nodes.admin_port,
    };
    let mc: modelcache::crd::ModelCache = serde_json::from_value(
        nodes
            .api
            .get("/apis/modelcache.dev/v1alpha1/namespaces/ml/modelcaches/chat")
            .context("the ModelCache")?,
    )?;
    let status = rt.block_on(modelcache::controller::prefetch::observe(
        &nodes.client,
        &agents,
        &mc,
    ));
    let (condition, reason, message) = modelcache::controller::prefetch::condition(&status);
    println!(
        "  controller: status.prefetch.nodes {} (kubectl get mc: Prefetched {}); condition Prefetched={condition} ({reason}: {message})",
        status.nodes, status.nodes
    );

    // The controller pins the manifest's digest, read from the origin once.
    let mut opts = modelcache::artifact::fetch::FetchOptions::new(
        "s3://models/prod".parse()?,
        model,
        version,
        &work,
    );
    opts.source.endpoint = Some(endpoint.clone());
    opts.source.path_style = true;
    let digest = rt.block_on(modelcache::artifact::fetch::manifest_digest(&opts))?;

    let token = nodes.pod("chat-0", "gpu-node-1", Some("chat"), &[AUDIENCE]);
    let before = requests();
    let dest = work.join("pod-e/model");
    let out = Command::new(bin)
        .args(["fetch", "--source", "s3://models/prod", "--model", model])
        .args([
            "--version",
            version,
            "--endpoint",
            &origin.endpoint(),
            "--path-style",
        ])
        .arg("--dest")
        .arg(&dest)
        .args(["--node-agent", &agent.url(), "--node-token-file"])
        .arg(&token)
        .args(["--manifest-digest", &digest, "--progress", "off"])
        .output()?;
    if !out.status.success() {
        bail!(
            "the pod's fetch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    println!(
        "  pod chat-0 on gpu-node-1: {} files, {} bytes from the node agent (nodeAgent: {}), manifest pinned to {}…, {:.2} s; {} requests to S3",
        summary["files"],
        summary["bytes"],
        summary["nodeAgent"],
        &digest[..12],
        summary["seconds"].as_f64().unwrap_or_default(),
        requests() - before
    );
    if summary["nodeAgent"] != true || requests() != before {
        bail!("the pod was not served by its node: {summary}");
    }
    Ok(())
}
