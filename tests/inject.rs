//! Pod injection from real AdmissionReview fixtures (`tests/fixtures/inject/`):
//! an annotated vLLM pod gets exactly the expected patch (the patched pod is
//! a golden file, and passes strict schema validation), an unannotated pod
//! none, a second pass changes nothing, and an annotation naming no
//! ModelCache is refused or admitted with a warning per the failure policy.
//! Regenerate the golden pod with `MODELCACHE_BLESS=1 cargo test --test inject`.

mod support;

use std::path::{Path, PathBuf};

use base64::Engine;
use modelcache::controller::inject::{FailurePolicy, InjectConfig, review};
use modelcache::crd::ModelCache;
use serde_json::{Value, json};
use support::apply_json_patch as apply;

const IMAGE: &str = "ghcr.io/modelcache/modelcache:0.1.0";

fn fixture(name: &str) -> Value {
    let path = Path::new("tests/fixtures/inject").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn chat() -> ModelCache {
    serde_saphyr::from_str(
        &std::fs::read_to_string("tests/fixtures/builders/chat/modelcache.yaml").unwrap(),
    )
    .unwrap()
}

fn find(namespace: &str, name: &str) -> Result<Option<ModelCache>, String> {
    let mc = chat();
    Ok((mc.metadata.namespace.as_deref() == Some(namespace)
        && mc.metadata.name.as_deref() == Some(name))
    .then_some(mc))
}

fn config(failure_policy: FailurePolicy) -> InjectConfig {
    InjectConfig {
        image: IMAGE.into(),
        failure_policy,
        node_agent_port: None,
    }
}

/// The JSON Patch of a response, decoded.
fn ops(response: &Value) -> Option<Vec<Value>> {
    let patch = response["response"]["patch"].as_str()?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

fn review_with_pod(template: &Value, pod: &Value) -> Value {
    let mut r = template.clone();
    r["request"]["object"] = pod.clone();
    r
}

#[test]
fn an_annotated_pod_gets_exactly_the_expected_patch_and_a_second_pass_nothing() {
    let request = fixture("annotated.json");
    let response = review(&request, find, &config(FailurePolicy::Fail));
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], request["request"]["uid"]);
    assert_eq!(response["response"]["allowed"], true);
    let patch = ops(&response).expect("a patch");
    let patched = apply(request["request"]["object"].clone(), &patch);

    let golden = Path::new("tests/fixtures/inject/expected-pod.json");
    let actual = serde_json::to_string_pretty(&patched).unwrap() + "\n";
    if std::env::var_os("MODELCACHE_BLESS").is_some() {
        std::fs::write(golden, &actual).unwrap();
    }
    assert_eq!(
        actual,
        std::fs::read_to_string(golden).unwrap(),
        "the patched pod differs from {}; run with MODELCACHE_BLESS=1 after an intended change",
        golden.display()
    );

    // What the patch must do, whatever the golden file says.
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], "modelcache-fetch");
    assert_eq!(init[1]["name"], "modelcache-warm");
    assert_eq!(init[1]["restartPolicy"], "Always", "a native sidecar");
    let vllm = &patched["spec"]["containers"][0];
    let env: Vec<&str> = vllm["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        env,
        [
            "HF_HUB_OFFLINE",
            "MODELCACHE_REDIS_URL",
            "MODELCACHE_REDIS_PASSWORD",
            "MODELCACHE_MODEL",
            "MODELCACHE_VERSION"
        ]
    );
    assert_eq!(
        vllm["env"][4]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['modelcache.dev/version']"
    );
    assert_eq!(
        vllm["env"][2]["valueFrom"]["secretKeyRef"],
        json!({"name": "chat-redis", "key": "password"})
    );
    for c in init {
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    }
    // No secret value travels in the pod spec.
    assert!(!actual.contains("AWS_SECRET_ACCESS_KEY\", \"value"));

    // The API server calls the webhook again with the patched pod
    // (reinvocationPolicy IfNeeded): nothing more.
    let again = review(
        &review_with_pod(&request, &patched),
        find,
        &config(FailurePolicy::Fail),
    );
    assert_eq!(again["response"]["allowed"], true);
    assert_eq!(ops(&again), None, "a second pass must not patch");
}

#[test]
fn the_patched_pod_passes_strict_schema_validation() {
    let request = fixture("annotated.json");
    let response = review(&request, find, &config(FailurePolicy::Fail));
    let patched = apply(
        request["request"]["object"].clone(),
        &ops(&response).unwrap(),
    );
    patched_is_valid(patched);
}

#[test]
fn an_unannotated_pod_is_admitted_untouched() {
    let response = review(
        &fixture("unannotated.json"),
        find,
        &config(FailurePolicy::Fail),
    );
    assert_eq!(response["response"]["allowed"], true);
    assert_eq!(ops(&response), None);
    assert!(response["response"].get("warnings").is_none());
}

#[test]
fn an_unknown_modelcache_is_refused_or_admitted_with_a_warning_per_policy() {
    let request = fixture("unknown.json");
    let refused = review(&request, find, &config(FailurePolicy::Fail));
    assert_eq!(refused["response"]["allowed"], false);
    let message = refused["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"no-such-cache\"")
            && message.contains("ml-serving")
            && message.contains("create it, or fix the annotation"),
        "{message}"
    );
    assert_eq!(ops(&refused), None);

    let admitted = review(&request, find, &config(FailurePolicy::Ignore));
    assert_eq!(admitted["response"]["allowed"], true);
    assert_eq!(ops(&admitted), None);
    let warning = admitted["response"]["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("no-such-cache") && warning.contains("admitted without modelcache"),
        "{warning}"
    );
}

#[test]
fn a_failed_lookup_is_not_called_a_missing_modelcache() {
    let request = fixture("annotated.json");
    let down = |_: &str, _: &str| Err("failed to reach the API server".to_string());
    let refused = review(&request, down, &config(FailurePolicy::Fail));
    assert_eq!(refused["response"]["allowed"], false);
    let message = refused["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("could not read ModelCache \"chat\"")
            && message.contains("failed to reach the API server")
            && !message.contains("names no ModelCache"),
        "{message}"
    );
    let admitted = review(&request, down, &config(FailurePolicy::Ignore));
    assert_eq!(admitted["response"]["allowed"], true);
    assert_eq!(ops(&admitted), None);
    // An injected pod needs no lookup at all.
    let patched = apply(
        request["request"]["object"].clone(),
        &ops(&review(&request, find, &config(FailurePolicy::Fail))).unwrap(),
    );
    let again = review(
        &review_with_pod(&request, &patched),
        down,
        &config(FailurePolicy::Fail),
    );
    assert_eq!(again["response"]["allowed"], true);
}

#[test]
fn a_pod_the_webhook_cannot_read_follows_the_failure_policy() {
    let mut request = fixture("annotated.json");
    request["request"]["object"]["spec"]["containers"] = json!("not a list");
    let refused = review(&request, find, &config(FailurePolicy::Fail));
    assert_eq!(refused["response"]["allowed"], false);
    assert!(
        refused["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("failed to read the pod")
    );
    let admitted = review(&request, find, &config(FailurePolicy::Ignore));
    assert_eq!(admitted["response"]["allowed"], true);
}

#[test]
fn a_pod_without_a_version_gets_the_modelcache_version() {
    let mut request = fixture("annotated.json");
    request["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("modelcache.dev/version");
    let response = review(&request, find, &config(FailurePolicy::Fail));
    let patched = apply(
        request["request"]["object"].clone(),
        &ops(&response).unwrap(),
    );
    assert_eq!(
        patched["metadata"]["annotations"]["modelcache.dev/version"],
        chat().spec.version
    );
}

#[test]
fn a_cdn_source_gets_its_headers_and_signing_key_as_mounted_files() {
    // Header values never travel in the patch (the webhook's answer) or in
    // the pod spec: inline ones come from the ConfigMap the controller
    // makes of them. Before, they were `--header` arguments.
    let mut mc = chat();
    mc.spec.source = serde_json::from_value(json!({
        "uri": "https://d111111abcdef8.cloudfront.net/models",
        "cdn": {
            "headers": {"X-Tenant": "acme"},
            "headersSecretRef": {"name": "cdn-headers"},
            "signing": {
                "keyPairId": "K2JCJMDEHXQW5F",
                "privateKeySecretRef": {"name": "cloudfront-key", "key": "private.pem"}
            }
        }
    }))
    .unwrap();
    let request = fixture("annotated.json");
    let found = move |_: &str, _: &str| Ok(Some(mc.clone()));
    let response = review(&request, found, &config(FailurePolicy::Fail));
    let patch = ops(&response).unwrap();
    // The patch travels base64-encoded in the answer: look at it decoded.
    let decoded = serde_json::to_string(&patch).unwrap();
    assert!(
        !decoded.contains("acme"),
        "a header value in the patch: {decoded}"
    );
    let patched = apply(request["request"]["object"].clone(), &patch);
    let fetch = &patched["spec"]["initContainers"][0];
    assert_eq!(fetch["args"], json!(["fetch"]));
    let env: Vec<(&str, &str)> = fetch["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert!(env.contains(&("MODELCACHE_HEADERS_DIR", "/etc/modelcache/cdn-headers")));
    assert!(env.contains(&("MODELCACHE_CLOUDFRONT_KEY_PAIR_ID", "K2JCJMDEHXQW5F")));
    assert!(env.contains(&(
        "MODELCACHE_CLOUDFRONT_PRIVATE_KEY",
        "/etc/modelcache/cloudfront/key.pem"
    )));
    // The spec's defaults (signed URLs, a custom policy, an hour), spelled out.
    assert!(env.contains(&("MODELCACHE_CLOUDFRONT_MODE", "signed-url")));
    assert!(env.contains(&("MODELCACHE_CLOUDFRONT_POLICY", "custom")));
    assert!(env.contains(&("MODELCACHE_CLOUDFRONT_EXPIRES", "3600")));
    let volumes = patched["spec"]["volumes"].as_array().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    assert_eq!(
        volume("modelcache-cdn-headers")["projected"]["sources"],
        json!([{"configMap": {"name": "chat-cdn-headers"}}, {"secret": {"name": "cdn-headers"}}])
    );
    assert_eq!(
        volume("modelcache-cloudfront-key")["secret"]["secretName"],
        "cloudfront-key"
    );
    // The kubelet writes Secret files as root and our containers run as
    // 65532: 0400 could not be read (the pod may have no fsGroup). 0444 is
    // safe because no other container mounts these volumes.
    assert_eq!(
        volume("modelcache-cdn-headers")["projected"]["defaultMode"],
        0o444
    );
    assert_eq!(
        volume("modelcache-cloudfront-key")["secret"]["defaultMode"],
        0o444
    );
    for volume in ["modelcache-cdn-headers", "modelcache-cloudfront-key"] {
        let mounted_by: Vec<&str> = patched["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .chain(patched["spec"]["containers"].as_array())
            .flatten()
            .filter(|c| {
                c["volumeMounts"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["name"] == volume))
            })
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(mounted_by, ["modelcache-fetch"], "{volume}");
    }
    // Secrets only as files: no env var of the fetch container reads one.
    assert!(fetch["env"].as_array().unwrap().iter().all(|e| {
        e.get("valueFrom")
            .is_none_or(|v| v.get("secretKeyRef").is_none())
    }));
    patched_is_valid(patched);
}

#[test]
fn a_sidecar_gateway_fronts_the_engine_in_the_pod_and_the_pod_stays_valid() {
    let mut mc = chat();
    mc.spec.gateway = Some(serde_json::from_value(json!({"mode": "Sidecar"})).unwrap());
    let with_gateway =
        |namespace: &str, name: &str| find(namespace, name).map(|found| found.map(|_| mc.clone()));
    let request = fixture("annotated.json");
    let response = review(&request, with_gateway, &config(FailurePolicy::Fail));
    let patched = apply(
        request["request"]["object"].clone(),
        &ops(&response).unwrap(),
    );
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    let gateway = init
        .iter()
        .find(|c| c["name"] == "modelcache-gateway")
        .expect("the gateway sidecar");
    assert_eq!(gateway["restartPolicy"], "Always");
    assert_eq!(gateway["image"], IMAGE);
    let env: Vec<&Value> = gateway["env"].as_array().unwrap().iter().collect();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).copied().unwrap();
    assert_eq!(
        var("MODELCACHE_UPSTREAM_URL")["value"],
        "http://127.0.0.1:8000"
    );
    // The pod's own version, through the downward API.
    assert_eq!(
        var("MODELCACHE_VERSION")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['modelcache.dev/version']"
    );
    assert_eq!(
        var("MODELCACHE_GATEWAY_SECRET")["valueFrom"]["secretKeyRef"]["name"],
        "chat-gateway"
    );
    assert_eq!(gateway["securityContext"]["readOnlyRootFilesystem"], true);
    // After the fetch container: the weights come first.
    assert_eq!(init[0]["name"], "modelcache-fetch");
    patched_is_valid(patched);
}

#[test]
fn a_semantic_sidecar_gets_its_embedding_model_fetched_after_the_weights() {
    let mut mc = chat();
    // A CDN source: both fetches mount its signing key, which the pod
    // must declare once.
    mc.spec.source = serde_json::from_value(json!({
        "uri": "https://d111111abcdef8.cloudfront.net/models",
        "cdn": {"signing": {"keyPairId": "K2JCJMDEHXQW5F",
                "privateKeySecretRef": {"name": "cloudfront-key", "key": "private.pem"}}}
    }))
    .unwrap();
    mc.spec.gateway = Some(
        serde_json::from_value(json!({"semantic": {
            "embeddingModel": {"name": "all-minilm-l6-v2", "version": "1"}}}))
        .unwrap(),
    );
    let request = fixture("annotated.json");
    let found = move |_: &str, _: &str| Ok(Some(mc.clone()));
    let response = review(&request, found, &config(FailurePolicy::Fail));
    let patched = apply(
        request["request"]["object"].clone(),
        &ops(&response).unwrap(),
    );
    let names: Vec<&str> = patched["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "modelcache-fetch",
            "modelcache-fetch-embedding",
            "modelcache-warm",
            "modelcache-gateway"
        ],
        "the downloads first, then the sidecars, the gateway last"
    );
    let init = &patched["spec"]["initContainers"];
    let env = |c: usize, name: &str| {
        init[c]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(env(1, "MODELCACHE_MODEL")["value"], "all-minilm-l6-v2");
    // The embedding model's own version, not the pod's.
    assert_eq!(env(1, "MODELCACHE_VERSION")["value"], "1");
    assert_eq!(
        env(1, "MODELCACHE_CLOUDFRONT_KEY_PAIR_ID")["value"],
        "K2JCJMDEHXQW5F"
    );
    assert_eq!(
        env(3, "MODELCACHE_EMBEDDING_MODEL")["value"],
        "/etc/modelcache/embedding"
    );
    let volumes: Vec<&str> = patched["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let mut unique = volumes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), volumes.len(), "declared twice: {volumes:?}");
    assert!(volumes.contains(&"modelcache-embedding"), "{volumes:?}");
    patched_is_valid(patched);
}

#[test]
fn with_a_node_agent_the_fetch_asks_its_node_with_a_projected_token_and_no_host_path() {
    let request = fixture("annotated.json");
    let with_agent = InjectConfig {
        node_agent_port: Some(8095),
        ..config(FailurePolicy::Fail)
    };
    let response = review(&request, find, &with_agent);
    let patched = apply(
        request["request"]["object"].clone(),
        &ops(&response).unwrap(),
    );
    let fetch = &patched["spec"]["initContainers"][0];
    assert_eq!(fetch["name"], "modelcache-fetch");
    let env = fetch["env"].as_array().unwrap();
    let at = |name: &str| env.iter().position(|e| e["name"] == name).unwrap();
    assert_eq!(
        env[at("MODELCACHE_HOST_IP")]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    assert_eq!(
        env[at("MODELCACHE_NODE_AGENT")]["value"],
        "http://$(MODELCACHE_HOST_IP):8095"
    );
    // The kubelet expands $(VAR) only from variables defined earlier.
    assert!(at("MODELCACHE_HOST_IP") < at("MODELCACHE_NODE_AGENT"));
    let token_file = env[at("MODELCACHE_NODE_TOKEN_FILE")]["value"]
        .as_str()
        .unwrap();
    let volumes = patched["spec"]["volumes"].as_array().unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "modelcache-node-token")
        .expect("the token volume");
    let projection = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projection["audience"], "modelcache-node");
    assert_eq!(projection["path"], "token");
    let mount = fetch["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "modelcache-node-token")
        .unwrap();
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        format!("{}/token", mount["mountPath"].as_str().unwrap()),
        token_file
    );
    // Pod Security "restricted" holds: no hostPath, no host network.
    assert!(volumes.iter().all(|v| v.get("hostPath").is_none()));
    assert!(patched["spec"].get("hostNetwork").is_none());
    // Only the fetch gets the token: the engine never holds it.
    for c in patched["spec"]["containers"].as_array().unwrap() {
        let mounts = c["volumeMounts"].as_array().into_iter().flatten();
        assert!(
            mounts
                .into_iter()
                .all(|m| m["name"] != "modelcache-node-token")
        );
    }
    patched_is_valid(patched);

    // Without an agent, none of it.
    let plain = review(&request, find, &config(FailurePolicy::Fail));
    let text = serde_json::to_string(&ops(&plain).unwrap()).unwrap();
    assert!(!text.contains("MODELCACHE_NODE_AGENT") && !text.contains("modelcache-node-token"));
}

/// Passes strict schema validation, named as the API server names it after
/// admission (the validator needs a name).
fn patched_is_valid(mut patched: Value) {
    patched["metadata"]["name"] = json!("chat-vllm-7d9f8c6b5-x7k2p");
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("pod.json");
    std::fs::write(&file, serde_json::to_vec(&patched).unwrap()).unwrap();
    support::strict_validate(&[&file]);
}

#[test]
fn a_pod_of_a_pinned_version_gets_its_manifest_digest_and_others_none() {
    let digest = "ab".repeat(32);
    let mut mc = chat();
    mc.status = Some(
        serde_json::from_value(json!({
            "versions": [
                {"version": "v1", "phase": "Live", "pods": 1, "manifestDigest": digest},
                {"version": "v2", "phase": "Live", "pods": 0}
            ]
        }))
        .unwrap(),
    );
    let request = fixture("annotated.json");
    let fetch_env = |pod: &Value| {
        let found = {
            let mc = mc.clone();
            move |_: &str, _: &str| Ok(Some(mc.clone()))
        };
        let response = review(
            &review_with_pod(&request, pod),
            found,
            &config(FailurePolicy::Fail),
        );
        let patched = apply(pod.clone(), &ops(&response).unwrap());
        patched["spec"]["initContainers"][0]["env"].clone()
    };
    let pinned = |env: &Value| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "MODELCACHE_MANIFEST_DIGEST")
            .map(|e| e["value"].as_str().unwrap().to_owned())
    };
    let v1 = request["request"]["object"].clone();
    assert_eq!(pinned(&fetch_env(&v1)), Some(digest.clone()));
    let mut v2 = v1.clone();
    v2["metadata"]["annotations"]["modelcache.dev/version"] = json!("v2");
    assert_eq!(pinned(&fetch_env(&v2)), None, "v2 is not pinned yet");
    // A pod naming no version serves the ModelCache's (v1): pinned.
    let mut unversioned = v1.clone();
    unversioned["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("modelcache.dev/version");
    assert_eq!(pinned(&fetch_env(&unversioned)), Some(digest));
}
