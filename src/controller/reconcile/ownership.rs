//! Whether an object of the name the controller would use is its own: an
//! object someone else made is never taken over (server-side apply with
//! `force` would change it, and the owner reference would have it deleted
//! with the ModelCache).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::ReconcileError;
use crate::controller::builders::{MANAGED_BY, MODELCACHE_LABEL};
use crate::controller::validate::{Invalid, OBJECT_NOT_OURS};

/// Whether an object's labels say that this controller made it for the
/// ModelCache `owner`.
pub fn is_ours(meta: &ObjectMeta, owner: &str) -> bool {
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label(MANAGED_BY) == Some("modelcache") && label(MODELCACHE_LABEL) == Some(owner)
}

/// An object of the same name that someone else made: taking it over would
/// change it, and deleting the ModelCache would then delete it.
pub fn not_ours(kind: &str, namespace: &str, name: &str, owner: &str) -> ReconcileError {
    ReconcileError::Invalid(Invalid {
        reason: OBJECT_NOT_OURS,
        message: format!(
            "{kind} {namespace}/{name} exists and was not made by modelcache for ModelCache \
             {owner:?} (it lacks the labels {MANAGED_BY}=modelcache and \
             {MODELCACHE_LABEL}={owner}), so the controller does not take it over: delete or \
             rename it, or give the ModelCache another name"
        ),
    })
}
