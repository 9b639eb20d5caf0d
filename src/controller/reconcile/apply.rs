//! The apply and status stages of a reconcile: every write the controller
//! makes to the API server goes through server-side apply here, under one
//! field manager.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::controller::builders;
use crate::crd::{self, ModelCache};

use super::desired::DesiredResources;
use super::ownership::{is_ours, not_ours};
use super::{MANAGER, ReconcileError, kube_error};
use crate::controller::status::{self, Observation};

/// Applies the desired objects: warm-up prompts and CDN headers first (pods
/// mount them), then the Redis's config, pod, Services and NetworkPolicy,
/// then the gateway's. Returns the standalone gateway's ready replicas.
pub async fn apply_all(
    client: &Client,
    mc: &ModelCache,
    desired: &DesiredResources,
) -> Result<Option<i32>, ReconcileError> {
    let namespace = &super::dereference::namespace(mc);
    let owner = &mc.name_any();
    for mounted in [&desired.warmup, &desired.cdn_headers]
        .into_iter()
        .flatten()
    {
        apply(client, namespace, owner, mounted, "ConfigMap").await?;
    }
    if let Some(redis) = &desired.redis {
        apply(client, namespace, owner, &redis.config_map, "ConfigMap").await?;
        apply(client, namespace, owner, &redis.headless, "Service").await?;
        apply_stateful_set(client, namespace, owner, &redis.stateful_set).await?;
        apply(client, namespace, owner, &redis.service, "Service").await?;
        apply(
            client,
            namespace,
            owner,
            &redis.network_policy,
            "NetworkPolicy",
        )
        .await?;
    }
    let Some(gateway) = &desired.gateway else {
        return Ok(None);
    };
    apply(client, namespace, owner, &gateway.config_map, "ConfigMap").await?;
    let Some((deployment, service)) = &gateway.standalone else {
        return Ok(None);
    };
    let applied = apply(client, namespace, owner, deployment, "Deployment").await?;
    apply(client, namespace, owner, service, "Service").await?;
    Ok(Some(
        applied.status.and_then(|s| s.ready_replicas).unwrap_or(0),
    ))
}

/// Applies the Redis StatefulSet, or, when a field that cannot change in
/// place differs (see [`builders::must_recreate`]), deletes it with
/// `propagationPolicy: Orphan` instead: its pod keeps running, with its keys,
/// and the StatefulSet created on the next reconcile (its deletion is watched)
/// adopts it; the pod template is unchanged, so the pod is not replaced.
async fn apply_stateful_set(
    client: &Client,
    namespace: &str,
    owner: &str,
    desired: &StatefulSet,
) -> Result<(), ReconcileError> {
    let kind = "StatefulSet";
    let name = desired.metadata.name.clone().unwrap_or_default();
    let existing = read_ours::<StatefulSet>(client, namespace, owner, &name, kind).await?;
    match existing {
        Some(e) if builders::must_recreate(&e, desired) => {
            if e.metadata.deletion_timestamp.is_some() {
                return Ok(());
            }
            tracing::info!(
                statefulset = %format!("{namespace}/{name}"),
                "deleting the Redis StatefulSet, leaving its pod, to create it with a new \
                 serviceName"
            );
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: e.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::orphan()
            };
            Api::<StatefulSet>::namespaced(client.clone(), namespace)
                .delete(&name, &params)
                .await
                .map_err(kube_error("delete", kind, namespace, &name))?;
            Ok(())
        }
        _ => apply_unchecked(client, namespace, desired, kind)
            .await
            .map(drop),
    }
}

/// Server-side apply with the controller's field manager, to an object that
/// is absent or ours. `force` takes over fields another manager set by hand
/// on our objects (drift is undone); someone else's object is refused.
async fn apply<K>(
    client: &Client,
    namespace: &str,
    owner: &str,
    obj: &K,
    kind: &'static str,
) -> Result<K, ReconcileError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    read_ours::<K>(client, namespace, owner, &name, kind).await?;
    apply_unchecked(client, namespace, obj, kind).await
}

/// The object of that name, when there is one and it is ours; an error when
/// it is someone else's.
async fn read_ours<K>(
    client: &Client,
    namespace: &str,
    owner: &str,
    name: &str,
    kind: &'static str,
) -> Result<Option<K>, ReconcileError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + DeserializeOwned,
    K::DynamicType: Default,
{
    let existing = Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(kube_error("read", kind, namespace, name))?;
    match existing {
        Some(e) if !is_ours(e.meta(), owner) => Err(not_ours(kind, namespace, name, owner)),
        existing => Ok(existing),
    }
}

/// Server-side apply of an object already known to be absent or ours.
async fn apply_unchecked<K>(
    client: &Client,
    namespace: &str,
    obj: &K,
    kind: &'static str,
) -> Result<K, ReconcileError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(kube_error("apply", kind, namespace, &name))
}

/// Writes the status built from what this reconcile observed, and returns it.
pub async fn write_status(
    client: &Client,
    mc: &ModelCache,
    obs: &Observation,
) -> Result<crd::ModelCacheStatus, ReconcileError> {
    let namespace = super::dereference::namespace(mc);
    let name = mc.name_any();
    let now = Time(Timestamp::now());
    let new_status =
        status::model_cache_status(mc.status.as_ref(), mc.metadata.generation, obs, now);
    let patch = serde_json::json!({
        "apiVersion": crd::API_VERSION,
        "kind": "ModelCache",
        "status": new_status,
    });
    Api::<ModelCache>::namespaced(client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_error(
            "write status of",
            "ModelCache",
            &namespace,
            &name,
        ))?;
    Ok(new_status)
}
