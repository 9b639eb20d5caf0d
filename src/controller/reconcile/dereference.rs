//! The dereference stage of a reconcile: reads what a ModelCache names (its
//! CachePolicy, the Secret that holds its Redis password, its workload's
//! pods), so that the stages after it are pure. Nothing here decides whether
//! the spec is valid; a missing object is reported for validation to judge.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{NodeSelector, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::crd::cache_policy::CachePolicySpec;
use crate::crd::model_cache::{WorkloadKind, WorkloadRef};
use crate::crd::{CachePolicy, ModelCache};

use super::{MANAGER, ReconcileError, kube_error};
use crate::controller::builders::{self, ADMIN_PASSWORD_KEY, PASSWORD_KEY};
use crate::controller::validate::{Invalid, RedisBackend};
use crate::keyspace::acl::ADMIN_USER;

/// The referenced CachePolicy's spec: `Ok(None)` when the ModelCache names
/// none (the defaults apply), `Err(name)` when the named one does not exist.
pub type PolicyRef = Result<Option<CachePolicySpec>, String>;

/// Reads the CachePolicy that the ModelCache names.
pub async fn policy(client: &Client, mc: &ModelCache) -> Result<PolicyRef, ReconcileError> {
    let Some(r) = &mc.spec.cache_policy_ref else {
        return Ok(Ok(None));
    };
    let namespace = namespace(mc);
    let found = Api::<CachePolicy>::namespaced(client.clone(), &namespace)
        .get_opt(&r.name)
        .await
        .map_err(kube_error("read", "CachePolicy", &namespace, &r.name))?;
    Ok(found.map(|p| Some(p.spec)).ok_or_else(|| r.name.clone()))
}

/// The password that reaches the ModelCache's Redis, and where it came from.
pub enum Credentials {
    /// The generated Secret of a provisioned Redis; its uid rolls the Redis
    /// pod when the Secret is recreated.
    Generated {
        /// The controller's user, [`crate::keyspace::acl::ADMIN_USER`]; `None`
        /// for a Secret made before the ACL users, whose `default` user may
        /// do everything.
        username: Option<String>,
        /// That user's password.
        password: String,
        /// The Secret's uid, which the Redis pod template carries.
        secret_uid: String,
    },
    /// The Secret an external Redis's spec names, if any.
    External(Option<String>),
}

impl Credentials {
    /// The user name, for the client that talks to Redis (`None`: `default`).
    pub fn username(&self) -> Option<&str> {
        match self {
            Credentials::Generated { username, .. } => username.as_deref(),
            Credentials::External(_) => None,
        }
    }

    /// The password, for the client that talks to Redis.
    pub fn password(&self) -> Option<&str> {
        match self {
            Credentials::Generated { password, .. } => Some(password),
            Credentials::External(p) => p.as_deref(),
        }
    }
}

/// Reads (or, for a provisioned Redis, creates once) the password Secret.
/// It runs after validation because the validated backend says which
/// Secret to read, and an invalid spec must create nothing.
pub async fn credentials(
    client: &Client,
    mc: &ModelCache,
    backend: &RedisBackend,
) -> Result<Credentials, ReconcileError> {
    let namespace = namespace(mc);
    let RedisBackend::External { redis, .. } = backend else {
        return generated_secret(client, mc, &namespace).await;
    };
    let Some(r) = &redis.password_secret_ref else {
        return Ok(Credentials::External(None));
    };
    let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
        .get_opt(&r.name)
        .await
        .map_err(kube_error("read", "Secret", &namespace, &r.name))?;
    let Some(secret) = secret else {
        return Err(secret_not_found(&namespace, &r.name, &r.key));
    };
    let allowed = secret
        .annotations()
        .get(ALLOWED_MODELCACHES)
        .is_some_and(|list| allows(list, &mc.name_any()));
    if !allowed {
        return Err(ReconcileError::Invalid(Invalid {
            reason: "SecretNotAllowed",
            message: format!(
                "Secret {:?} does not allow ModelCache {:?} to use it: the controller would send \
                 its value to spec.redis.external.url, so the Secret's owner must consent with \
                 the annotation {ALLOWED_MODELCACHES}={:?} (a comma-separated list of \
                 ModelCaches, or *)",
                r.name,
                mc.name_any(),
                mc.name_any()
            ),
        }));
    }
    let password = secret
        .data
        .and_then(|d| d.get(&r.key).cloned())
        .and_then(|b| String::from_utf8(b.0).ok());
    match password {
        Some(password) => Ok(Credentials::External(Some(password))),
        None => Err(secret_not_found(&namespace, &r.name, &r.key)),
    }
}

/// The annotation by which a Secret's owner lets ModelCaches of its
/// namespace use it as an external Redis's password: the controller may read
/// every Secret, and the ModelCache's author may not.
pub const ALLOWED_MODELCACHES: &str = "modelcache.dev/allowed-modelcaches";

/// Whether the annotation's list (`a, b` or `*`) names `name`.
fn allows(list: &str, name: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|n| n == "*" || n == name)
}

fn secret_not_found(namespace: &str, name: &str, key: &str) -> ReconcileError {
    ReconcileError::Invalid(Invalid {
        reason: "SecretNotFound",
        message: format!(
            "Secret {name:?} with key {key:?} does not exist in namespace {namespace}: \
             create it, or fix spec.redis.external.passwordSecretRef"
        ),
    })
}

/// Reads the generated Secret, or creates it once with a new password. It is
/// never applied again, so the password is never rotated by accident.
async fn generated_secret(
    client: &Client,
    mc: &ModelCache,
    namespace: &str,
) -> Result<Credentials, ReconcileError> {
    let name = builders::names(mc).redis;
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(kube_error("read", "Secret", namespace, &name))?;
    let secret = match existing {
        Some(s) if !super::ownership::is_ours(&s.metadata, &mc.name_any()) => {
            return Err(super::ownership::not_ours(
                "Secret",
                namespace,
                &name,
                &mc.name_any(),
            ));
        }
        Some(s) => s,
        None => {
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            let new = builders::secret(mc, &generate_password()?, &generate_password()?);
            match api.create(&params, &new).await {
                Ok(s) => s,
                // Another reconcile created it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => api
                    .get(&name)
                    .await
                    .map_err(kube_error("read", "Secret", namespace, &name))?,
                Err(e) => return Err(kube_error("create", "Secret", namespace, &name)(e)),
            }
        }
    };
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    // A Secret from before the ACL users has only the all-powerful `default`
    // password; it keeps working until it is deleted (docs/controller.md).
    let admin = value(ADMIN_PASSWORD_KEY).map(|p| (Some(ADMIN_USER.to_owned()), p));
    match admin.or_else(|| value(PASSWORD_KEY).map(|p| (None, p))) {
        Some((username, password)) => Ok(Credentials::Generated {
            username,
            password,
            secret_uid: secret.uid().unwrap_or_default(),
        }),
        None => Err(ReconcileError::Invalid(Invalid {
            reason: "SecretInvalid",
            message: format!(
                "Secret {name:?} has no {PASSWORD_KEY:?} key: delete it, and the controller \
                 creates a new one (the Redis pod restarts with the new password)"
            ),
        })),
    }
}

/// Creates the gateway's Secret once, with a new secret; an existing one is
/// left as it is (a new secret would give every caller a new scope, and
/// their entries would be lost to them), and refused unless it is ours.
pub async fn gateway_secret(client: &Client, mc: &ModelCache) -> Result<(), ReconcileError> {
    let namespace = namespace(mc);
    let name = crate::controller::gateway::name(mc);
    let api = Api::<Secret>::namespaced(client.clone(), &namespace);
    match api
        .get_opt(&name)
        .await
        .map_err(kube_error("read", "Secret", &namespace, &name))?
    {
        Some(s) if !super::ownership::is_ours(&s.metadata, &mc.name_any()) => Err(
            super::ownership::not_ours("Secret", &namespace, &name, &mc.name_any()),
        ),
        Some(_) => Ok(()),
        None => {
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            let new = crate::controller::gateway::secret(mc, &generate_password()?);
            match api.create(&params, &new).await {
                // Another reconcile created it first: theirs stands.
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(kube_error("create", "Secret", &namespace, &name)(e)),
            }
        }
    }
}

/// 24 random bytes as hex.
pub(super) fn generate_password() -> Result<String, ReconcileError> {
    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| ReconcileError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Pods of each version, and the ready ones among them (the others are
/// still fetching weights or warming, or failing).
#[derive(Debug, Default)]
pub struct PodsByVersion {
    /// Running or pending pods per version.
    pub pods: BTreeMap<String, i32>,
    /// The ready ones among them.
    pub ready: BTreeMap<String, i32>,
}

/// Counts the workload's pods by the version they serve. A named workload
/// that does not exist is an invalid spec: until it exists no version is
/// retired.
pub async fn pods_by_version(
    client: &Client,
    namespace: &str,
    workload: &WorkloadRef,
) -> Result<PodsByVersion, ReconcileError> {
    let selector = match (&workload.name, &workload.selector) {
        (Some(name), _) => workload_selector(client, namespace, workload, name).await?,
        (None, Some(selector)) => selector.clone(),
        (None, None) => return Ok(PodsByVersion::default()),
    };
    let selector = label_selector(&selector);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_error("list", "Pods", namespace, &selector))?;
    let mut versions = PodsByVersion::default();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let label = &workload.version_label;
        let version = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(label))
            .or_else(|| pod.metadata.annotations.as_ref().and_then(|a| a.get(label)));
        if let Some(v) = version {
            *versions.pods.entry(v.clone()).or_insert(0) += 1;
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            *versions.ready.entry(v.clone()).or_insert(0) += i32::from(ready);
        }
    }
    Ok(versions)
}

/// The pod selector of the named Deployment or StatefulSet.
async fn workload_selector(
    client: &Client,
    namespace: &str,
    workload: &WorkloadRef,
    name: &str,
) -> Result<LabelSelector, ReconcileError> {
    let kind = workload.kind.unwrap_or_default();
    let selector = read_workload_selector(client, namespace, workload, name).await?;
    selector.ok_or_else(|| {
        ReconcileError::Invalid(Invalid {
            reason: "WorkloadNotFound",
            message: format!(
                "{kind:?} {name:?} does not exist in namespace {namespace}: create it, or fix \
                 spec.workload; until then no version is retired"
            ),
        })
    })
}

/// The selector of the pods that serve the ModelCache's model, for the
/// Redis's NetworkPolicy: `spec.workload.selector`, or the named workload's
/// (`None` while it does not exist: its pods are then admitted once it does,
/// at the next reconcile).
pub async fn client_selector(
    client: &Client,
    mc: &ModelCache,
) -> Result<Option<LabelSelector>, ReconcileError> {
    let Some(workload) = &mc.spec.workload else {
        return Ok(None);
    };
    match (&workload.name, &workload.selector) {
        (Some(name), _) => read_workload_selector(client, &namespace(mc), workload, name).await,
        (None, selector) => Ok(selector.clone()),
    }
}

async fn read_workload_selector(
    client: &Client,
    namespace: &str,
    workload: &WorkloadRef,
    name: &str,
) -> Result<Option<LabelSelector>, ReconcileError> {
    let kind = workload.kind.unwrap_or_default();
    Ok(match kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(kube_error("read", "Deployment", namespace, name))?
            .map(|d| d.spec.selector),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(kube_error("read", "StatefulSet", namespace, name))?
            .map(|s| s.spec.selector),
    })
}

/// Where a named workload's pods may run: its pod template's nodeSelector
/// and required node affinity (empty without a named workload, or when it
/// does not exist yet).
pub async fn placement(
    client: &Client,
    mc: &ModelCache,
) -> Result<(BTreeMap<String, String>, Option<NodeSelector>), ReconcileError> {
    let Some(workload) = &mc.spec.workload else {
        return Ok(Default::default());
    };
    let Some(name) = &workload.name else {
        return Ok(Default::default());
    };
    let namespace = namespace(mc);
    let template = match workload.kind.unwrap_or_default() {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client.clone(), &namespace)
            .get_opt(name)
            .await
            .map_err(kube_error("read", "Deployment", &namespace, name))?
            .map(|d| d.spec.template),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), &namespace)
            .get_opt(name)
            .await
            .map_err(kube_error("read", "StatefulSet", &namespace, name))?
            .map(|s| s.spec.template),
    };
    let Some(spec) = template.and_then(|t| t.spec) else {
        return Ok(Default::default());
    };
    let affinity = spec
        .affinity
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.required_during_scheduling_ignored_during_execution);
    Ok((spec.node_selector.unwrap_or_default(), affinity))
}

/// A label selector in the API's query syntax.
pub fn label_selector(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

/// The ModelCache's namespace (`default` for an object never stored).
pub fn namespace(mc: &ModelCache) -> String {
    mc.namespace().unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_lists_modelcaches_or_allows_all() {
        assert!(allows("chat", "chat"));
        assert!(allows("other, chat ", "chat"));
        assert!(allows("*", "chat"));
        assert!(!allows("chatbot,other", "chat"));
        assert!(!allows("", "chat"));
    }

    #[test]
    fn passwords_are_random_hex() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 48);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
