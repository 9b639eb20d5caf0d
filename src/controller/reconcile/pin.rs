//! Pinning each live version's manifest: its digest, read from the origin
//! once by the controller (with the ModelCache's own source settings, the
//! keys of its credentials Secret, its CDN headers and signing key) and kept
//! in `status.versions[].manifestDigest`. The webhook gives it to injected
//! fetches, which then refuse any other manifest, from a node agent or from
//! the origin: a compromised node can deny service, not change the weights.
//!
//! Reads run in the background, one per version, and a failed one is tried
//! again after [`RETRY_AFTER`], not on every reconcile of a rollout.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::artifact::cloudfront::{self, Signer};
use crate::artifact::fetch::{self, FetchError, FetchOptions};
use crate::artifact::source::{Location, S3Credentials, SourceConfig};
use crate::controller::fetch::{signing_mode, signing_policy};
use crate::controller::rollout::RolloutPlan;
use crate::crd::ModelCache;
use crate::crd::model_cache::VersionPhase;
use crate::error::chain as error_chain;

/// A failed read waits this long before the next.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Attempts and time per read: a manifest is small.
const ATTEMPTS: u32 = 3;
const DEADLINE: Duration = Duration::from_secs(30);

/// Why a version's manifest could not be read.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum PinError {
    #[error("failed to read Secret {name:?} in namespace {namespace}")]
    Secret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name:?} in namespace {namespace} has no key {key:?}")]
    MissingKey {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("failed to use the CloudFront key of Secret {name:?}")]
    Signing {
        name: String,
        #[source]
        source: cloudfront::CloudFrontError,
    },
    #[error("spec.source.uri {uri:?} is not a source")]
    Location { uri: String },
    #[error("failed to read the manifest of version {version:?}")]
    Read {
        version: String,
        #[source]
        source: Box<FetchError>,
    },
}

type Read = JoinHandle<Result<String, PinError>>;

/// The reads of every ModelCache, by `namespace/name/version`.
#[derive(Default)]
pub struct Pins {
    running: Mutex<HashMap<String, Read>>,
    failed: Mutex<HashMap<String, Instant>>,
}

impl Pins {
    /// Gives each live version of `plan` its digest once read, and starts
    /// the reads still missing.
    pub fn pin(&self, client: &Client, mc: &ModelCache, prefix: &str, plan: &mut RolloutPlan) {
        let mut running = self.running.lock();
        let mut failed = self.failed.lock();
        for v in plan.versions.iter_mut() {
            if v.phase != VersionPhase::Live || v.manifest_digest.is_some() {
                continue;
            }
            let key = format!("{prefix}{}", v.version);
            match running.get(&key) {
                Some(task) if task.is_finished() => {
                    let Some(task) = running.remove(&key) else {
                        continue;
                    };
                    match futures::FutureExt::now_or_never(task) {
                        Some(Ok(Ok(digest))) => v.manifest_digest = Some(digest),
                        Some(Ok(Err(e))) => {
                            tracing::warn!(version = %v.version, error = %error_chain(&e),
                                "failed to pin the version's manifest; injected fetches read it from the origin");
                            failed.insert(key, Instant::now());
                        }
                        _ => {
                            failed.insert(key, Instant::now());
                        }
                    }
                }
                Some(_) => {}
                None if failed
                    .get(&key)
                    .is_some_and(|at| at.elapsed() < RETRY_AFTER) => {}
                None => {
                    failed.remove(&key);
                    let read = read(client.clone(), mc.clone(), v.version.clone());
                    running.insert(key, tokio::spawn(read));
                }
            }
        }
        // Reads of this cache's versions that are no longer live are of no use.
        let live: Vec<String> = plan
            .versions
            .iter()
            .filter(|v| v.phase == VersionPhase::Live)
            .map(|v| format!("{prefix}{}", v.version))
            .collect();
        running.retain(|k, task| {
            let keep = !k.starts_with(prefix) || live.contains(k);
            if !keep {
                task.abort();
            }
            keep
        });
        failed.retain(|k, _| !k.starts_with(prefix) || live.contains(k));
    }
}

/// The digest of `version`'s manifest at the ModelCache's source.
async fn read(client: Client, mc: ModelCache, version: String) -> Result<String, PinError> {
    let uri = &mc.spec.source.uri;
    let location: Location = uri
        .parse()
        .map_err(|_| PinError::Location { uri: uri.clone() })?;
    // Nothing is written: the destination is never opened.
    let mut opts = FetchOptions::new(
        location,
        &mc.spec.model,
        &version,
        std::path::Path::new("/nonexistent"),
    );
    opts.source = source_config(&client, &mc).await?;
    opts.max_attempts = ATTEMPTS;
    opts.deadline = DEADLINE;
    fetch::manifest_digest(&opts)
        .await
        .map_err(|source| PinError::Read {
            version,
            source: Box::new(source),
        })
}

/// What a fetch container of this ModelCache is given, read from its
/// Secrets instead of mounted files.
async fn source_config(client: &Client, mc: &ModelCache) -> Result<SourceConfig, PinError> {
    let namespace = mc.namespace().unwrap_or_default();
    let source = &mc.spec.source;
    let mut cfg = SourceConfig {
        endpoint: source.endpoint.clone(),
        region: source.region.clone(),
        path_style: source.path_style,
        ..Default::default()
    };
    if let Some(secret) = &source.credentials_secret_ref {
        let data = secret_data(client, &namespace, &secret.name).await?;
        let key = |k: &str| {
            data.get(k).cloned().ok_or_else(|| PinError::MissingKey {
                namespace: namespace.clone(),
                name: secret.name.clone(),
                key: k.into(),
            })
        };
        cfg.credentials = Some(S3Credentials {
            access_key_id: key("AWS_ACCESS_KEY_ID")?,
            secret_access_key: key("AWS_SECRET_ACCESS_KEY")?,
            session_token: data.get("AWS_SESSION_TOKEN").cloned(),
        });
    }
    let Some(cdn) = &source.cdn else {
        return Ok(cfg);
    };
    cfg.headers = cdn
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(secret) = &cdn.headers_secret_ref {
        let data = secret_data(client, &namespace, &secret.name).await?;
        cfg.headers
            .extend(data.into_iter().map(|(k, v)| (k, v.trim().to_string())));
    }
    if let Some(signing) = &cdn.signing {
        let r = &signing.private_key_secret_ref;
        let data = secret_data(client, &namespace, &r.name).await?;
        let pem = data.get(&r.key).ok_or_else(|| PinError::MissingKey {
            namespace: namespace.clone(),
            name: r.name.clone(),
            key: r.key.clone(),
        })?;
        let signer = Signer::from_pem(
            pem,
            &signing.key_pair_id,
            signing_mode(signing.mode),
            signing_policy(signing.policy),
            Duration::from_secs(u64::try_from(signing.expires_seconds).unwrap_or(3600)),
        )
        .map_err(|source| PinError::Signing {
            name: r.name.clone(),
            source,
        })?;
        cfg.signer = Some(std::sync::Arc::new(signer));
    }
    Ok(cfg)
}

/// A Secret's values as text; values that are not UTF-8 are left out.
async fn secret_data(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, PinError> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| PinError::Secret {
            namespace: namespace.into(),
            name: name.into(),
            source,
        })?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| String::from_utf8(v.0).ok().map(|v| (k, v)))
        .collect())
}
