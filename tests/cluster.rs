//! Tests against a real Kubernetes cluster. Ignored by default; run them with
//! `KUBECONFIG=/path/to/kubeconfig cargo test --test cluster -- --ignored`.
//! They install the CRDs with server-side apply, create the examples in a
//! throw-away namespace, and check that the API server defaults and rejects
//! exactly as the offline validator does.

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
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

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
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

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
