//! Pod injection, as pure functions: what the mutating admission webhook adds
//! to a pod annotated `modelcache.dev/inject: <ModelCache name>`, and its
//! answer to an AdmissionReview.
//!
//! A pod gets the `modelcache-fetch` init container (the version's weights
//! into the shared volume `/models`, verified), the `modelcache-warm` native
//! sidecar when the ModelCache configures warm-up (the pod turns ready only
//! once the engine's prefix cache is warm), the volumes they share, and in
//! every app container the environment that serving code reads to reach the
//! cache: `MODELCACHE_REDIS_URL`, `MODELCACHE_REDIS_PASSWORD` (from the
//! Secret), `MODELCACHE_MODEL`, and `MODELCACHE_VERSION` from the pod's own
//! version annotation through the downward API.
//!
//! Pods without the annotation are never touched, and a pod that already has
//! the fetch container (injected before, or written by hand) is left as is,
//! so a second pass changes nothing.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::builders::{self, env, locked_down, mount};
use super::fetch::{Artifact, fetch_container};
use super::network::CLIENT_LABEL;
pub use crate::crd::model_cache::INJECT_ANNOTATION;
use crate::crd::model_cache::{DEFAULT_VERSION_LABEL, ModelCache};
/// The injected init container.
pub const FETCH_CONTAINER: &str = "modelcache-fetch";
/// The injected warm-up sidecar.
pub const WARM_CONTAINER: &str = "modelcache-warm";
/// The volume the weights are fetched into.
pub const WEIGHTS_VOLUME: &str = "modelcache-weights";
/// Where the weights are, in every container of the pod.
pub const WEIGHTS_PATH: &str = "/models";
const WARMUP_VOLUME: &str = "modelcache-warmup";
const WARMUP_PATH: &str = "/etc/modelcache/warmup";
const WARM_PORT: i32 = 8089;

/// What a webhook does when a pod names a ModelCache it cannot inject from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Refuse the pod, with the reason: a model pod without its weights
    /// would start and fail later, further from the cause.
    Fail,
    /// Admit the pod unchanged, with a warning.
    Ignore,
}

/// How pods are injected.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The modelcache image (the same binary runs fetch and warm).
    pub image: String,
    /// What to do with a pod that cannot be injected.
    pub failure_policy: FailurePolicy,
    /// The port of the node cache agent on every node, where the chart runs
    /// its DaemonSet: fetches try it before the origin. `None`: no agent.
    pub node_agent_port: Option<u16>,
}

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No annotation: not ours.
    NotAnnotated,
    /// Already has the fetch container.
    AlreadyInjected,
    /// JSON Patch operations (RFC 6902).
    Patch(Vec<Value>),
    /// The annotation names no usable ModelCache.
    Refuse(String),
}

/// The ModelCache a pod asks for, if any.
pub fn requested(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(INJECT_ANNOTATION)
        .map(String::as_str)
}

/// Decide for `pod` in `namespace`, given the ModelCache its annotation
/// names as looked up there (`Ok(None)`: not found; `Err`: the lookup
/// failed, e.g. the API server did not answer).
pub fn decide(
    pod: &Pod,
    namespace: &str,
    found: Result<Option<&ModelCache>, &str>,
    config: &InjectConfig,
) -> Decision {
    let Some(name) = requested(pod) else {
        return Decision::NotAnnotated;
    };
    if already_injected(pod) {
        return Decision::AlreadyInjected;
    }
    match found {
        Ok(Some(mc)) => Decision::Patch(patch(pod, mc, config)),
        Ok(None) => Decision::Refuse(format!(
            "failed to inject modelcache into the pod: annotation {INJECT_ANNOTATION}={name:?} names no ModelCache in namespace {namespace}; create it, or fix the annotation"
        )),
        // Not "no such ModelCache": the pod is fine, the lookup was not.
        Err(why) => Decision::Refuse(format!(
            "failed to inject modelcache into the pod: could not read ModelCache {name:?} in namespace {namespace} ({why}); the pod's controller retries the creation"
        )),
    }
}

/// The label or annotation that holds a pod's version.
fn version_key(mc: &ModelCache) -> String {
    mc.spec
        .workload
        .as_ref()
        .map(|w| w.version_label.clone())
        .unwrap_or_else(|| DEFAULT_VERSION_LABEL.to_string())
}

/// The version the pod will serve: its label or annotation, else the
/// ModelCache's (which the patch then adds).
fn pod_version(mc: &ModelCache, pod: &Pod) -> String {
    let key = version_key(mc);
    let meta = &pod.metadata;
    meta.labels
        .as_ref()
        .and_then(|l| l.get(&key))
        .or_else(|| meta.annotations.as_ref().and_then(|a| a.get(&key)))
        .cloned()
        .unwrap_or_else(|| mc.spec.version.clone())
}

/// The digest the controller pinned for the pod's version, if it has.
fn pinned_digest(mc: &ModelCache, pod: &Pod) -> Option<String> {
    let version = pod_version(mc, pod);
    mc.status
        .as_ref()?
        .versions
        .iter()
        .find(|v| v.version == version)?
        .manifest_digest
        .clone()
}

/// The version annotation (or label) of the pod, through the downward API.
fn version_env(mc: &ModelCache, pod: &Pod) -> EnvVar {
    let key = version_key(mc);
    let in_labels = pod
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(&key));
    let field = if in_labels { "labels" } else { "annotations" };
    EnvVar {
        name: "MODELCACHE_VERSION".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: format!("metadata.{field}['{key}']"),
                api_version: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What serving code needs to reach the cache.
fn serving_env(mc: &ModelCache, pod: &Pod) -> Vec<EnvVar> {
    let mut out = builders::redis_env(mc);
    out.push(env("MODELCACHE_MODEL", &mc.spec.model));
    out.push(version_env(mc, pod));
    out
}

fn warm_container(mc: &ModelCache, image: &str) -> Option<(Container, Volume)> {
    let warmup = mc.spec.warmup.as_ref()?;
    let (config_map, key) = match &warmup.prompts_config_map_ref {
        Some(r) => (r.name.clone(), r.key.clone()),
        None if !warmup.prompts.is_empty() => (
            builders::names(mc).warmup,
            builders::WARMUP_PROMPTS_KEY.to_string(),
        ),
        None => return None,
    };
    let volume = Volume {
        name: WARMUP_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map,
            items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                key,
                path: "prompts.jsonl".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let container = Container {
        name: WARM_CONTAINER.into(),
        image: Some(image.into()),
        args: Some(vec!["warm".into()]),
        env: Some(vec![
            env("MODELCACHE_ENGINE_URL", &warmup.engine_url),
            env(
                "MODELCACHE_PROMPTS",
                &format!("{WARMUP_PATH}/prompts.jsonl"),
            ),
            env(
                "MODELCACHE_WARM_CONCURRENCY",
                &warmup.concurrency.to_string(),
            ),
            env("MODELCACHE_WARM_ADDR", &format!("0.0.0.0:{WARM_PORT}")),
        ]),
        // A native sidecar: it keeps running beside the engine, and the pod
        // is ready only when this container is, i.e. once the prefix cache
        // is warm (and while the engine stays up).
        restart_policy: Some("Always".into()),
        ports: Some(vec![ContainerPort {
            name: Some("warm".into()),
            container_port: WARM_PORT,
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("warm".into()),
                ..Default::default()
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        volume_mounts: Some(vec![mount(WARMUP_VOLUME, WARMUP_PATH, true)]),
        security_context: Some(locked_down()),
        ..Default::default()
    };
    Some((container, volume))
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("Kubernetes objects serialize")
}

/// The JSON Patch that injects `mc` into `pod`.
pub fn patch(pod: &Pod, mc: &ModelCache, config: &InjectConfig) -> Vec<Value> {
    let image = config.image.as_str();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops = Vec::new();

    // A pod that names no version gets the ModelCache's current one, so
    // that it fetches, serves and is counted as that version. Put the
    // version in the pod template instead, to roll pods on a bump.
    let key = version_key(mc);
    let has = |m: &Option<std::collections::BTreeMap<String, String>>| {
        m.as_ref().is_some_and(|m| m.contains_key(&key))
    };
    if !has(&pod.metadata.labels) && !has(&pod.metadata.annotations) {
        let pointer = key.replace('~', "~0").replace('/', "~1");
        ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{pointer}"), "value": mc.spec.version}));
    }

    // A provisioned Redis's NetworkPolicy admits pods with this label.
    let provisioned = mc.spec.redis.as_ref().is_none_or(|r| r.external.is_none());
    let name = mc.metadata.name.clone().unwrap_or_default();
    let labels = pod.metadata.labels.as_ref();
    if provisioned && labels.and_then(|l| l.get(CLIENT_LABEL)) != Some(&name) {
        ops.push(match labels {
            None => json!({"op": "add", "path": "/metadata/labels", "value": {CLIENT_LABEL: name}}),
            Some(_) => json!({"op": "add", "path": format!("/metadata/labels/{}", CLIENT_LABEL.replace('/', "~1")), "value": name}),
        });
    }

    let weights = Artifact {
        container: FETCH_CONTAINER,
        model: &mc.spec.model,
        version: version_env(mc, pod),
        volume: WEIGHTS_VOLUME,
        path: WEIGHTS_PATH,
        node_agent: config.node_agent_port,
        manifest_digest: pinned_digest(mc, pod),
    };
    let (fetch, mut volumes) = fetch_container(mc, image, weights);
    volumes.insert(
        0,
        Volume {
            name: WEIGHTS_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    );
    // Fetch first, then the warm sidecar: init containers start in order,
    // and the weights must be complete before anything else runs.
    let mut init = vec![fetch];
    let gateway = super::gateway::sidecar(mc, image, version_env(mc, pod));
    // The gateway's embedding model, if it has a semantic layer, right
    // after the weights: every download is done before a sidecar starts.
    if gateway.is_some()
        && let Some((fetch, more)) =
            super::gateway::embedding_fetch(mc, image, config.node_agent_port)
    {
        init.push(fetch);
        volumes.extend(more);
    }
    if let Some((warm, volume)) = warm_container(mc, image) {
        init.push(warm);
        volumes.push(volume);
    }
    // The gateway last: it fronts the engine, which the warm-up primes.
    init.extend(gateway);
    // Both fetches mount the source's header and key volumes: once each.
    let mut seen = std::collections::BTreeSet::new();
    volumes.retain(|v| seen.insert(v.name.clone()));
    match spec.init_containers.as_deref() {
        None | Some([]) => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": to_json(&init)}))
        }
        Some(_) => {
            for (i, c) in init.iter().enumerate() {
                ops.push(json!({"op": "add", "path": format!("/spec/initContainers/{i}"), "value": to_json(c)}));
            }
        }
    }
    let taken: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let volumes: Vec<Volume> = volumes
        .into_iter()
        .filter(|v| !taken.contains(&v.name.as_str()))
        .collect();
    if spec.volumes.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": to_json(&volumes)}));
    } else {
        for v in &volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": to_json(v)}));
        }
    }

    let serving = serving_env(mc, pod);
    for (i, c) in spec.containers.iter().enumerate() {
        // What the user set explicitly wins.
        let defined: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let add: Vec<&EnvVar> = serving
            .iter()
            .filter(|e| !defined.contains(&e.name.as_str()))
            .collect();
        if c.env.is_none() {
            ops.push(json!({"op": "add", "path": format!("/spec/containers/{i}/env"), "value": to_json(&add)}));
        } else {
            for e in add {
                ops.push(json!({"op": "add", "path": format!("/spec/containers/{i}/env/-"), "value": to_json(e)}));
            }
        }
        let mounted = c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == WEIGHTS_VOLUME || m.mount_path == WEIGHTS_PATH);
        if !mounted {
            let m = mount(WEIGHTS_VOLUME, WEIGHTS_PATH, true);
            if c.volume_mounts.is_none() {
                ops.push(json!({"op": "add", "path": format!("/spec/containers/{i}/volumeMounts"), "value": [to_json(&m)]}));
            } else {
                ops.push(json!({"op": "add", "path": format!("/spec/containers/{i}/volumeMounts/-"), "value": to_json(&m)}));
            }
        }
    }
    ops
}

/// Whether the pod has the fetch container (injected before, or by hand).
fn already_injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
            .any(|c| c.name == FETCH_CONTAINER)
    })
}

/// The ModelCache (namespace, name) a review needs looked up: the one an
/// annotated pod names, unless it is injected already. `None` also for a
/// request whose pod cannot be read.
pub fn lookup_for(request: &Value) -> Option<(String, String)> {
    let req = &request["request"];
    let pod: Pod = serde_json::from_value(req["object"].clone()).ok()?;
    let name = requested(&pod).filter(|_| !already_injected(&pod))?;
    let namespace = req["namespace"].as_str().unwrap_or("default");
    Some((namespace.to_owned(), name.to_owned()))
}

/// The webhook's answer to one AdmissionReview (`admission.k8s.io/v1`):
/// `find` looks a ModelCache up by namespace and name.
pub fn review(
    request: &Value,
    find: impl Fn(&str, &str) -> Result<Option<ModelCache>, String>,
    config: &InjectConfig,
) -> Value {
    let req = &request["request"];
    let uid = req["uid"].clone();
    let namespace = req["namespace"].as_str().unwrap_or("default");
    let response = |extra: Value| {
        let mut r = json!({"uid": uid, "allowed": true});
        if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
            r.extend(extra.clone());
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r})
    };
    let pod: Pod = match serde_json::from_value(req["object"].clone()) {
        Ok(p) => p,
        Err(e) => {
            return response(json!({
                "allowed": config.failure_policy == FailurePolicy::Ignore,
                "status": {"code": 400, "message": format!("failed to read the pod in the AdmissionReview: {e}")}
            }));
        }
    };
    let found = match requested(&pod) {
        Some(name) if !already_injected(&pod) => find(namespace, name),
        _ => Ok(None),
    };
    let found = match &found {
        Ok(mc) => Ok(mc.as_ref()),
        Err(e) => Err(e.as_str()),
    };
    match decide(&pod, namespace, found, config) {
        Decision::NotAnnotated | Decision::AlreadyInjected => response(json!({})),
        Decision::Patch(ops) => {
            use base64::Engine;
            // A JSON value's text: serializing it cannot fail.
            let bytes = Value::Array(ops).to_string().into_bytes();
            response(json!({
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            }))
        }
        Decision::Refuse(message) => match config.failure_policy {
            FailurePolicy::Fail => response(json!({
                "allowed": false,
                "status": {"code": 403, "reason": "Forbidden", "message": message}
            })),
            FailurePolicy::Ignore => response(json!({
                "warnings": [format!("{message}; the pod is admitted without modelcache")]
            })),
        },
    }
}
