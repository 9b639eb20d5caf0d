//! Tests against a real Kubernetes cluster. Ignored by default; run them with
//! `KUBECONFIG=/path/to/kubeconfig cargo test --test cluster -- --ignored`.
//! They install the CRDs with server-side apply, create the examples in a
//! throw-away namespace, and check that the API server defaults and rejects
//! exactly as the offline validator does.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
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
