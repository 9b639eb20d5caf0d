//! Who may open a connection to a provisioned Redis: its NetworkPolicy.
//!
//! The password keeps other callers from using the Redis; the policy keeps
//! them from reaching it at all (another tenant's namespace, a compromised
//! pod elsewhere probing for an unauthenticated or weak Redis). It admits,
//! on the Redis port only:
//! - pods of the ModelCache's namespace that carry [`CLIENT_LABEL`] with its
//!   name (the webhook adds it to every pod it injects; other client pods
//!   carry it by hand);
//! - pods of the ModelCache's workload (its `workload.selector`, or the
//!   selector of the Deployment or StatefulSet it names), in that namespace;
//! - the controller's pods, in the controller's namespace.
//!
//! It has no effect on a cluster whose network plugin does not enforce
//! NetworkPolicies.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::controller::builders::{self, REDIS_PORT};
use crate::crd::ModelCache;

/// The pod label that names the ModelCache whose Redis a pod may reach.
pub const CLIENT_LABEL: &str = "modelcache.dev/client";

/// The labels of the controller's pods (the chart's selector labels).
pub fn controller_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "modelcache".into()),
        ("app.kubernetes.io/component".into(), "controller".into()),
    ])
}

/// The NetworkPolicy `<name>-redis`. `workload` selects the workload's pods;
/// `controller_namespace` is where the controller runs (`None`, a controller
/// outside the cluster, admits the controller's labels in any namespace).
pub fn redis_network_policy(
    mc: &ModelCache,
    workload: Option<&LabelSelector>,
    controller_namespace: Option<&str>,
) -> NetworkPolicy {
    let pods = |labels: BTreeMap<String, String>| LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    };
    let mut from = vec![NetworkPolicyPeer {
        pod_selector: Some(pods(BTreeMap::from([(CLIENT_LABEL.into(), mc.name_any())]))),
        ..Default::default()
    }];
    if let Some(selector) = workload {
        from.push(NetworkPolicyPeer {
            pod_selector: Some(selector.clone()),
            ..Default::default()
        });
    }
    let namespace = controller_namespace
        .map(|ns| BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), ns.to_owned())]));
    from.push(NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: namespace,
            ..Default::default()
        }),
        pod_selector: Some(pods(controller_labels())),
        ..Default::default()
    });
    NetworkPolicy {
        metadata: builders::meta(mc, &builders::names(mc).redis),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pods(builders::selector_labels(mc))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(REDIS_PORT)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
            ..Default::default()
        }),
    }
}
