//! Prefetch on rollout: every so often the agent lists the ModelCaches with
//! `spec.prefetch`, and pulls the `spec.version` of each whose node
//! selector its node matches into the node cache, before the version's pods
//! arrive. A pod that arrives meanwhile joins the same download.
//!
//! What to pull is a pure function of the ModelCaches and the node's labels
//! ([`wanted`]); where each stands is served on the admin port
//! (`/v1/prefetch`) for operators and for the controller.
//!
//! Each round also releases the pins of pods that are gone (the agent pins
//! a version for every pod it serves it to) and evicts down to the quota,
//! so that an old version leaves the node once no pod of the node uses it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeSelector, NodeSelectorRequirement, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::fills::{Fill, Fills};
use crate::artifact::node_cache::NodeCache;
use crate::artifact::source::Location;
use crate::crd::ModelCache;
use crate::crd::model_cache::ArtifactSource;

/// One version this node should hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// `namespace/name` of the ModelCache.
    pub model_cache: String,
    /// Its source.
    pub location: Location,
    /// Its source settings.
    pub source: ArtifactSource,
    /// Its model.
    pub model: String,
    /// Its `spec.version`.
    pub version: String,
}

/// The versions node `node` with `labels` prefetches: those of the
/// ModelCaches with `spec.prefetch` whose node selector the labels match,
/// or, without one, the placement of their workload that the controller
/// reports in `status.prefetch`. A source that does not parse is left out
/// (the ModelCache's own status says why).
pub fn wanted(
    model_caches: &[ModelCache],
    node: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<Wanted> {
    model_caches
        .iter()
        .filter_map(|mc| {
            let prefetch = mc.spec.prefetch.as_ref()?;
            let placement = mc.status.as_ref().and_then(|s| s.prefetch.as_ref());
            let matches = if !prefetch.node_selector.is_empty() {
                selected(&prefetch.node_selector, labels)
            } else if let Some(p) = placement {
                selected(&p.node_selector, labels)
                    && p.node_affinity
                        .as_ref()
                        .is_none_or(|a| affine(a, node, labels))
            } else {
                true
            };
            if !matches {
                return None;
            }
            Some(Wanted {
                model_cache: format!("{}/{}", mc.namespace().unwrap_or_default(), mc.name_any()),
                location: mc.spec.source.uri.parse().ok()?,
                source: mc.spec.source.clone(),
                model: mc.spec.model.clone(),
                version: mc.spec.version.clone(),
            })
        })
        .collect()
}

/// Every label of `selector` on the node.
fn selected(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A required node affinity, as the scheduler reads it: any term, each
/// with all its expressions (on labels) and fields (`metadata.name`).
fn affine(affinity: &NodeSelector, node: &str, labels: &BTreeMap<String, String>) -> bool {
    affinity.node_selector_terms.iter().any(|term| {
        let fields = BTreeMap::from([("metadata.name".to_string(), node.to_string())]);
        term.match_expressions
            .iter()
            .flatten()
            .all(|r| requirement(r, labels))
            && term
                .match_fields
                .iter()
                .flatten()
                .all(|r| requirement(r, &fields))
    })
}

fn requirement(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    let number = |v: Option<&String>| v.and_then(|v| v.parse::<i64>().ok());
    let bound = number(values.first());
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => matches!((number(value), bound), (Some(v), Some(b)) if v > b),
        "Lt" => matches!((number(value), bound), (Some(v), Some(b)) if v < b),
        // An operator this agent does not know: not a match, as the
        // scheduler would refuse the pod spec.
        _ => false,
    }
}

/// What `/v1/prefetch` answers: this node's prefetches as of its last round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchReport {
    /// The node.
    pub node: String,
    /// Rounds done since the agent started: 0 means it has not looked yet.
    pub rounds: u64,
    /// Every version this node prefetches.
    pub prefetches: Vec<PrefetchState>,
}

/// Where a prefetch stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchState {
    /// `namespace/name` of the ModelCache.
    pub model_cache: String,
    /// The version.
    pub version: String,
    /// `Ready` (in the node cache), `Downloading` or `Failed`.
    pub phase: String,
    /// Bytes downloaded so far by this prefetch.
    pub downloaded_bytes: u64,
    /// Bytes of the version (its distinct files), once its manifest is read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_bytes: Option<u64>,
    /// Seconds left at the pace so far, while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Why it failed (retried at the next round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Seconds left for `total` bytes at the pace of `done` in `elapsed`.
fn eta(done: u64, total: Option<u64>, elapsed: Duration) -> Option<u64> {
    let left = total?.checked_sub(done)?;
    if done == 0 {
        return None;
    }
    Some((left as f64 * elapsed.as_secs_f64() / done as f64).ceil() as u64)
}

/// The agent's prefetches.
pub struct Prefetcher {
    client: kube::Client,
    node: String,
    namespace: Option<String>,
    /// Pull versions (`false`: only release pins).
    prefetch: bool,
    cache: NodeCache,
    fills: Arc<Fills>,
    running: Mutex<HashMap<String, (Instant, Arc<Fill>)>>,
    report: Mutex<PrefetchReport>,
}

impl Prefetcher {
    /// Prefetches for `node`, of the ModelCaches of `namespace` (`None`:
    /// all), into `cache` through `fills`.
    pub fn new(
        client: kube::Client,
        node: &str,
        namespace: Option<String>,
        prefetch: bool,
        cache: NodeCache,
        fills: Arc<Fills>,
    ) -> Self {
        Prefetcher {
            client,
            node: node.into(),
            namespace,
            prefetch,
            cache,
            fills,
            running: Mutex::new(HashMap::new()),
            report: Mutex::new(PrefetchReport {
                node: node.into(),
                ..Default::default()
            }),
        }
    }

    /// Where each wanted version stands, as of the last round.
    pub fn report(&self) -> PrefetchReport {
        self.report.lock().clone()
    }

    /// One round every `every`, forever. A failed round (the API server
    /// away) is logged and the next one tries again.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.release_pins().await;
            if !self.prefetch {
                continue;
            }
            if let Err(e) = self.round().await {
                tracing::warn!(
                    "failed to look for versions to prefetch: {}",
                    crate::error::chain(&e)
                );
            }
        }
    }

    /// When the cache is over its quota: removes the pins of pods that no
    /// longer exist (or were replaced by another of the same name), then
    /// evicts down to the quota. A pod the API server cannot say anything
    /// about keeps its pin.
    async fn release_pins(&self) {
        // Only a cache over its quota needs room: the pods are looked up then,
        // not on every round (one lookup per pin, on every node).
        let Some(quota) = self.fills.quota() else {
            return;
        };
        let cache = self.cache.clone();
        let (used, pins) = tokio::task::spawn_blocking(move || (cache.used_bytes(), cache.pins()))
            .await
            .unwrap_or_default();
        if used <= quota {
            return;
        }
        let mut released = 0;
        for (id, uid, about) in pins {
            let Some((namespace, name)) = about.split_once('/') else {
                continue;
            };
            let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await;
            let gone = match pod {
                Ok(None) => true,
                Ok(Some(p)) => p.metadata.uid.as_deref() != Some(uid.as_str()),
                Err(_) => false,
            };
            if gone {
                self.cache.unpin(&id, &uid);
                released += 1;
            }
        }
        if released > 0 {
            let cache = self.cache.clone();
            let evicted = tokio::task::spawn_blocking(move || cache.evict(quota, 0, ""))
                .await
                .map(|r| r.evicted_versions.len())
                .unwrap_or(0);
            if evicted > 0 {
                tracing::info!(evicted, "evicted versions no pod of this node uses");
                self.fills.evicted(evicted).await;
            }
        }
    }

    async fn round(&self) -> Result<(), kube::Error> {
        let node = Api::<Node>::all(self.client.clone())
            .get(&self.node)
            .await?;
        // From the API server's cache (resourceVersion 0): a DaemonSet's
        // agents listing every round must not each cost a quorum read.
        let api = match &self.namespace {
            Some(ns) => Api::<ModelCache>::namespaced(self.client.clone(), ns),
            None => Api::<ModelCache>::all(self.client.clone()),
        };
        let model_caches = api.list(&ListParams::default().match_any()).await?;
        let labels = node.metadata.labels.unwrap_or_default();
        let wanted = wanted(&model_caches.items, &self.node, &labels);
        let mut states = Vec::new();
        let mut running = self.running.lock();
        for w in &wanted {
            let id = NodeCache::version_id(&w.location.to_string(), &w.model, &w.version);
            let fill = running.get(&id).cloned();
            let since = fill.as_ref().map_or_else(Instant::now, |(at, _)| *at);
            let fill = fill.map(|(_, f)| f);
            let state = |phase: &str, fill: Option<&Fill>, error| {
                let (downloaded_bytes, version_bytes) = fill.map_or((0, None), Fill::bytes);
                let downloading = phase == "Downloading";
                PrefetchState {
                    model_cache: w.model_cache.clone(),
                    version: w.version.clone(),
                    phase: phase.into(),
                    downloaded_bytes,
                    version_bytes,
                    eta_seconds: downloading
                        .then(|| eta(downloaded_bytes, version_bytes, since.elapsed()))
                        .flatten(),
                    error,
                }
            };
            // Ready means the cache holds the version now: another
            // download's recording may have evicted it since this one ended
            // (an older version whose pod still ran, finishing later, under a
            // tight quota). Then it is pulled again.
            let held = || self.cache.lookup(&id).is_some();
            match &fill {
                Some(f) if f.succeeded() && held() => {
                    states.push(state("Ready", Some(f), None));
                    running.remove(&id);
                }
                Some(f) if !f.succeeded() => match f.failure() {
                    Some(why) => {
                        states.push(state("Failed", Some(f), Some(why)));
                        running.remove(&id);
                    }
                    None => states.push(state("Downloading", Some(f), None)),
                },
                None if held() => {
                    states.push(state("Ready", None, None));
                }
                _ => {
                    tracing::info!(model_cache = %w.model_cache, version = %w.version,
                        evicted = fill.is_some(), "prefetching a version into the node cache");
                    let f = self
                        .fills
                        .join(&w.location, &w.source, &w.model, &w.version);
                    states.push(state("Downloading", Some(&f), None));
                    running.insert(id, (Instant::now(), f));
                }
            }
        }
        drop(running);
        let mut report = self.report.lock();
        report.rounds += 1;
        report.prefetches = states;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mc(name: &str, prefetch: Option<serde_json::Value>) -> ModelCache {
        let mut spec =
            json!({"model": "m", "version": "v2", "source": {"uri": "s3://models/prod"}});
        if let Some(p) = prefetch {
            spec["prefetch"] = p;
        }
        serde_json::from_value(json!({
            "apiVersion": "modelcache.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": name, "namespace": "ml"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn without_a_selector_the_workloads_placement_decides() {
        let mut mc = mc("workload", Some(json!({})));
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let wants = |mc: &ModelCache, node: &str, l: &BTreeMap<String, String>| {
            !wanted(std::slice::from_ref(mc), node, l).is_empty()
        };
        // No placement reported yet: every node.
        assert!(wants(&mc, "n1", &labels(&[])));
        mc.status = Some(
            serde_json::from_value(json!({"prefetch": {
                "version": "v2", "nodes": "0/0", "ready": 0, "total": 0,
                "nodeSelector": {"pool": "gpu"},
                "nodeAffinity": {"nodeSelectorTerms": [
                    {"matchExpressions": [
                        {"key": "gpu", "operator": "In", "values": ["a100", "h100"]},
                        {"key": "memory-gib", "operator": "Gt", "values": ["80"]},
                        {"key": "spot", "operator": "DoesNotExist"}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n9"]}]}
                ]}
            }}))
            .unwrap(),
        );
        let gpu = |extra: &[(&str, &str)]| {
            let mut l = labels(&[("pool", "gpu"), ("gpu", "h100"), ("memory-gib", "141")]);
            l.extend(labels(extra));
            l
        };
        assert!(wants(&mc, "n1", &gpu(&[])));
        assert!(!wants(&mc, "n1", &gpu(&[("pool", "cpu")])), "nodeSelector");
        assert!(!wants(&mc, "n1", &gpu(&[("gpu", "t4")])), "In");
        assert!(!wants(&mc, "n1", &gpu(&[("memory-gib", "80")])), "Gt");
        assert!(!wants(&mc, "n1", &gpu(&[("spot", "true")])), "DoesNotExist");
        // The second term: that node by name, whatever its GPU.
        assert!(wants(&mc, "n9", &gpu(&[("gpu", "t4")])), "matchFields");
        // The spec's own selector wins over the workload's placement.
        mc.spec.prefetch =
            serde_json::from_value(json!({"nodeSelector": {"pool": "cpu"}})).unwrap();
        assert!(wants(&mc, "n1", &labels(&[("pool", "cpu")])));
        assert!(!wants(&mc, "n1", &gpu(&[])));
    }

    #[test]
    fn the_eta_is_the_rest_at_the_pace_so_far() {
        assert_eq!(eta(25, Some(100), Duration::from_secs(10)), Some(30));
        assert_eq!(eta(0, Some(100), Duration::from_secs(10)), None);
        assert_eq!(eta(25, None, Duration::from_secs(10)), None);
        assert_eq!(eta(100, Some(100), Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn a_node_prefetches_what_its_labels_match_and_nothing_else() {
        let caches = [
            mc("everywhere", Some(json!({}))),
            mc("a100", Some(json!({"nodeSelector": {"gpu": "a100"}}))),
            mc(
                "a100-eu",
                Some(json!({"nodeSelector": {"gpu": "a100", "zone": "eu"}})),
            ),
            mc("no-prefetch", None),
        ];
        let names = |labels: &[(&str, &str)]| {
            let labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            wanted(&caches, "n1", &labels)
                .into_iter()
                .map(|w| w.model_cache)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&[]), ["ml/everywhere"]);
        assert_eq!(names(&[("gpu", "t4")]), ["ml/everywhere"]);
        assert_eq!(names(&[("gpu", "a100")]), ["ml/everywhere", "ml/a100"]);
        assert_eq!(
            names(&[("gpu", "a100"), ("zone", "eu")]),
            ["ml/everywhere", "ml/a100", "ml/a100-eu"]
        );
        let w = &wanted(&caches, "n1", &BTreeMap::new())[0];
        assert_eq!((w.model.as_str(), w.version.as_str()), ("m", "v2"));
        assert_eq!(w.location.to_string(), "s3://models/prod");
    }
}
