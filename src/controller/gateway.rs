//! The caching gateway's objects (`spec.gateway`), as pure functions:
//!
//! - Secret `<name>-gateway`: the gateway's HMAC secret (created once, like
//!   the Redis password), the same for every replica and sidecar, so a
//!   caller's scope is the same whichever gateway answers;
//! - ConfigMap `<name>-gateway`: what the CachePolicy decides (sharing,
//!   sampling, TTL) and the prices, as the environment every gateway reads;
//! - Standalone: Deployment and Service `<name>-gateway`, serving the
//!   registry's active version;
//! - Sidecar: the native sidecar container the webhook injects into model
//!   pods, in front of the engine on localhost, serving the pod's version;
//! - with a semantic layer, in either mode: an init container that fetches
//!   the embedding model from the ModelCache's source into an `emptyDir`,
//!   mounted read-only into the gateway.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource,
    EnvVar, HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, Service, ServicePort, ServiceSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::builders::{self, env, locked_down, mount, secret_key_env};
use super::fetch::{Artifact, fetch_container};
use super::network::CLIENT_LABEL;
use crate::crd::CachePolicySpec;
use crate::crd::model_cache::{DEFAULT_GATEWAY_UPSTREAM, GatewayMode, GatewaySettings, ModelCache};

/// The key of the gateway Secret that holds the HMAC secret.
pub const SECRET_KEY: &str = "secret";
/// The injected gateway sidecar.
pub const GATEWAY_CONTAINER: &str = "modelcache-gateway";
/// The init container that fetches the semantic layer's embedding model.
pub const EMBEDDING_FETCH_CONTAINER: &str = "modelcache-fetch-embedding";
const EMBEDDING_VOLUME: &str = "modelcache-embedding";
/// Where the gateway finds the embedding model.
pub const EMBEDDING_PATH: &str = "/etc/modelcache/embedding";

/// `<name>-gateway`: the Secret, ConfigMap, Deployment and Service.
pub fn name(mc: &ModelCache) -> String {
    format!(
        "{}-gateway",
        mc.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The Secret with the gateway's secret. Created once, never applied again.
pub fn secret(mc: &ModelCache, value: &str) -> Secret {
    Secret {
        metadata: builders::meta(mc, &name(mc)),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            SECRET_KEY.into(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// What every gateway of `mc` reads from the policy, as environment.
pub fn config_map(mc: &ModelCache, policy: &CachePolicySpec) -> ConfigMap {
    let gateway = &policy.gateway;
    let mut data = BTreeMap::from([
        (
            "MODELCACHE_GATEWAY_SHARING".to_string(),
            gateway.sharing.flag().to_string(),
        ),
        (
            "MODELCACHE_GATEWAY_ALLOW_SAMPLING".to_string(),
            gateway.allow_sampling.to_string(),
        ),
        (
            "MODELCACHE_GATEWAY_TTL".to_string(),
            policy.ttl_seconds.result.max(0).to_string(),
        ),
    ]);
    // Validation refused a semantic layer without a threshold.
    if let (Some(_), Some(threshold)) = (
        mc.spec.gateway.as_ref().and_then(|g| g.semantic.as_ref()),
        policy.semantic.threshold,
    ) {
        data.insert(
            "MODELCACHE_SEMANTIC_THRESHOLD".into(),
            threshold.to_string(),
        );
    }
    if let Some(price) = mc.spec.gateway.as_ref().and_then(|g| g.price.as_ref()) {
        data.insert(
            "MODELCACHE_PRICE_INPUT_PER_1K".into(),
            price.input_per_1k.to_string(),
        );
        data.insert(
            "MODELCACHE_PRICE_OUTPUT_PER_1K".into(),
            price.output_per_1k.to_string(),
        );
    }
    ConfigMap {
        metadata: builders::meta(mc, &name(mc)),
        data: Some(data),
        ..Default::default()
    }
}

/// The gateway container: `modelcache gateway` on `settings.port` (the
/// admin port, with the probes and /metrics, is the next one), its
/// settings from the ConfigMap and Secrets, the version from `version`.
fn container(
    mc: &ModelCache,
    settings: &GatewaySettings,
    image: &str,
    version: Option<EnvVar>,
) -> Container {
    let port = settings.port;
    let upstream = settings
        .upstream_url
        .as_deref()
        .unwrap_or(DEFAULT_GATEWAY_UPSTREAM);
    let mut vars = builders::redis_env(mc);
    vars.extend([
        env("MODELCACHE_UPSTREAM_URL", upstream),
        env("MODELCACHE_MODEL", &mc.spec.model),
        secret_key_env("MODELCACHE_GATEWAY_SECRET", &name(mc), SECRET_KEY),
        env("MODELCACHE_GATEWAY_ADDR", &format!("0.0.0.0:{port}")),
        env(
            "MODELCACHE_GATEWAY_ADMIN_ADDR",
            &format!("0.0.0.0:{}", port + 1),
        ),
    ]);
    vars.extend(version);
    if let Some(semantic) = &settings.semantic {
        vars.push(env("MODELCACHE_EMBEDDING_MODEL", EMBEDDING_PATH));
        vars.push(env(
            "MODELCACHE_SEMANTIC_MAX_ENTRIES",
            &semantic.max_entries.to_string(),
        ));
    }
    if let Some(key) = &settings.upstream_key_secret_ref {
        vars.push(secret_key_env(
            "MODELCACHE_UPSTREAM_KEY",
            &key.name,
            &key.key,
        ));
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("gateway-admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    };
    Container {
        name: GATEWAY_CONTAINER.into(),
        image: Some(image.into()),
        args: Some(vec!["gateway".into()]),
        env: Some(vars),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: name(mc),
                optional: Some(false),
            }),
            ..Default::default()
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("gateway".into()),
                container_port: port,
                ..Default::default()
            },
            ContainerPort {
                name: Some("gateway-admin".into()),
                container_port: port + 1,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        resources: Some(resources(settings.semantic.is_some())),
        volume_mounts: settings
            .semantic
            .as_ref()
            .map(|_| vec![mount(EMBEDDING_VOLUME, EMBEDDING_PATH, true)]),
        security_context: Some(locked_down()),
        ..Default::default()
    }
}

/// The exact layer needs little (33 MiB peak in the benchmark); the
/// semantic layer holds the embedding model (all-MiniLM-L6-v2: 90 MB of
/// f32 weights), its activations and the in-process index.
fn resources(semantic: bool) -> ResourceRequirements {
    let (cpu, request, limit) = if semantic {
        ("500m", "384Mi", "1Gi")
    } else {
        ("100m", "64Mi", "256Mi")
    };
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity(cpu.into())),
            ("memory".into(), Quantity(request.into())),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), Quantity(limit.into()))])),
        ..Default::default()
    }
}

/// The init container that fetches the semantic layer's embedding model
/// (`<source>/<name>/<version>/`, verified like the weights) and the
/// volumes it and the gateway need; `None` without a semantic layer. With
/// `node_agent`, it tries the node agent first (injected pods only: the
/// agent serves no other).
pub fn embedding_fetch(
    mc: &ModelCache,
    image: &str,
    node_agent: Option<u16>,
) -> Option<(Container, Vec<Volume>)> {
    let model = &mc.spec.gateway.as_ref()?.semantic.as_ref()?.embedding_model;
    let (container, mut volumes) = fetch_container(
        mc,
        image,
        Artifact {
            container: EMBEDDING_FETCH_CONTAINER,
            model: &model.name,
            version: env("MODELCACHE_VERSION", &model.version),
            volume: EMBEDDING_VOLUME,
            path: EMBEDDING_PATH,
            node_agent,
            // Its versions are not followed, so not pinned: with an agent,
            // the fetch pins the source's manifest itself.
            manifest_digest: None,
        },
    );
    volumes.insert(
        0,
        Volume {
            name: EMBEDDING_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    );
    Some((container, volumes))
}

/// The sidecar the webhook injects into a model pod: a native sidecar (an
/// init container that keeps running), so it is up before the engine's
/// clients are and stops after them. `None` unless the ModelCache asks for
/// a sidecar gateway.
pub fn sidecar(mc: &ModelCache, image: &str, version: EnvVar) -> Option<Container> {
    let settings = mc.spec.gateway.as_ref()?;
    if settings.mode != GatewayMode::Sidecar {
        return None;
    }
    let mut c = container(mc, settings, image, Some(version));
    c.restart_policy = Some("Always".into());
    Some(c)
}

fn selector_labels(mc: &ModelCache) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "modelcache-gateway".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            mc.metadata.name.clone().unwrap_or_default(),
        ),
    ])
}

/// The standalone gateway's Deployment and Service; `None` unless the
/// ModelCache asks for a standalone gateway.
pub fn standalone(mc: &ModelCache, image: &str) -> Option<(Deployment, Service)> {
    let settings = mc.spec.gateway.as_ref()?;
    if settings.mode != GatewayMode::Standalone {
        return None;
    }
    // The registry's active version: the ModelCache's version once rolled
    // out, never an answer of the version before.
    let mut c = container(mc, settings, image, None);
    c.args = Some(vec!["gateway".into(), "--follow-registry".into()]);
    let (init, volumes) = embedding_fetch(mc, image, None).unzip();
    let mut pod_labels = selector_labels(mc);
    // The Redis NetworkPolicy admits its clients by this label.
    pod_labels.insert(
        CLIENT_LABEL.into(),
        mc.metadata.name.clone().unwrap_or_default(),
    );
    let deployment = Deployment {
        metadata: builders::meta(mc, &name(mc)),
        spec: DeploymentSpec {
            replicas: Some(settings.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(mc)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![c],
                    init_containers: init.map(|c| vec![c]),
                    volumes,
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let service = Service {
        metadata: builders::meta(mc, &name(mc)),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(mc)),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: settings.port,
                    target_port: Some(IntOrString::String("gateway".into())),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: settings.port + 1,
                    target_port: Some(IntOrString::String("gateway-admin".into())),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some((deployment, service))
}

/// The standalone gateway's in-cluster base URL.
pub fn endpoint(mc: &ModelCache) -> Option<String> {
    let settings = mc.spec.gateway.as_ref()?;
    (settings.mode == GatewayMode::Standalone).then(|| {
        format!(
            "http://{}.{}.svc:{}/v1",
            name(mc),
            mc.metadata.namespace.as_deref().unwrap_or("default"),
            settings.port
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model_cache(gateway: serde_json::Value) -> ModelCache {
        serde_json::from_value(json!({
            "apiVersion": "modelcache.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": "faq", "namespace": "ml", "uid": "u1"},
            "spec": {"model": "gpt", "version": "kb-7", "source": {"uri": "s3://b/models"},
                     "gateway": gateway}
        }))
        .unwrap()
    }

    fn env_of(c: &Container) -> BTreeMap<String, serde_json::Value> {
        c.env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), serde_json::to_value(e).unwrap()))
            .collect()
    }

    #[test]
    fn a_standalone_gateway_follows_the_registry_locked_down() {
        let mc = model_cache(
            json!({"mode": "Standalone", "upstreamUrl": "https://api.openai.com",
            "upstreamKeySecretRef": {"name": "openai", "key": "api-key"}, "replicas": 3}),
        );
        let (deployment, service) = standalone(&mc, "modelcache:1").unwrap();
        assert!(sidecar(&mc, "modelcache:1", env("X", "y")).is_none());
        let spec = deployment.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref().unwrap(), ["gateway", "--follow-registry"]);
        let vars = env_of(c);
        assert_eq!(
            vars["MODELCACHE_UPSTREAM_URL"]["value"],
            "https://api.openai.com"
        );
        assert_eq!(vars["MODELCACHE_MODEL"]["value"], "gpt");
        assert_eq!(
            vars["MODELCACHE_UPSTREAM_KEY"]["valueFrom"]["secretKeyRef"],
            json!({"name": "openai", "key": "api-key"})
        );
        assert_eq!(
            vars["MODELCACHE_GATEWAY_SECRET"]["valueFrom"]["secretKeyRef"],
            json!({"name": "faq-gateway", "key": "secret"})
        );
        assert_eq!(
            vars["MODELCACHE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"],
            "faq-redis"
        );
        // No secret value is in the pod spec, only references.
        let text = serde_json::to_string(&pod.containers).unwrap();
        assert!(!text.contains("\"value\":\"sk-"), "{text}");
        let security = c.security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.run_as_non_root, Some(true));
        // The Redis NetworkPolicy admits the gateway's pods.
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels[CLIENT_LABEL], "faq");
        let ports = service.spec.unwrap().ports.unwrap();
        assert_eq!(ports[0].port, 8090);
        assert_eq!(
            endpoint(&mc).as_deref(),
            Some("http://faq-gateway.ml.svc:8090/v1")
        );
    }

    #[test]
    fn a_semantic_layer_fetches_its_embedding_model_before_the_gateway_starts() {
        let mut mc = model_cache(
            json!({"mode": "Standalone", "upstreamUrl": "https://api.openai.com",
            "semantic": {"embeddingModel": {"name": "all-minilm-l6-v2", "version": "2"}, "maxEntries": 5000}}),
        );
        mc.spec.source.credentials_secret_ref = Some(crate::crd::model_cache::LocalRef {
            name: "s3-creds".into(),
        });
        let (deployment, _) = standalone(&mc, "modelcache:1").unwrap();
        let pod = deployment.spec.template.spec.unwrap();
        let init = pod.init_containers.as_deref().unwrap();
        assert_eq!(init.len(), 1);
        let fetch = &init[0];
        assert_eq!(fetch.name, EMBEDDING_FETCH_CONTAINER);
        assert_eq!(fetch.args.as_deref().unwrap(), ["fetch"]);
        let vars = env_of(fetch);
        assert_eq!(vars["MODELCACHE_SOURCE"]["value"], "s3://b/models");
        assert_eq!(vars["MODELCACHE_MODEL"]["value"], "all-minilm-l6-v2");
        assert_eq!(vars["MODELCACHE_VERSION"]["value"], "2");
        assert_eq!(vars["MODELCACHE_DEST"]["value"], EMBEDDING_PATH);
        assert_eq!(
            vars["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"],
            "s3-creds"
        );
        assert_eq!(
            fetch
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        let writable = &fetch.volume_mounts.as_deref().unwrap()[0];
        assert_eq!(
            (writable.mount_path.as_str(), writable.read_only),
            (EMBEDDING_PATH, Some(false))
        );
        let volumes = pod.volumes.as_deref().unwrap();
        assert_eq!(volumes[0].name, writable.name);
        assert!(volumes[0].empty_dir.is_some());
        // The gateway reads the model from the same volume, read-only.
        let gateway = &pod.containers[0];
        let mounted = &gateway.volume_mounts.as_deref().unwrap()[0];
        assert_eq!(mounted.name, writable.name);
        assert_eq!(mounted.read_only, Some(true));
        let vars = env_of(gateway);
        assert_eq!(vars["MODELCACHE_EMBEDDING_MODEL"]["value"], EMBEDDING_PATH);
        assert_eq!(vars["MODELCACHE_SEMANTIC_MAX_ENTRIES"]["value"], "5000");
        let limits = gateway.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"], Quantity("1Gi".into()));
        // The threshold is the policy's.
        let mut policy = CachePolicySpec::default();
        policy.semantic.threshold = Some(0.84);
        let data = config_map(&mc, &policy).data.unwrap();
        assert_eq!(data["MODELCACHE_SEMANTIC_THRESHOLD"], "0.84");
        // Without a semantic layer: none of it.
        let plain = model_cache(json!({"mode": "Standalone", "upstreamUrl": "https://x.example"}));
        let (deployment, _) = standalone(&plain, "modelcache:1").unwrap();
        let pod = deployment.spec.template.spec.unwrap();
        assert!(pod.init_containers.is_none() && pod.volumes.is_none());
        assert!(pod.containers[0].volume_mounts.is_none());
        assert!(
            !config_map(&plain, &policy)
                .data
                .unwrap()
                .contains_key("MODELCACHE_SEMANTIC_THRESHOLD")
        );
    }

    #[test]
    fn a_sidecar_fronts_the_engine_on_localhost_at_the_pods_version() {
        let mc = model_cache(json!({"price": {"inputPer1k": 0.03, "outputPer1k": 0.06}}));
        assert!(standalone(&mc, "i").is_none());
        let version = env("MODELCACHE_VERSION", "from-the-pod");
        let c = sidecar(&mc, "modelcache:1", version).unwrap();
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        let vars = env_of(&c);
        assert_eq!(
            vars["MODELCACHE_UPSTREAM_URL"]["value"],
            DEFAULT_GATEWAY_UPSTREAM
        );
        assert_eq!(vars["MODELCACHE_VERSION"]["value"], "from-the-pod");
        assert_eq!(
            c.env_from.as_ref().unwrap()[0]
                .config_map_ref
                .as_ref()
                .unwrap()
                .name,
            "faq-gateway"
        );
        let mut policy = CachePolicySpec::default();
        policy.gateway.sharing = crate::crd::cache_policy::GatewaySharing::Shared;
        policy.ttl_seconds.result = 600;
        let data = config_map(&mc, &policy).data.unwrap();
        assert_eq!(data["MODELCACHE_GATEWAY_SHARING"], "shared");
        assert_eq!(data["MODELCACHE_GATEWAY_ALLOW_SAMPLING"], "false");
        assert_eq!(data["MODELCACHE_GATEWAY_TTL"], "600");
        assert_eq!(data["MODELCACHE_PRICE_INPUT_PER_1K"], "0.03");
    }
}
