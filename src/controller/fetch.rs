//! The `modelcache fetch` init container, as a pure function: one artifact
//! directory (`<source>/<model>/<version>/`) from the ModelCache's source into
//! a volume, with the source's credentials, CDN headers and signing key. Pod
//! injection adds it for the weights and for a semantic sidecar gateway's
//! embedding model; the standalone gateway's Deployment carries it for its
//! embedding model.

use k8s_openapi::api::core::v1::{
    ConfigMapProjection, Container, EnvVar, EnvVarSource, KeyToPath, ObjectFieldSelector,
    ProjectedVolumeSource, SecretKeySelector, SecretProjection, SecretVolumeSource,
    ServiceAccountTokenProjection, Volume, VolumeProjection,
};

use super::builders::{self, env, locked_down, mount, secret_key_env};
use crate::crd::ModelCache;
use clap::ValueEnum as _;

use crate::artifact::cloudfront;
use crate::crd::model_cache::{SigningMode, SigningPolicy};

const SIGNING_VOLUME: &str = "modelcache-cloudfront-key";
const NODE_TOKEN_VOLUME: &str = "modelcache-node-token";
const NODE_TOKEN_PATH: &str = "/var/run/secrets/modelcache.dev/node";
/// The node agent's token lives an hour (the kubelet renews it at 80%); the
/// fetch reads it once, and a fetch that outlives it falls back to the origin.
const NODE_TOKEN_SECONDS: i64 = 3600;
const HEADERS_VOLUME: &str = "modelcache-cdn-headers";
const HEADERS_PATH: &str = "/etc/modelcache/cdn-headers";
const SIGNING_PATH: &str = "/etc/modelcache/cloudfront";
/// Mode of the Secret files mounted into the fetch container: readable by its
/// non-root user whatever the pod's fsGroup, and mounted nowhere else.
const SECRET_FILE_MODE: i32 = 0o444;

/// An artifact directory (`<source>/<model>/<version>/`) an init container
/// fetches into a volume.
pub(super) struct Artifact<'a> {
    /// The init container's name.
    pub container: &'a str,
    /// The directory under the ModelCache's source.
    pub model: &'a str,
    /// `MODELCACHE_VERSION`: a value, or the pod's own through the downward API.
    pub version: EnvVar,
    /// The volume it lands in, and where that is mounted.
    pub volume: &'a str,
    pub path: &'a str,
    /// The port of the node agent on every node (`None`: no node cache),
    /// which the fetch tries before the origin.
    pub node_agent: Option<u16>,
    /// The manifest digest the controller pinned for this version, if it
    /// has: the fetch refuses any other manifest.
    pub manifest_digest: Option<String>,
}

/// What the fetch needs to ask the agent of its node: the node's address
/// (the downward API's `status.hostIP`), and a projected service-account
/// token for audience `modelcache-node` that proves which pod asks. The pod
/// itself needs no hostPath and no privilege.
fn node_agent(port: u16) -> (Vec<EnvVar>, k8s_openapi::api::core::v1::VolumeMount, Volume) {
    let host_ip = EnvVar {
        name: "MODELCACHE_HOST_IP".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "status.hostIP".into(),
                api_version: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let vars = vec![
        host_ip,
        // The kubelet expands $(VAR) from the variables defined before it.
        env(
            "MODELCACHE_NODE_AGENT",
            &format!("http://$(MODELCACHE_HOST_IP):{port}"),
        ),
        env(
            "MODELCACHE_NODE_TOKEN_FILE",
            &format!("{NODE_TOKEN_PATH}/token"),
        ),
    ];
    let volume = Volume {
        name: NODE_TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(crate::node::authorize::AUDIENCE.into()),
                    expiration_seconds: Some(NODE_TOKEN_SECONDS),
                    path: "token".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            default_mode: Some(SECRET_FILE_MODE),
            ..Default::default()
        }),
        ..Default::default()
    };
    (
        vars,
        mount(NODE_TOKEN_VOLUME, NODE_TOKEN_PATH, true),
        volume,
    )
}

/// The `modelcache fetch` init container for `artifact`, from the
/// ModelCache's source with its credentials, headers and signing key, and
/// the volumes those need (not the artifact's own).
pub(super) fn fetch_container(
    mc: &ModelCache,
    image: &str,
    artifact: Artifact,
) -> (Container, Vec<Volume>) {
    let source = &mc.spec.source;
    let mut env_vars = vec![
        env("MODELCACHE_SOURCE", &source.uri),
        env("MODELCACHE_MODEL", artifact.model),
        artifact.version,
        env("MODELCACHE_DEST", artifact.path),
        // Init-container logs are read after the fact: lines, not bars.
        env("MODELCACHE_PROGRESS", "log"),
    ];
    if let Some(e) = &source.endpoint {
        env_vars.push(env("MODELCACHE_S3_ENDPOINT", e));
    }
    if let Some(r) = &source.region {
        env_vars.push(env("MODELCACHE_S3_REGION", r));
    }
    if source.path_style {
        env_vars.push(env("MODELCACHE_S3_PATH_STYLE", "true"));
    }
    if let Some(secret) = &source.credentials_secret_ref {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            env_vars.push(secret_key_env(key, &secret.name, key));
        }
        env_vars.push(EnvVar {
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: "AWS_SESSION_TOKEN".into(),
                    optional: Some(true),
                }),
                ..Default::default()
            }),
            ..env("AWS_SESSION_TOKEN", "")
        });
    }
    let args = vec!["fetch".to_string()];
    let mut mounts = vec![mount(artifact.volume, artifact.path, false)];
    let mut volumes = Vec::new();
    if let Some(digest) = &artifact.manifest_digest {
        env_vars.push(env("MODELCACHE_MANIFEST_DIGEST", digest));
    }
    if let Some(port) = artifact.node_agent {
        let (var, mount, volume) = node_agent(port);
        env_vars.extend(var);
        mounts.push(mount);
        volumes.push(volume);
    }
    if let Some(cdn) = &source.cdn {
        // Headers are files, never arguments or environment variables: the
        // inline ones from the ConfigMap the controller makes of them (so
        // their values are not in this patch), the secret ones from their
        // Secret, both in one directory. The kubelet writes the files as
        // root, and our container runs as 65532 with no fsGroup of ours:
        // 0400 would be unreadable. 0444 reaches no one else, since only
        // this container mounts them.
        let mut sources = Vec::new();
        if !cdn.headers.is_empty() {
            sources.push(VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: builders::names(mc).cdn_headers,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if let Some(secret) = &cdn.headers_secret_ref {
            sources.push(VolumeProjection {
                secret: Some(SecretProjection {
                    name: secret.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if !sources.is_empty() {
            env_vars.push(env("MODELCACHE_HEADERS_DIR", HEADERS_PATH));
            volumes.push(Volume {
                name: HEADERS_VOLUME.into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(sources),
                    default_mode: Some(SECRET_FILE_MODE),
                    ..Default::default()
                }),
                ..Default::default()
            });
            mounts.push(mount(HEADERS_VOLUME, HEADERS_PATH, true));
        }
        if let Some(signing) = &cdn.signing {
            env_vars.push(env(
                "MODELCACHE_CLOUDFRONT_KEY_PAIR_ID",
                &signing.key_pair_id,
            ));
            // As the spec says, not the fetch's own defaults; named as the
            // fetch's flags parse them.
            let name = |v: Option<clap::builder::PossibleValue>| {
                v.map(|v| v.get_name().to_owned()).unwrap_or_default()
            };
            let mode = name(signing_mode(signing.mode).to_possible_value());
            let policy = name(signing_policy(signing.policy).to_possible_value());
            env_vars.push(env("MODELCACHE_CLOUDFRONT_MODE", &mode));
            env_vars.push(env("MODELCACHE_CLOUDFRONT_POLICY", &policy));
            env_vars.push(env(
                "MODELCACHE_CLOUDFRONT_EXPIRES",
                &signing.expires_seconds.to_string(),
            ));
            env_vars.push(env(
                "MODELCACHE_CLOUDFRONT_PRIVATE_KEY",
                &format!("{SIGNING_PATH}/key.pem"),
            ));
            // The key is a file, never an environment variable, so that it
            // shows in no process listing or crash dump.
            volumes.push(Volume {
                name: SIGNING_VOLUME.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(signing.private_key_secret_ref.name.clone()),
                    items: Some(vec![KeyToPath {
                        key: signing.private_key_secret_ref.key.clone(),
                        path: "key.pem".into(),
                        ..Default::default()
                    }]),
                    default_mode: Some(SECRET_FILE_MODE),
                    ..Default::default()
                }),
                ..Default::default()
            });
            mounts.push(mount(SIGNING_VOLUME, SIGNING_PATH, true));
        }
    }
    let container = Container {
        name: artifact.container.into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(env_vars),
        volume_mounts: Some(mounts),
        security_context: Some(locked_down()),
        ..Default::default()
    };
    (container, volumes)
}

/// The CRD's signing mode as the signer names it.
pub(crate) fn signing_mode(mode: SigningMode) -> cloudfront::Mode {
    match mode {
        SigningMode::SignedUrl => cloudfront::Mode::SignedUrl,
        SigningMode::SignedCookies => cloudfront::Mode::SignedCookies,
    }
}

/// The CRD's signing policy as the signer names it.
pub(crate) fn signing_policy(policy: SigningPolicy) -> cloudfront::Policy {
    match policy {
        SigningPolicy::Canned => cloudfront::Policy::Canned,
        SigningPolicy::Custom => cloudfront::Policy::Custom,
    }
}
