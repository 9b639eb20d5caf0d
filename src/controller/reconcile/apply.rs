//! The apply and status stages of a reconcile: every write the controller
//! makes to the API server goes through server-side apply here, under one
//! field manager.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{self, ModelCache};

use super::desired::DesiredResources;
use super::ownership::{is_ours, not_ours};
use super::{MANAGER, ReconcileError, kube_error};
use crate::controller::status::{self, Observation};

/// Applies the desired objects: warm-up prompts first (pods mount them), then
/// the Redis's config, pod and Service.
pub async fn apply_all(
    client: &Client,
    mc: &ModelCache,
    desired: &DesiredResources,
) -> Result<(), ReconcileError> {
    let namespace = &super::dereference::namespace(mc);
    let owner = &mc.name_any();
    if let Some(prompts) = &desired.warmup {
        apply(client, namespace, owner, prompts, "ConfigMap").await?;
    }
    if let Some(redis) = &desired.redis {
        apply(client, namespace, owner, &redis.config_map, "ConfigMap").await?;
        apply(client, namespace, owner, &redis.stateful_set, "StatefulSet").await?;
        apply(client, namespace, owner, &redis.service, "Service").await?;
    }
    Ok(())
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
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(kube_error("read", kind, namespace, &name))?;
    if existing.is_some_and(|e| !is_ours(e.meta(), owner)) {
        return Err(not_ours(kind, namespace, &name, owner));
    }
    api.patch(
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
