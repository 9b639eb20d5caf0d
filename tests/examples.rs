//! The Kubernetes examples: the vLLM Deployments (explicit and injected)
//! pass strict schema validation for 1.30 and 1.37; the explicit one is what
//! the webhook makes of the injected one; the GitOps directory renders with
//! kustomize into valid objects, and a rollout there is a one-line bump.
//! (The CachePolicy and ModelCache examples are checked against the CRDs by
//! `tests/cli.rs`; those quoted in the README and docs/ here.)

mod support;

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use modelcache::controller::inject;
use modelcache::crd::ModelCache;
use serde_json::{Value, json};
use support::{strict_validate, tool};

const IMAGE: &str = "ghcr.io/modelcache/modelcache:0.1.0";

fn load<T: serde::de::DeserializeOwned>(path: &str) -> T {
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_vllm_deployments_pass_strict_validation() {
    strict_validate(&[
        Path::new("examples/deploy/vllm-explicit.yaml"),
        Path::new("examples/deploy/vllm-injected.yaml"),
    ]);
}

/// The injected example's pod template after the webhook.
fn injected_template() -> Value {
    let deployment: Deployment = load("examples/deploy/vllm-injected.yaml");
    let mc: ModelCache = load("examples/modelcache.yaml");
    let template = deployment.spec.template;
    let pod = Pod {
        metadata: template.metadata.clone().unwrap(),
        spec: template.spec.clone(),
        ..Default::default()
    };
    let config = inject::InjectConfig {
        image: IMAGE.into(),
        failure_policy: inject::FailurePolicy::Fail,
        node_agent_port: None,
    };
    let ops = inject::patch(&pod, &mc, &config);
    let doc = json!({"metadata": serde_json::to_value(&pod.metadata).unwrap(), "spec": serde_json::to_value(&pod.spec).unwrap()});
    support::apply_json_patch(doc, &ops)
}

#[test]
fn the_explicit_deployment_is_what_the_webhook_makes_of_the_injected_one() {
    let explicit: Deployment = load("examples/deploy/vllm-explicit.yaml");
    let explicit = serde_json::to_value(explicit.spec.template).unwrap();
    let injected = injected_template();
    if std::env::var_os("MODELCACHE_PRINT").is_some() {
        println!(
            "{}",
            serde_json::to_string_pretty(&injected["spec"]).unwrap()
        );
    }
    for field in ["initContainers", "volumes", "containers"] {
        assert_eq!(
            explicit["spec"][field], injected["spec"][field],
            "spec.{field} of examples/deploy/vllm-explicit.yaml differs from the webhook's (MODELCACHE_PRINT=1 prints it)"
        );
    }
    assert_eq!(
        explicit["metadata"]["labels"], injected["metadata"]["labels"],
        "the labels of examples/deploy/vllm-explicit.yaml's pods differ from the webhook's"
    );
}

fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new(tool("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl from scripts/setup.sh");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).unwrap())
        .collect()
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {docs:?}"))
}

#[test]
fn the_gitops_directory_renders_valid_objects_and_a_rollout_is_one_line() {
    let docs = kustomize(Path::new("examples/gitops/chat"));
    assert_eq!(docs.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let deployment = dir.path().join("deployment.json");
    std::fs::write(
        &deployment,
        serde_json::to_vec(find_kind(&docs, "Deployment")).unwrap(),
    )
    .unwrap();
    strict_validate(&[&deployment]);
    let mc = dir.path().join("modelcache.json");
    std::fs::write(
        &mc,
        serde_json::to_vec(find_kind(&docs, "ModelCache")).unwrap(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .arg("validate")
        .arg(&mc)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let annotation = |docs: &[Value]| {
        find_kind(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
            ["modelcache.dev/version"]
            .clone()
    };
    assert_eq!(annotation(&docs), "v1");

    // The rollout: one line of modelcache.yaml changes.
    let repo = dir.path().join("chat");
    std::fs::create_dir(&repo).unwrap();
    for f in ["kustomization.yaml", "modelcache.yaml", "deployment.yaml"] {
        std::fs::copy(Path::new("examples/gitops/chat").join(f), repo.join(f)).unwrap();
    }
    let before = std::fs::read_to_string(repo.join("modelcache.yaml")).unwrap();
    let after = before.replacen("  version: v1\n", "  version: v2\n", 1);
    let changed = before
        .lines()
        .zip(after.lines())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(changed, 1);
    std::fs::write(repo.join("modelcache.yaml"), after).unwrap();
    let bumped = kustomize(&repo);
    assert_eq!(find_kind(&bumped, "ModelCache")["spec"]["version"], "v2");
    assert_eq!(annotation(&bumped), "v2", "the pods roll with the bump");
}

#[test]
fn the_argocd_application_syncs_the_gitops_directory() {
    let app: Value = load("examples/gitops/application.yaml");
    assert_eq!(app["apiVersion"], "argoproj.io/v1alpha1");
    assert_eq!(app["kind"], "Application");
    let path = app["spec"]["source"]["path"].as_str().unwrap();
    assert!(
        Path::new(path).join("kustomization.yaml").exists(),
        "{path}"
    );
    let kustomization: Value = load(&format!("{path}/kustomization.yaml"));
    assert_eq!(
        app["spec"]["destination"]["namespace"],
        kustomization["namespace"]
    );
    assert!(app["spec"]["syncPolicy"]["automated"].is_object());
    let options: Vec<&str> = app["spec"]["syncPolicy"]["syncOptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    // The CRD schemas are too large for client-side apply's annotation.
    assert!(options.contains(&"ServerSideApply=true"), "{options:?}");
}

/// Every ModelCache or CachePolicy quoted in the README and in docs/ passes
/// the CRDs' schemas and rules, so the documentation never shows a resource
/// that `kubectl apply` would refuse.
#[test]
fn resources_quoted_in_the_docs_are_valid() {
    let validator = modelcache::crd::validate::Validator::new().unwrap();
    let mut pages = vec![std::path::PathBuf::from("README.md")];
    for entry in std::fs::read_dir("docs").unwrap() {
        pages.push(entry.unwrap().path());
    }
    let mut checked = 0;
    for page in pages
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
    {
        let text = std::fs::read_to_string(page).unwrap();
        for block in text.split("```yaml\n").skip(1) {
            let yaml = &block[..block.find("```").unwrap()];
            if !yaml.contains("apiVersion: modelcache.dev/") {
                continue;
            }
            let name = page.display().to_string();
            for report in validator.validate_yaml(&name, yaml).unwrap() {
                assert!(report.violations.is_empty(), "{name}: {report:?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 1, "the README quotes a ModelCache");
}
