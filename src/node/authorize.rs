//! Who may read a model from the node agent: a pod on this node, injected
//! for a ModelCache whose source holds the model, proven by its projected
//! service-account token (audience `modelcache-node`) through a TokenReview.
//!
//! The decision is a pure function of what the API server returned
//! ([`claim`], [`admit`]); [`Authorizer`] fetches those objects and keeps
//! each decision for a short while, because a fetch sends many requests
//! with one token.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use parking_lot::Mutex;

use crate::crd::ModelCache;
use crate::crd::model_cache::ArtifactSource;
pub use crate::crd::model_cache::INJECT_ANNOTATION;

/// The audience the pods' tokens must be issued for.
pub const AUDIENCE: &str = "modelcache-node";

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How long an admission is kept: a token is valid for much longer, and the
/// pod's node and annotation do not change while it runs.
const ADMITTED_FOR: Duration = Duration::from_secs(60);

/// A refusal is kept briefly, so that a pod being set up is not locked out.
const REFUSED_FOR: Duration = Duration::from_secs(5);

/// Decisions kept at most (one per pod and model on a node, in practice).
const MAX_DECISIONS: usize = 4096;

/// Why a request is refused. Each reason is a bounded metric label.
/// Each variant is documented by its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)]
pub enum Refusal {
    #[error(
        "no bearer token: send the pod's projected service-account token (audience {AUDIENCE})"
    )]
    NoToken,
    #[error("the token is not valid for audience {AUDIENCE}")]
    Unauthenticated,
    #[error("the token is not bound to a pod: use a projected service-account token")]
    NotAPod,
    #[error("pod {namespace}/{name} does not exist (or was replaced)")]
    PodGone { namespace: String, name: String },
    #[error("pod {namespace}/{name} runs on another node; ask the agent of its own node")]
    OtherNode { namespace: String, name: String },
    #[error("pod {namespace}/{name} has no {INJECT_ANNOTATION} annotation")]
    NotInjected { namespace: String, name: String },
    #[error("ModelCache {namespace}/{name} does not exist")]
    NoModelCache { namespace: String, name: String },
    #[error("ModelCache {namespace}/{name} does not name source {source_uri} and model {model}")]
    OtherModel {
        namespace: String,
        name: String,
        source_uri: String,
        model: String,
    },
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::NotAPod => "not_a_pod",
            Refusal::PodGone { .. } => "pod_gone",
            Refusal::OtherNode { .. } => "other_node",
            Refusal::NotInjected { .. } => "not_injected",
            Refusal::NoModelCache { .. } => "no_model_cache",
            Refusal::OtherModel { .. } => "other_model",
        }
    }

    /// 401 without valid credentials, 403 with credentials that may not read.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::NoToken | Refusal::Unauthenticated => 401,
            _ => 403,
        }
    }
}

/// Why the agent could not decide (the API server failed): temporary.
#[derive(Debug, thiserror::Error)]
#[error("failed to {what} through the API server")]
pub struct ReviewError {
    /// What was asked.
    pub what: &'static str,
    #[source]
    source: kube::Error,
}

/// The pod a token proves, from the TokenReview's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid: a new pod of the same name is another pod.
    pub uid: String,
}

/// The pod a reviewed token is bound to, if the review authenticated it
/// for [`AUDIENCE`].
pub fn claim(status: &TokenReviewStatus) -> Result<Claim, Refusal> {
    let audience_ok = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == AUDIENCE));
    if status.authenticated != Some(true) || !audience_ok {
        return Err(Refusal::Unauthenticated);
    }
    let user = status.user.as_ref().ok_or(Refusal::Unauthenticated)?;
    let namespace = user
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix("system:serviceaccount:"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(ns, _)| ns.to_owned())
        .ok_or(Refusal::NotAPod)?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .cloned()
            .ok_or(Refusal::NotAPod)
    };
    Ok(Claim {
        namespace,
        pod: extra(POD_NAME)?,
        uid: extra(POD_UID)?,
    })
}

/// The ModelCache a claimed pod is injected for, if the pod is the one the
/// token names and runs on `node`.
pub fn injected_for(claim: &Claim, pod: Option<&Pod>, node: &str) -> Result<String, Refusal> {
    let gone = || Refusal::PodGone {
        namespace: claim.namespace.clone(),
        name: claim.pod.clone(),
    };
    let pod = pod.ok_or_else(gone)?;
    if pod.metadata.uid.as_deref() != Some(claim.uid.as_str()) {
        return Err(gone());
    }
    let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if on != Some(node) {
        return Err(Refusal::OtherNode {
            namespace: claim.namespace.clone(),
            name: claim.pod.clone(),
        });
    }
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .filter(|name| !name.is_empty())
        .cloned()
        .ok_or_else(|| Refusal::NotInjected {
            namespace: claim.namespace.clone(),
            name: claim.pod.clone(),
        })
}

/// The ModelCache's source settings, if its source is `source_uri` and it
/// names `model` (the served model, or its gateway's embedding model).
pub fn admit(
    claim: &Claim,
    name: &str,
    model_cache: Option<&ModelCache>,
    source_uri: &str,
    model: &str,
) -> Result<ArtifactSource, Refusal> {
    let mc = model_cache.ok_or_else(|| Refusal::NoModelCache {
        namespace: claim.namespace.clone(),
        name: name.into(),
    })?;
    let spec = &mc.spec;
    let embedding = spec
        .gateway
        .as_ref()
        .and_then(|g| g.semantic.as_ref())
        .map(|s| s.embedding_model.name.as_str());
    let names_model = spec.model == model || embedding == Some(model);
    if !names_model || !same_source(&spec.source.uri, source_uri) {
        return Err(Refusal::OtherModel {
            namespace: claim.namespace.clone(),
            name: name.into(),
            source_uri: source_uri.into(),
            model: model.into(),
        });
    }
    Ok(spec.source.clone())
}

/// Two source URIs name one location (trailing slashes aside).
fn same_source(a: &str, b: &str) -> bool {
    use crate::artifact::source::Location;
    match (a.parse::<Location>(), b.parse::<Location>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// What the agent decided for a token, source and model: the source's
/// settings and the pod, or why not.
pub type Decision = Result<(ArtifactSource, Claim), Refusal>;

/// Asks the API server, and keeps the answers briefly.
pub struct Authorizer {
    client: kube::Client,
    node: String,
    decisions: Mutex<HashMap<String, (Instant, Decision)>>,
}

impl Authorizer {
    /// An authorizer for the agent of `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        Authorizer {
            client,
            node: node.into(),
            decisions: Mutex::new(HashMap::new()),
        }
    }

    /// May the bearer of `token` read `model` from `source_uri`?
    pub async fn decide(
        &self,
        token: &str,
        source_uri: &str,
        model: &str,
    ) -> Result<Decision, ReviewError> {
        // The key is a digest: the tokens themselves are not kept.
        let key = crate::digest::sha256_hex(format!("{token}\n{source_uri}\n{model}").as_bytes());
        if let Some((at, decision)) = self.decisions.lock().get(&key)
            && at.elapsed()
                < if decision.is_ok() {
                    ADMITTED_FOR
                } else {
                    REFUSED_FOR
                }
        {
            return Ok(decision.clone());
        }
        let decision = self.ask(token, source_uri, model).await?;
        let mut decisions = self.decisions.lock();
        if decisions.len() >= MAX_DECISIONS {
            decisions.retain(|_, (at, _)| at.elapsed() < ADMITTED_FOR);
            if decisions.len() >= MAX_DECISIONS {
                decisions.clear();
            }
        }
        decisions.insert(key, (Instant::now(), decision.clone()));
        Ok(decision)
    }

    async fn ask(
        &self,
        token: &str,
        source_uri: &str,
        model: &str,
    ) -> Result<Decision, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.into(),
                audiences: Some(vec![AUDIENCE.into()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| ReviewError {
                what: "review the token",
                source,
            })?;
        let claim = match claim(&reviewed.status.unwrap_or_default()) {
            Ok(c) => c,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), &claim.namespace)
            .get_opt(&claim.pod)
            .await
            .map_err(|source| ReviewError {
                what: "read the pod",
                source,
            })?;
        let name = match injected_for(&claim, pod.as_ref(), &self.node) {
            Ok(n) => n,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let mc = Api::<ModelCache>::namespaced(self.client.clone(), &claim.namespace)
            .get_opt(&name)
            .await
            .map_err(|source| ReviewError {
                what: "read the ModelCache",
                source,
            })?;
        Ok(admit(&claim, &name, mc.as_ref(), source_uri, model).map(|source| (source, claim)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use serde_json::json;

    fn status(
        authenticated: bool,
        audiences: &[&str],
        pod: Option<(&str, &str)>,
    ) -> TokenReviewStatus {
        let mut extra = std::collections::BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(POD_NAME.to_string(), vec![name.to_string()]);
            extra.insert(POD_UID.to_string(), vec![uid.to_string()]);
        }
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:ml:default".into()),
                extra: Some(extra),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(uid: &str, node: &str, inject: Option<&str>) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "chat-0", "namespace": "ml", "uid": uid},
            "spec": {"nodeName": node, "containers": []}
        }))
        .unwrap();
        if let Some(mc) = inject {
            p.metadata.annotations = Some([(INJECT_ANNOTATION.to_string(), mc.to_string())].into());
        }
        p
    }

    fn model_cache() -> ModelCache {
        serde_json::from_value(json!({
            "apiVersion": "modelcache.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": "chat", "namespace": "ml"},
            "spec": {"model": "smollm2", "version": "v1",
                     "source": {"uri": "s3://models/releases/"},
                     "gateway": {"semantic": {"embeddingModel": {"name": "minilm", "version": "1"}}}}
        }))
        .unwrap()
    }

    #[test]
    fn a_token_for_another_audience_or_not_bound_to_a_pod_is_refused() {
        let ok = status(true, &[AUDIENCE], Some(("chat-0", "u1")));
        assert_eq!(
            claim(&ok),
            Ok(Claim {
                namespace: "ml".into(),
                pod: "chat-0".into(),
                uid: "u1".into()
            })
        );
        let other = status(
            true,
            &["https://kubernetes.default.svc"],
            Some(("chat-0", "u1")),
        );
        assert_eq!(claim(&other), Err(Refusal::Unauthenticated));
        assert_eq!(
            claim(&status(false, &[AUDIENCE], None)),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            claim(&status(true, &[AUDIENCE], None)),
            Err(Refusal::NotAPod)
        );
    }

    #[test]
    fn only_the_named_pod_on_this_node_with_the_annotation_is_injected() {
        let c = claim(&status(true, &[AUDIENCE], Some(("chat-0", "u1")))).unwrap();
        let here = pod("u1", "node-a", Some("chat"));
        assert_eq!(injected_for(&c, Some(&here), "node-a"), Ok("chat".into()));
        assert_eq!(
            injected_for(&c, Some(&here), "node-b")
                .unwrap_err()
                .reason(),
            "other_node"
        );
        let replaced = pod("u2", "node-a", Some("chat"));
        assert_eq!(
            injected_for(&c, Some(&replaced), "node-a")
                .unwrap_err()
                .reason(),
            "pod_gone"
        );
        assert_eq!(
            injected_for(&c, None, "node-a").unwrap_err().reason(),
            "pod_gone"
        );
        let plain = pod("u1", "node-a", None);
        assert_eq!(
            injected_for(&c, Some(&plain), "node-a")
                .unwrap_err()
                .reason(),
            "not_injected"
        );
    }

    #[test]
    fn the_model_cache_must_name_the_source_and_the_model() {
        let c = claim(&status(true, &[AUDIENCE], Some(("chat-0", "u1")))).unwrap();
        let mc = model_cache();
        for model in ["smollm2", "minilm"] {
            let source = admit(&c, "chat", Some(&mc), "s3://models/releases", model).unwrap();
            assert_eq!(source.uri, "s3://models/releases/");
        }
        let refused =
            |source: &str, model: &str| admit(&c, "chat", Some(&mc), source, model).unwrap_err();
        assert_eq!(
            refused("s3://models/releases", "llama").reason(),
            "other_model"
        );
        assert_eq!(
            refused("s3://models/other", "smollm2").reason(),
            "other_model"
        );
        assert_eq!(refused("not a uri", "smollm2").reason(), "other_model");
        assert_eq!(
            admit(&c, "chat", None, "s3://models/releases", "smollm2")
                .unwrap_err()
                .reason(),
            "no_model_cache"
        );
        assert_eq!(Refusal::NoToken.status(), 401);
        assert_eq!(refused("s3://models/other", "smollm2").status(), 403);
    }
}
