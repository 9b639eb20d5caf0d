//! Prefetch on rollout, the controller's half: where the node cache agents
//! stand with a ModelCache's `spec.version`, gathered from each agent's
//! `/v1/prefetch` (admin port, on its node's address) into
//! `status.prefetch` and the `Prefetched` condition, so that `kubectl get mc`
//! shows `3/3` and Argo CD can wait for it. The agents decide what to pull
//! ([`crate::node::prefetch`]); this only reads.

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use crate::crd::ModelCache;
use crate::crd::model_cache::{NodePrefetch, PrefetchStatus};
use crate::node::prefetch::PrefetchReport;

/// How long one agent may take to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(3);

/// Agents asked at once.
const ASKED_AT_ONCE: usize = 64;

/// Where the node cache agents run (the chart's DaemonSet).
#[derive(Debug, Clone)]
pub struct NodeAgents {
    /// Their namespace (the release's).
    pub namespace: String,
    /// A label selector of their pods.
    pub selector: String,
    /// Their admin port, on each node's address.
    pub admin_port: u16,
}

/// What one agent answered, by its node's name.
pub type Answer = (String, Result<PrefetchReport, String>);

/// The status of `mc`'s prefetch from the agents' answers; pure.
///
/// A node counts when its agent lists the version (its labels match), and
/// when its agent did not answer or has not looked yet: it may match, and
/// `Prefetched` must not claim a node it cannot see.
pub fn summarize(mc: &ModelCache, answers: &[Answer]) -> PrefetchStatus {
    let name = format!("{}/{}", mc.namespace().unwrap_or_default(), mc.name_any());
    let version = &mc.spec.version;
    let mut progress = Vec::new();
    for (node, answer) in answers {
        let entry = |phase: &str, message: Option<String>| NodePrefetch {
            node: node.clone(),
            phase: phase.into(),
            message,
            ..Default::default()
        };
        match answer {
            Err(why) => progress.push(entry("Unknown", Some(why.clone()))),
            Ok(report) if report.rounds == 0 => progress.push(entry("Pending", None)),
            Ok(report) => {
                let Some(p) = report
                    .prefetches
                    .iter()
                    .find(|p| p.model_cache == name && p.version == *version)
                else {
                    continue; // this node's labels do not match
                };
                let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                let percent = p
                    .version_bytes
                    .filter(|t| *t > 0)
                    .map(|t| ((p.downloaded_bytes.min(t) * 100) / t) as i32);
                progress.push(NodePrefetch {
                    node: node.clone(),
                    phase: p.phase.clone(),
                    downloaded_bytes: int(p.downloaded_bytes),
                    version_bytes: p.version_bytes.map(int),
                    percent: if p.phase == "Ready" {
                        Some(100)
                    } else {
                        percent
                    },
                    eta_seconds: p.eta_seconds.map(int),
                    message: p.error.clone(),
                });
            }
        }
    }
    progress.sort_by(|a, b| a.node.cmp(&b.node));
    let total = progress.len() as i32;
    let ready = progress.iter().filter(|p| p.phase == "Ready").count() as i32;
    PrefetchStatus {
        version: version.clone(),
        nodes: format!("{ready}/{total}"),
        ready,
        total,
        progress,
        ..Default::default()
    }
}

/// `Prefetched`: (status, reason, message).
pub fn condition(status: &PrefetchStatus) -> (&'static str, &'static str, String) {
    let v = &status.version;
    if status.total == 0 {
        return (
            "False",
            "NoNodes",
            "no node cache agent's node matches spec.prefetch.nodeSelector (is nodeCache enabled in the chart?)".into(),
        );
    }
    if status.ready == status.total {
        return (
            "True",
            "Prefetched",
            format!("{} node(s) hold version {v}", status.total),
        );
    }
    let failed: Vec<&str> = status
        .progress
        .iter()
        .filter(|p| p.phase == "Failed" || p.phase == "Unknown")
        .map(|p| p.node.as_str())
        .collect();
    let message = format!(
        "{} of {} node(s) hold version {v}{}",
        status.ready,
        status.total,
        if failed.is_empty() {
            String::new()
        } else {
            format!("; failing or not answering: {}", failed.join(", "))
        }
    );
    ("False", "Prefetching", message)
}

/// Asks every agent, at once.
pub async fn observe(client: &Client, agents: &NodeAgents, mc: &ModelCache) -> PrefetchStatus {
    let pods = Api::<Pod>::namespaced(client.clone(), &agents.namespace)
        .list(&ListParams::default().labels(&agents.selector))
        .await;
    let pods = match pods {
        Ok(list) => list.items,
        Err(e) => {
            tracing::warn!(error = %crate::error::chain(&e), "failed to list the node cache agents");
            Vec::new()
        }
    };
    // One client for every reconcile: building one loads the TLS roots.
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(AGENT_TIMEOUT)
            .build()
            .unwrap_or_default()
    });
    let asks: Vec<_> = pods
        .into_iter()
        .filter_map(|pod| {
            let node = pod.spec.as_ref()?.node_name.clone()?;
            let host = pod.status.as_ref().and_then(|s| s.host_ip.clone());
            let http = http.clone();
            let port = agents.admin_port;
            Some(async move {
                let Some(host) = host else {
                    return (node, Err("the agent's pod has no host address yet".into()));
                };
                let ip: Option<std::net::IpAddr> = host.parse().ok();
                let Some(ip) = ip else {
                    return (node, Err(format!("host address {host:?} is not an IP")));
                };
                let url = format!("http://{}/v1/prefetch", std::net::SocketAddr::new(ip, port));
                let answer = async {
                    let response = http.get(&url).send().await?.error_for_status()?;
                    response.bytes().await
                }
                .await
                .map_err(|e| format!("the agent did not answer: {}", crate::error::chain(&e)))
                .and_then(|body| {
                    serde_json::from_slice::<PrefetchReport>(&body)
                        .map_err(|e| format!("the agent answered something else: {e}"))
                });
                (node, answer)
            })
        })
        .collect();
    // Bounded: a cluster of a thousand nodes is a thousand agents.
    let answers: Vec<Answer> = futures::stream::iter(asks)
        .buffer_unordered(ASKED_AT_ONCE)
        .collect()
        .await;
    summarize(mc, &answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::prefetch::PrefetchState;
    use serde_json::json;

    fn mc() -> ModelCache {
        serde_json::from_value(json!({
            "apiVersion": "modelcache.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": "chat", "namespace": "ml"},
            "spec": {"model": "m", "version": "v2", "source": {"uri": "s3://models/prod"},
                     "prefetch": {"nodeSelector": {"gpu": "a100"}}}
        }))
        .unwrap()
    }

    fn state(version: &str, phase: &str, done: u64) -> PrefetchState {
        PrefetchState {
            model_cache: "ml/chat".into(),
            version: version.into(),
            phase: phase.into(),
            downloaded_bytes: done,
            version_bytes: Some(400),
            eta_seconds: (phase == "Downloading").then_some(30),
            error: None,
        }
    }

    fn report(rounds: u64, prefetches: Vec<PrefetchState>) -> Result<PrefetchReport, String> {
        Ok(PrefetchReport {
            node: String::new(),
            rounds,
            prefetches,
        })
    }

    #[test]
    fn nodes_count_when_they_prefetch_or_cannot_be_seen() {
        let answers: Vec<Answer> = vec![
            ("a".into(), report(3, vec![state("v2", "Ready", 400)])),
            ("b".into(), report(3, vec![state("v2", "Downloading", 100)])),
            // Its labels do not match: not listed, not counted.
            ("c".into(), report(3, vec![])),
            // Still on the old version's entry: not this version's.
            ("d".into(), report(3, vec![state("v1", "Ready", 400)])),
            ("e".into(), report(0, vec![])),
            ("f".into(), Err("connection refused".into())),
        ];
        let s = summarize(&mc(), &answers);
        assert_eq!(s.nodes, "1/4");
        let phases: Vec<(&str, &str)> = s
            .progress
            .iter()
            .map(|p| (p.node.as_str(), p.phase.as_str()))
            .collect();
        assert_eq!(
            phases,
            [
                ("a", "Ready"),
                ("b", "Downloading"),
                ("e", "Pending"),
                ("f", "Unknown")
            ]
        );
        assert_eq!(s.progress[1].percent, Some(25));
        assert_eq!(s.progress[1].eta_seconds, Some(30));
        assert_eq!(s.progress[0].percent, Some(100));
        let (status, reason, message) = condition(&s);
        assert_eq!((status, reason), ("False", "Prefetching"));
        assert!(
            message.contains("1 of 4") && message.contains("f"),
            "{message}"
        );

        let done = summarize(&mc(), &answers[..3]);
        assert_eq!(done.nodes, "1/2");
        let all = summarize(
            &mc(),
            &[("a".into(), report(1, vec![state("v2", "Ready", 400)]))],
        );
        assert_eq!(condition(&all).0, "True");
        let none = summarize(&mc(), &[("c".into(), report(1, vec![]))]);
        assert_eq!(
            (none.nodes.as_str(), condition(&none).1),
            ("0/0", "NoNodes")
        );
    }
}
