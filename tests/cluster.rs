//! Tests against a real Kubernetes cluster. Ignored by default; run them with
//! `KUBECONFIG=/path/to/kubeconfig cargo test --test cluster -- --ignored`.
//! They install the CRDs with server-side apply, create the examples in a
//! throw-away namespace, and check that the API server defaults and rejects
//! exactly as the offline validator does.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use modelcache::crd;

const MANAGER: &str = "modelcache-tests";

async fn client() -> Client {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "these tests need a cluster: set KUBECONFIG and run with --ignored"
    );
    Client::try_default()
        .await
        .expect("connect to the cluster in KUBECONFIG")
}

async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for def in crd::definitions() {
        let name = def.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&def),
        )
        .await
        .expect("apply CRD");
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established within 60s")
        .unwrap();
    }
}

/// Creates the throw-away namespace `ns`; the API to delete it with.
async fn create_namespace(client: &Client, ns: &str) -> Api<Namespace> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.into());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    namespaces
}

fn dynamic_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(crd::GROUP, crd::VERSION, kind);
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn load(path: &str) -> DynamicObject {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: set KUBECONFIG and pass --ignored"]
async fn api_server_accepts_examples_and_rejects_bad_resources() {
    let client = client().await;
    install_crds(&client).await;
    let ns = format!("modelcache-test-{}", std::process::id());
    let namespaces = create_namespace(&client, &ns).await;

    let result = async {
        for (path, kind) in [
            ("examples/cachepolicy.yaml", "CachePolicy"),
            ("examples/modelcache.yaml", "ModelCache"),
        ] {
            let mut obj = load(path);
            obj.metadata.namespace = Some(ns.clone());
            let api = dynamic_api(&client, &ns, kind);
            let created = api
                .create(&PostParams::default(), &obj)
                .await
                .expect("create example");
            if kind == "CachePolicy" {
                // Defaults come from the schema, applied by the API server.
                assert_eq!(created.data["spec"]["semantic"]["mode"], "Static");
            }
        }
        for (path, kind) in [
            ("tests/fixtures/invalid/maxmemory-ratio.yaml", "CachePolicy"),
            ("tests/fixtures/invalid/eviction-policy.yaml", "CachePolicy"),
            ("tests/fixtures/invalid/source-scheme.yaml", "ModelCache"),
            ("tests/fixtures/invalid/cdn-on-s3.yaml", "ModelCache"),
            ("tests/fixtures/invalid/workload-both.yaml", "ModelCache"),
        ] {
            let mut obj = load(path);
            obj.metadata.namespace = Some(ns.clone());
            let err = dynamic_api(&client, &ns, kind)
                .create(&PostParams::default(), &obj)
                .await
                .expect_err(path);
            assert!(err.to_string().contains("Invalid"), "{path}: {err}");
        }
    }
    .await;
    namespaces.delete(&ns, &DeleteParams::default()).await.ok();
    result
}

/// The controller, run in-process against the cluster, provisions a Redis for
/// a ModelCache, reports it Ready, and the generated passwords open it. The
/// test reaches the Redis pod through `kubectl port-forward` (from
/// scripts/setup.sh), so it also works with a kind cluster from outside.
#[tokio::test]
#[ignore = "needs a Kubernetes cluster: set KUBECONFIG and pass --ignored"]
async fn controller_provisions_a_ready_redis() {
    use modelcache::controller::{ControllerConfig, run};
    let client = client().await;
    install_crds(&client).await;
    let ns = format!("modelcache-ctl-{}", std::process::id());
    let namespaces = create_namespace(&client, &ns).await;

    let local_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = ControllerConfig {
        namespace: Some(ns.clone()),
        http_addr: ([127, 0, 0, 1], http_port).into(),
        health_interval: Duration::from_secs(10),
        leader_election: false,
        lease_namespace: ns.clone(),
        lease_name: "modelcache-test".into(),
        identity: "cluster-test".into(),
        lease_duration: Duration::from_secs(15),
        redis_url_override: Some(format!("redis://127.0.0.1:{local_port}")),
        webhook: None,
        image: None,
        node_agents: None,
    };
    let controller = tokio::spawn(run(config));

    let result = async {
        let mut mc = load("examples/modelcache.yaml");
        mc.metadata.namespace = Some(ns.clone());
        mc.data["spec"]["cachePolicyRef"] = serde_json::Value::Null;
        mc.data["spec"]["redis"] = serde_json::json!({"memory": "128Mi"});
        mc.data["spec"]["warmup"] = serde_json::Value::Null;
        dynamic_api(&client, &ns, "ModelCache")
            .create(&PostParams::default(), &mc)
            .await
            .unwrap();

        // Wait for the Redis pod, then forward a local port to it.
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
        tokio::time::timeout(
            Duration::from_secs(180),
            await_condition(pods, "chat-redis-0", conditions::is_pod_running()),
        )
        .await
        .expect("the Redis pod runs within 180s")
        .unwrap();
        let kubectl = std::env::var("HOME")
            .map(|h| format!("{h}/.cache/modelcache/tools/bin/kubectl"))
            .unwrap();
        let _forward = KillOnDrop(
            std::process::Command::new(kubectl)
                .args([
                    "port-forward",
                    "-n",
                    &ns,
                    "pod/chat-redis-0",
                    &format!("{local_port}:6379"),
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("kubectl port-forward"),
        );

        let api = dynamic_api(&client, &ns, "ModelCache");
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let mc = api.get("chat").await.unwrap();
                let conditions = mc.data["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if conditions
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                {
                    return mc;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
        .await
        .expect("the ModelCache is Ready within 120s");
        assert_eq!(
            ready.data["status"]["redis"]["appliedConfig"]["maxmemory"],
            "107374182"
        );

        let secret: Secret = Api::namespaced(client.clone(), &ns)
            .get("chat-redis")
            .await
            .unwrap();
        let data = secret.data.unwrap();
        let value = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
        // Serving pods' password: their model's keys, nothing dangerous.
        let serving = redis::Client::open(format!(
            "redis://:{}@127.0.0.1:{local_port}",
            value("password")
        ))
        .unwrap();
        let mut conn = serving
            .get_multiplexed_async_connection()
            .await
            .expect("the serving password opens Redis");
        let refused = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async::<Vec<String>>(&mut conn)
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("NOPERM"), "{refused}");
        let admin = redis::Client::open(format!(
            "redis://{}:{}@127.0.0.1:{local_port}",
            modelcache::keyspace::acl::ADMIN_USER,
            value("admin-password")
        ))
        .unwrap();
        let mut conn = admin
            .get_multiplexed_async_connection()
            .await
            .expect("the controller's password opens Redis");
        let policy: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(policy[1], "allkeys-lru");
    }
    .await;
    controller.abort();
    namespaces.delete(&ns, &DeleteParams::default()).await.ok();
    result
}

/// Stops a helper process even when an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node agent's assumptions about a real API server: a projected token
/// for audience `modelcache-node`, bound to a pod, reviews as that pod (the
/// pod-name and pod-uid extras the agent reads), a token for another audience
/// does not, and the chart's RBAC for the agent allows what it uses and
/// nothing else (SubjectAccessReviews). The DaemonSet passes a server-side
/// dry run. Needs only a schedulable node (the pod's image is never pulled
/// for the review to work).
#[tokio::test]
#[ignore = "needs a Kubernetes cluster: set KUBECONFIG and pass --ignored"]
async fn node_agent_tokens_and_rbac_on_a_real_api_server() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    };
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use modelcache::node::authorize::{self, AUDIENCE, Refusal};

    let client = client().await;
    let ns = format!("modelcache-node-test-{}", std::process::id());
    let release = format!("mc{}", std::process::id());
    let namespaces = create_namespace(&client, &ns).await;
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let agent_name = format!("{release}-modelcache-node");

    let result = async {
        // A model pod with its own ServiceAccount, as the webhook sees it.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        let mut sa = ServiceAccount::default();
        sa.metadata.name = Some("model".into());
        accounts.create(&PostParams::default(), &sa).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "chat-0", "annotations": {"modelcache.dev/inject": "chat"}},
            "spec": {"serviceAccountName": "model", "automountServiceAccountToken": false,
                     "containers": [{"name": "engine", "image": "registry.k8s.io/pause:3.10"}]}
        }))
        .unwrap();
        let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
        let uid = pod.metadata.uid.clone().unwrap();
        let token = |audiences: Option<Vec<String>>| {
            let accounts = accounts.clone();
            let uid = uid.clone();
            async move {
                let request = TokenRequest {
                    spec: Some(TokenRequestSpec {
                        audiences,
                        expiration_seconds: Some(600),
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some("chat-0".into()),
                            uid: Some(uid),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                accounts
                    .create_token_request("model", &PostParams::default(), &request)
                    .await
                    .unwrap()
                    .status
                    .and_then(|s| s.token)
                    .expect("a token")
            }
        };
        let review = |token: String| {
            let client = client.clone();
            async move {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token,
                        audiences: Some(vec![AUDIENCE.into()]),
                    },
                    ..Default::default()
                };
                Api::<TokenReview>::all(client)
                    .create(&PostParams::default(), &review)
                    .await
                    .unwrap()
                    .status
                    .unwrap_or_default()
            }
        };
        let ours = review(token(Some(vec![AUDIENCE.into()])).await).await;
        let claim = authorize::claim(&ours).expect("the pod's token reviews as the pod");
        assert_eq!(
            (claim.namespace.as_str(), claim.pod.as_str()),
            (ns.as_str(), "chat-0")
        );
        assert_eq!(claim.uid, uid);
        let theirs = review(token(None).await).await;
        assert_eq!(authorize::claim(&theirs), Err(Refusal::Unauthenticated));

        // The pod, once scheduled: the agent of its node admits it, another's not.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let pod = loop {
            let p = pods.get("chat-0").await.unwrap();
            if p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some() {
                break p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chat-0 was not scheduled"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
        assert_eq!(
            authorize::injected_for(&claim, Some(&pod), &node).as_deref(),
            Ok("chat")
        );
        assert!(matches!(
            authorize::injected_for(&claim, Some(&pod), "another-node"),
            Err(Refusal::OtherNode { .. })
        ));

        // The chart's RBAC for the agent, applied as rendered.
        let rendered = std::process::Command::new(support::tool("helm"))
            .args(["template", &release])
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/modelcache"))
            .args(["--namespace", &ns, "--set", "nodeCache.enabled=true"])
            .output()
            .unwrap();
        assert!(
            rendered.status.success(),
            "{}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&String::from_utf8(rendered.stdout).unwrap()).unwrap();
        let named = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("no {kind} {name}"))
        };
        let sa: ServiceAccount =
            serde_json::from_value(named("ServiceAccount", &agent_name)).unwrap();
        accounts.create(&PostParams::default(), &sa).await.unwrap();
        let role: ClusterRole = serde_json::from_value(named("ClusterRole", &agent_name)).unwrap();
        roles.create(&PostParams::default(), &role).await.unwrap();
        let binding: ClusterRoleBinding =
            serde_json::from_value(named("ClusterRoleBinding", &agent_name)).unwrap();
        bindings
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
        let may = |group: &str, resource: &str, verb: &str| {
            let client = client.clone();
            let user = format!("system:serviceaccount:{ns}:{agent_name}");
            let (group, resource, verb) = (group.to_owned(), resource.to_owned(), verb.to_owned());
            let ns = ns.clone();
            async move {
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user),
                        resource_attributes: Some(ResourceAttributes {
                            group: Some(group),
                            resource: Some(resource),
                            verb: Some(verb),
                            namespace: Some(ns),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                Api::<SubjectAccessReview>::all(client)
                    .create(&PostParams::default(), &review)
                    .await
                    .unwrap()
                    .status
                    .is_some_and(|s| s.allowed)
            }
        };
        // RBAC takes a moment to reach every API server replica.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !may("authentication.k8s.io", "tokenreviews", "create").await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tokenreviews create not allowed"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(may("", "pods", "get").await);
        assert!(may("", "nodes", "get").await);
        assert!(may("modelcache.dev", "modelcaches", "list").await);
        for (group, resource, verb) in [
            ("", "secrets", "get"),
            ("", "pods", "list"),
            ("", "pods", "delete"),
            ("modelcache.dev", "modelcaches", "patch"),
            ("authentication.k8s.io", "tokenreviews", "delete"),
        ] {
            assert!(
                !may(group, resource, verb).await,
                "{resource} {verb} must not be allowed"
            );
        }

        // The DaemonSet as rendered: the API server accepts it (dry run).
        let ds: DaemonSet = serde_json::from_value(named("DaemonSet", &agent_name)).unwrap();
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        Api::<DaemonSet>::namespaced(client.clone(), &ns)
            .create(&dry, &ds)
            .await
            .expect("the API server accepts the DaemonSet");
    }
    .await;
    roles
        .delete(&agent_name, &DeleteParams::default())
        .await
        .ok();
    bindings
        .delete(&agent_name, &DeleteParams::default())
        .await
        .ok();
    namespaces.delete(&ns, &DeleteParams::default()).await.ok();
    result
}
