//! The objects a ModelCache owns, built as pure functions of the ModelCache
//! and its resolved Redis settings. They are applied with server-side apply,
//! so each function returns the full desired state of the fields we own.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, ExecAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::ModelCache;
use crate::store::settings::{AUTH_CONF_PATH, RedisSettings, redis_conf};

/// The port of every provisioned Redis.
pub const REDIS_PORT: i32 = 6379;
/// Key of the generated Secret that holds the password clients use (the
/// `default` user's, with serving rights only: see [`crate::keyspace::acl`]).
pub const PASSWORD_KEY: &str = "password";
/// Key of the generated Secret that holds the controller's own password
/// ([`crate::keyspace::acl::ADMIN_USER`]); no pod mounts it.
pub const ADMIN_PASSWORD_KEY: &str = "admin-password";
/// Key of the generated Secret that redis.conf `include`s.
pub const AUTH_CONF_KEY: &str = "auth.conf";
/// Pod-template annotation that follows the Secret's identity: a recreated
/// Secret (a new password) rolls the Redis pod, nothing else about it does.
pub const SECRET_UID_ANNOTATION: &str = "modelcache.dev/secret-uid";
/// UID and GID of the `redis`/`valkey` user in the official images.
const REDIS_UID: i64 = 999;

/// The longest ModelCache name for which the StatefulSet `<name>-redis` stays
/// within 52 characters, so that its pods' `controller-revision-hash` label
/// (the name plus a hash) is still a valid label value.
pub const MAX_NAME_LEN: usize = 46;

/// Names of the owned objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Secret, StatefulSet and the clients' Service.
    pub redis: String,
    /// The headless Service that governs the StatefulSet (its pods' DNS).
    pub headless: String,
    /// The ConfigMap with redis.conf.
    pub config_map: String,
    /// The inline warm-up prompts, for model pods to mount.
    pub warmup: String,
    /// The inline CDN request headers, for the fetch container to mount.
    pub cdn_headers: String,
}

/// The key of the warm-up ConfigMap that holds the prompts.
pub const WARMUP_PROMPTS_KEY: &str = "prompts.jsonl";

/// The names of the objects `mc` owns.
pub fn names(mc: &ModelCache) -> Names {
    let base = mc.metadata.name.clone().unwrap_or_default();
    Names {
        redis: format!("{base}-redis"),
        headless: format!("{base}-redis-headless"),
        config_map: format!("{base}-redis-config"),
        warmup: format!("{base}-warmup"),
        cdn_headers: format!("{base}-cdn-headers"),
    }
}

/// The label that says an object is managed by modelcache.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The label naming the ModelCache an object was made for.
pub const MODELCACHE_LABEL: &str = "modelcache.dev/modelcache";

/// Labels on every owned object and the selector of the Redis pod.
pub fn labels(mc: &ModelCache) -> BTreeMap<String, String> {
    let name = mc.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "redis".into()),
        ("app.kubernetes.io/instance".into(), name.clone()),
        ("app.kubernetes.io/component".into(), "cache".into()),
        (MANAGED_BY.into(), "modelcache".into()),
        (MODELCACHE_LABEL.into(), name),
    ])
}

pub(crate) fn selector_labels(mc: &ModelCache) -> BTreeMap<String, String> {
    let mut l = labels(mc);
    l.retain(|k, _| k == "app.kubernetes.io/instance" || k == "modelcache.dev/modelcache");
    l
}

/// The controller reference to the ModelCache. Only an object that was never
/// stored lacks a uid (the API server always sets one), so every object the
/// controller applies carries it; a fixture without a uid gets none.
fn owner(mc: &ModelCache) -> Option<OwnerReference> {
    mc.controller_owner_ref(&())
}

pub(crate) fn meta(mc: &ModelCache, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: mc.metadata.namespace.clone(),
        labels: Some(labels(mc)),
        owner_references: owner(mc).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The Secret with the Redis passwords and the ACL users built from them.
/// Created once (never applied again), so that no password is rotated by
/// accident.
pub fn secret(mc: &ModelCache, admin_password: &str, password: &str) -> Secret {
    let auth_conf = crate::keyspace::acl::auth_conf(&mc.spec.model, admin_password, password);
    Secret {
        metadata: meta(mc, &names(mc).redis),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                PASSWORD_KEY.into(),
                ByteString(password.as_bytes().to_vec()),
            ),
            (
                ADMIN_PASSWORD_KEY.into(),
                ByteString(admin_password.as_bytes().to_vec()),
            ),
            (AUTH_CONF_KEY.into(), ByteString(auth_conf.into_bytes())),
        ])),
        ..Default::default()
    }
}

/// The ConfigMap with redis.conf.
pub fn config_map(mc: &ModelCache, settings: &RedisSettings) -> ConfigMap {
    ConfigMap {
        metadata: meta(mc, &names(mc).config_map),
        data: Some(BTreeMap::from([(
            "redis.conf".into(),
            redis_conf(settings),
        )])),
        ..Default::default()
    }
}

/// The ConfigMap that carries a ModelCache's inline warm-up prompts as JSONL
/// (`prompts.jsonl`), which the model pods' `modelcache warm` mounts and reads
/// with `--prompts`. `None` without inline prompts: prompts from
/// `promptsConfigMapRef` are mounted from the user's own ConfigMap.
pub fn warmup_config_map(mc: &ModelCache) -> Option<ConfigMap> {
    let warmup = mc.spec.warmup.as_ref()?;
    if warmup.prompts.is_empty() {
        return None;
    }
    let prompts = crate::warm::prompts::to_jsonl(&warmup.prompts);
    Some(mounted_config_map(
        mc,
        &names(mc).warmup,
        "warmup",
        BTreeMap::from([(WARMUP_PROMPTS_KEY.into(), prompts)]),
    ))
}

/// A ConfigMap that model pods mount (not the Redis's), labelled as ours
/// with its `component`.
fn mounted_config_map(
    mc: &ModelCache,
    name: &str,
    component: &str,
    data: BTreeMap<String, String>,
) -> ConfigMap {
    let mut metadata = meta(mc, name);
    let labels = metadata.labels.get_or_insert_with(Default::default);
    labels.insert("app.kubernetes.io/name".into(), "modelcache".into());
    labels.insert("app.kubernetes.io/component".into(), component.into());
    ConfigMap {
        metadata,
        data: Some(data),
        ..Default::default()
    }
}

/// The inline `spec.source.cdn.headers`, one key per header, for the fetch
/// container to mount: so that their values stay out of the admission
/// webhook's answer and out of the pod spec (anyone who may read pods, or
/// reach the webhook, would see them there).
pub fn cdn_headers_config_map(mc: &ModelCache) -> Option<ConfigMap> {
    let cdn = mc.spec.source.cdn.as_ref()?;
    if cdn.headers.is_empty() {
        return None;
    }
    Some(mounted_config_map(
        mc,
        &names(mc).cdn_headers,
        "cdn-headers",
        cdn.headers.clone(),
    ))
}

/// Whether `name` can be a ConfigMap key (`[-._a-zA-Z0-9]+`, at most 253),
/// as a header name must be to be mounted as a file.
pub fn is_config_map_key(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// A command that pings Redis with the password from the environment, so the
/// password is neither in the pod spec nor on a command line.
/// Readiness: Redis answers PONG.
fn ping_probe(initial_delay: i32, failure_threshold: i32) -> Probe {
    probe("PONG", initial_delay, failure_threshold)
}

/// Liveness: the server answers at all. BUSY (a long script) and LOADING
/// mean it is working: restarting it would lose every key for nothing.
fn alive_probe(initial_delay: i32, failure_threshold: i32) -> Probe {
    probe("PONG|BUSY|LOADING", initial_delay, failure_threshold)
}

/// An authenticated PING whose answer must match `answers` (an ERE).
fn probe(answers: &str, initial_delay: i32, failure_threshold: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "cli=$(command -v valkey-cli || command -v redis-cli) && \
                     \"$cli\" -p 6379 ping 2>&1 | grep -qE '{answers}'"
                ),
            ]),
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(5),
        timeout_seconds: Some(3),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn secret_env(name: &str, secret: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: PASSWORD_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A plain environment variable.
pub(crate) fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// An environment variable from one key of a Secret.
pub(crate) fn secret_key_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a client of the model's Redis needs to reach it: the URL, the user
/// of an external Redis, and the password from its Secret.
pub(crate) fn redis_env(mc: &ModelCache) -> Vec<EnvVar> {
    let mut out = Vec::new();
    match mc.spec.redis.as_ref().and_then(|r| r.external.as_ref()) {
        Some(external) => {
            out.push(env("MODELCACHE_REDIS_URL", &external.url));
            if let Some(user) = &external.username {
                out.push(env("MODELCACHE_REDIS_USERNAME", user));
            }
            if let Some(r) = &external.password_secret_ref {
                out.push(secret_key_env("MODELCACHE_REDIS_PASSWORD", &r.name, &r.key));
            }
        }
        None => {
            out.push(env("MODELCACHE_REDIS_URL", &service_url(mc)));
            out.push(secret_key_env(
                "MODELCACHE_REDIS_PASSWORD",
                &names(mc).redis,
                PASSWORD_KEY,
            ));
        }
    }
    out
}

/// Our containers run as non-root on a read-only root filesystem, with no
/// privileges to gain; they write only to the shared volumes.
pub(crate) fn locked_down() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// One Redis pod. Only what cannot change at run time is in the pod template
/// (image, resources, the Secret's identity); redis.conf changes are applied
/// with CONFIG SET and never roll the pod, so its keys survive.
pub fn stateful_set(mc: &ModelCache, settings: &RedisSettings, secret_uid: &str) -> StatefulSet {
    let n = names(mc);
    let auth_dir = AUTH_CONF_PATH
        .rsplit_once('/')
        .map(|(dir, _)| dir)
        .unwrap_or("/etc/redis-auth");
    let memory = Quantity(settings.memory.clone());
    let container = Container {
        name: "redis".into(),
        image: Some(settings.image.clone()),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "exec \"$(command -v valkey-server || command -v redis-server)\" /etc/redis/redis.conf"
                .into(),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: REDIS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(vec![
            secret_env("REDISCLI_AUTH", &n.redis),
            secret_env("VALKEYCLI_AUTH", &n.redis),
        ]),
        resources: Some(ResourceRequirements {
            // Memory request = limit: maxmemory is computed from the limit, and
            // a Redis that is evicted for memory loses every key.
            requests: Some(BTreeMap::from([
                ("memory".into(), memory.clone()),
                ("cpu".into(), Quantity(settings.cpu.clone())),
            ])),
            // No CPU limit: CFS throttling of a single-threaded server shows up
            // as latency spikes for every client.
            limits: Some(BTreeMap::from([("memory".into(), memory)])),
            ..Default::default()
        }),
        readiness_probe: Some(ping_probe(2, 3)),
        liveness_probe: Some(alive_probe(15, 6)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("config", "/etc/redis", true),
            mount("auth", auth_dir, true),
            mount("data", "/data", false),
        ]),
        ..Default::default()
    };
    let pod = PodSpec {
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(REDIS_UID),
            run_as_group: Some(REDIS_UID),
            fs_group: Some(REDIS_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: n.config_map.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: "auth".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(n.redis.clone()),
                    items: Some(vec![KeyToPath {
                        key: AUTH_CONF_KEY.into(),
                        path: "auth.conf".into(),
                        mode: Some(0o440),
                        ..Default::default()
                    }]),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: "data".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    StatefulSet {
        metadata: meta(mc, &n.redis),
        spec: StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(n.headless.clone()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(mc)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(mc)),
                    annotations: Some(BTreeMap::from([(
                        SECRET_UID_ANNOTATION.into(),
                        secret_uid.to_owned(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The ClusterIP Service in front of the Redis pod.
pub fn service(mc: &ModelCache) -> Service {
    Service {
        metadata: meta(mc, &names(mc).redis),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(mc)),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: REDIS_PORT,
                target_port: Some(IntOrString::String("redis".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The headless Service that a StatefulSet needs as its `serviceName`: it
/// gives the pod its stable DNS name, and lists it before it is ready (the
/// clients' Service lists only a ready Redis).
pub fn headless_service(mc: &ModelCache) -> Service {
    let mut service = service(mc);
    service.metadata = meta(mc, &names(mc).headless);
    if let Some(spec) = service.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
        spec.publish_not_ready_addresses = Some(true);
    }
    service
}

/// Whether a StatefulSet that exists must be deleted (leaving its pod) and
/// created anew to become `desired`: `serviceName` cannot be changed in place,
/// and releases before the headless Service named the clients' Service.
pub fn must_recreate(existing: &StatefulSet, desired: &StatefulSet) -> bool {
    let service_name = |s: &StatefulSet| s.spec.service_name.clone();
    service_name(existing) != service_name(desired)
}

/// The in-cluster address of a provisioned Redis.
pub fn service_url(mc: &ModelCache) -> String {
    format!(
        "redis://{}.{}.svc:{REDIS_PORT}",
        names(mc).redis,
        mc.metadata.namespace.as_deref().unwrap_or("default")
    )
}
