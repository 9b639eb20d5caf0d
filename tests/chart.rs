//! The Helm chart: `helm lint --strict`, and strict schema validation of what
//! it renders for Kubernetes 1.30 and 1.37, cluster-wide and namespaced. The
//! RBAC rules are pinned here so that a new verb is a deliberate change (and
//! goes into the RBAC table of docs/controller.md).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn helm() -> PathBuf {
    if let Some(p) = std::env::var_os("MODELCACHE_HELM") {
        return p.into();
    }
    let path = support::tool("helm");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/modelcache")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn render(sets: &[&str]) -> String {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "mc"])
        .arg(chart())
        .args(["--namespace", "modelcache-system"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    String::from_utf8(run(&mut cmd).stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple::<serde_json::Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn lint_is_strictly_clean() {
    run(Command::new(helm()).args(["lint", "--strict"]).arg(chart()));
}

#[test]
fn rendered_chart_passes_strict_validation() {
    let dir = tempfile::tempdir().unwrap();
    for (name, sets) in [
        ("cluster", vec![]),
        ("namespaced", vec!["watchNamespace=ml"]),
        ("node-cache", vec!["nodeCache.enabled=true"]),
        (
            "node-cache-namespaced",
            vec!["nodeCache.enabled=true", "watchNamespace=ml"],
        ),
        (
            "network-policy",
            vec![
                "networkPolicy.enabled=true",
                "networkPolicy.apiServerCIDRs={10.0.0.0/28}",
            ],
        ),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        let rendered = render(&sets);
        let count = documents(&rendered).len();
        assert!(count >= 13, "{name}: {count} documents");
        std::fs::write(&path, rendered).unwrap();
        for version in ["1.30.0", "1.37.0"] {
            let out = run(Command::new(support::python())
                .args(["-m", "kubernetes_validate", "--strict", "-k", version])
                .arg(&path));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                stdout.matches("passed").count(),
                count,
                "{name} on {version}: {stdout}"
            );
        }
    }
}

#[test]
fn rbac_is_least_privilege_and_scoped_as_configured() {
    let docs = documents(&render(&[]));
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"ClusterRole") && kinds.contains(&"ClusterRoleBinding"),
        "{kinds:?}"
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mc-modelcache")
        .unwrap();
    let rules: Vec<String> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {} {}", r["apiGroups"][0], r["resources"], r["verbs"]))
        .collect();
    assert_eq!(
        rules,
        vec![
            r#""modelcache.dev" ["modelcaches"] ["get","list","watch"]"#,
            r#""modelcache.dev" ["modelcaches/status"] ["patch"]"#,
            r#""modelcache.dev" ["cachepolicies"] ["get","list","watch"]"#,
            r#""" ["configmaps","services"] ["get","list","watch","create","patch"]"#,
            r#""apps" ["statefulsets"] ["get","list","watch","create","patch","delete"]"#,
            r#""networking.k8s.io" ["networkpolicies"] ["get","create","patch"]"#,
            r#""apps" ["deployments"] ["get","create","patch"]"#,
            r#""" ["pods"] ["list"]"#,
            r#""" ["secrets"] ["get","create"]"#,
            r#""events.k8s.io" ["events"] ["create","patch"]"#,
        ]
    );
    let no_wildcards = !serde_json::to_string(role).unwrap().contains('*');
    assert!(no_wildcards, "no wildcard verbs or resources");

    // The webhook's TLS: one Secret by name (create cannot be limited by
    // name), and the caBundle of its own configuration only.
    let webhook_rules = |kind: &str| -> Vec<String> {
        let r = docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == "mc-modelcache-webhook")
            .unwrap();
        r["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} {} {}", r["resources"], r["resourceNames"], r["verbs"]))
            .collect()
    };
    assert_eq!(
        webhook_rules("Role"),
        vec![
            r#"["secrets"] null ["create"]"#,
            r#"["secrets"] ["mc-modelcache-webhook-tls"] ["get","update"]"#,
        ]
    );
    assert_eq!(
        webhook_rules("ClusterRole"),
        vec![r#"["mutatingwebhookconfigurations"] ["mc-modelcache"] ["get","update"]"#]
    );

    // Watching one namespace needs no cluster-wide rights beyond the
    // webhook's own configuration.
    let docs = documents(&render(&["watchNamespace=ml"]));
    assert!(docs.iter().all(|d| {
        (d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding")
            || d["metadata"]["name"] == "mc-modelcache-webhook"
    }));
    let docs_without_webhook = documents(&render(&["watchNamespace=ml", "webhook.enabled=false"]));
    assert!(
        docs_without_webhook
            .iter()
            .all(|d| d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding")
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == "ml")
        .unwrap();
    assert_eq!(role["rules"].as_array().unwrap().len(), 10);

    // The Lease is the only thing in the controller's own namespace.
    let lease = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "mc-modelcache-leader-election" && d["kind"] == "Role")
        .unwrap();
    assert_eq!(lease["metadata"]["namespace"], "modelcache-system");
    assert_eq!(
        lease["rules"][0]["verbs"],
        serde_json::json!(["get", "create", "update"])
    );
}

/// `kind/name`'s rules as `group resources verbs` lines.
fn rules_of(docs: &[serde_json::Value], kind: &str, name: &str) -> Vec<String> {
    let role = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {} {}", r["apiGroups"][0], r["resources"], r["verbs"]))
        .collect()
}

#[test]
fn the_node_cache_is_opt_in_with_its_own_least_privilege_account() {
    let off = documents(&render(&[]));
    assert!(off.iter().all(|d| d["kind"] != "DaemonSet"));
    let controller_args = |docs: &[serde_json::Value]| {
        let d = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        d["spec"]["template"]["spec"]["containers"][0]["args"].to_string()
    };
    assert!(!controller_args(&off).contains("--node-agent-port"));

    let docs = documents(&render(&["nodeCache.enabled=true"]));
    assert!(controller_args(&docs).contains("--node-agent-port=8095"));
    assert_eq!(
        rules_of(&docs, "ClusterRole", "mc-modelcache-node"),
        vec![
            r#""authentication.k8s.io" ["tokenreviews"] ["create"]"#,
            r#""" ["nodes"] ["get"]"#,
            r#""" ["pods"] ["get"]"#,
            r#""modelcache.dev" ["modelcaches"] ["get","list"]"#,
        ]
    );
    // Watching one namespace: reviews cluster-wide (they are not
    // namespaced), reads in that namespace only.
    let namespaced = documents(&render(&["nodeCache.enabled=true", "watchNamespace=ml"]));
    assert_eq!(
        rules_of(&namespaced, "ClusterRole", "mc-modelcache-node"),
        vec![
            r#""authentication.k8s.io" ["tokenreviews"] ["create"]"#,
            r#""" ["nodes"] ["get"]"#,
        ]
    );
    let role = namespaced
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "mc-modelcache-node")
        .unwrap();
    assert_eq!(role["metadata"]["namespace"], "ml");
    assert_eq!(
        rules_of(&namespaced, "Role", "mc-modelcache-node"),
        vec![
            r#""" ["pods"] ["get"]"#,
            r#""modelcache.dev" ["modelcaches"] ["get","list"]"#,
        ]
    );
    let agent_args = |docs: &[serde_json::Value]| {
        let d = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        d["spec"]["template"]["spec"]["containers"][0]["args"].to_string()
    };
    assert!(agent_args(&namespaced).contains("--namespace=ml"));
    // The controller finds the agents in its own namespace to read their
    // prefetches: list pods there, nothing more.
    assert_eq!(
        rules_of(&namespaced, "Role", "mc-modelcache-node-agents"),
        vec![r#""" ["pods"] ["list"]"#]
    );
    assert!(controller_args(&docs).contains("--node-agent-admin-port=8096"));
    assert!(controller_args(&docs).contains(
        "--node-agent-selector=app.kubernetes.io/instance=mc,app.kubernetes.io/component=node-cache"
    ));
    assert!(!agent_args(&docs).contains("--namespace"));

    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "mc-modelcache-node");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/var/lib/modelcache");
    let agent = &pod["containers"][0];
    assert_eq!(agent["args"][0], "node");
    assert!(
        agent["args"]
            .to_string()
            .contains("--listen=$(HOST_IP):8095")
    );
    let security = &agent["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // The one root step may change owners and nothing else.
    let own = &pod["initContainers"][0]["securityContext"];
    assert_eq!(
        own["capabilities"]["add"],
        serde_json::json!(["CHOWN", "FOWNER"])
    );
    assert_eq!(own["allowPrivilegeEscalation"], false);
    assert_eq!(own["readOnlyRootFilesystem"], true);
}

#[test]
fn the_controller_pod_runs_locked_down() {
    let docs = documents(&render(&[]));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(container["args"][0], "controller");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["limits"]["memory"].is_string());
}

#[test]
fn the_webhook_sees_annotated_pods_only_and_fails_closed_by_default() {
    let docs = documents(&render(&[]));
    let config = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(config["metadata"]["name"], "mc-modelcache");
    let hook = &config["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert!(
        hook["clientConfig"].get("caBundle").is_none(),
        "set by the controller"
    );
    assert_eq!(
        hook["clientConfig"]["service"]["name"],
        "mc-modelcache-webhook"
    );
    assert!(
        hook["matchConditions"][0]["expression"]
            .as_str()
            .unwrap()
            .contains("'modelcache.dev/inject' in object.metadata.annotations")
    );
    let excluded = &hook["namespaceSelector"]["matchExpressions"][0]["values"];
    assert_eq!(
        excluded[0], "modelcache-system",
        "never the controller's own pods"
    );
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for want in [
        "--webhook-addr=0.0.0.0:8443",
        "--webhook-failure-policy=fail",
        "--webhook-service=mc-modelcache-webhook",
        "--webhook-configuration=mc-modelcache",
        "--webhook-secret=mc-modelcache-webhook-tls",
    ] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }

    let ignore = documents(&render(&["webhook.failurePolicy=Ignore"]));
    let config = ignore
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(config["webhooks"][0]["failurePolicy"], "Ignore");
}

/// With `networkPolicy.enabled`, the webhook port admits only the API
/// server's addresses (`/mutate` answers any caller), and the metrics port
/// the peers configured; without the addresses the chart refuses to render
/// rather than block admissions. Off by default.
#[test]
fn the_network_policy_admits_only_the_api_server_to_the_webhook() {
    let policies = |docs: &[serde_json::Value]| {
        docs.iter()
            .filter(|d| d["kind"] == "NetworkPolicy")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(policies(&documents(&render(&[]))).is_empty());
    let docs = documents(&render(&[
        "networkPolicy.enabled=true",
        "networkPolicy.apiServerCIDRs={10.0.0.0/28,192.168.1.10/32}",
    ]));
    let policy = &policies(&docs)[0];
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        policy["spec"]["ingress"],
        serde_json::json!([
            {"ports": [{"port": "webhook", "protocol": "TCP"}],
             "from": [{"ipBlock": {"cidr": "10.0.0.0/28"}}, {"ipBlock": {"cidr": "192.168.1.10/32"}}]},
            {"ports": [{"port": "http", "protocol": "TCP"}]},
        ])
    );

    let mut cmd = Command::new(helm());
    cmd.args(["template", "mc"])
        .arg(chart())
        .args(["--set", "networkPolicy.enabled=true"]);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "rendered without the API server's addresses"
    );
    assert!(
        stderr.contains("networkPolicy.apiServerCIDRs is empty"),
        "{stderr}"
    );
}

#[test]
fn cert_manager_mode_issues_the_certificate_and_the_controller_only_reads_it() {
    let docs = documents(&render(&["webhook.certManager.enabled=true"]));
    let cert = docs.iter().find(|d| d["kind"] == "Certificate").unwrap();
    assert_eq!(cert["spec"]["secretName"], "mc-modelcache-webhook-tls");
    assert_eq!(
        cert["spec"]["dnsNames"][0],
        "mc-modelcache-webhook.modelcache-system.svc"
    );
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "Issuer");
    assert!(docs.iter().any(|d| d["kind"] == "Issuer"));
    let config = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "modelcache-system/mc-modelcache-webhook"
    );
    // No rights to Secrets or webhook configurations beyond the main role.
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "mc-modelcache-webhook"
                && (d["kind"] == "Role" || d["kind"] == "ClusterRole"))
    );
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "mc-modelcache-webhook-tls"
    );
    assert!(
        pod["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--webhook-cert-dir=/etc/modelcache/webhook-tls")
    );
    // An existing ClusterIssuer instead of the chart's own.
    let docs = documents(&render(&[
        "webhook.certManager.enabled=true",
        "webhook.certManager.issuerRef.name=letsencrypt",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
    ]));
    assert!(!docs.iter().any(|d| d["kind"] == "Issuer"));
    let cert = docs.iter().find(|d| d["kind"] == "Certificate").unwrap();
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "ClusterIssuer");
}

/// The series names Prometheus scrapes from a registry's text: counters
/// end in `_total`, histograms in `_bucket`, `_sum` and `_count`.
fn scraped_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let docs = documents(&render(&[]));
    let dashboard = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the chart ships the dashboard ConfigMap");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["modelcache.json"].as_str().unwrap()).unwrap();
    // A controller with one ModelCache reported, so that its per-cache
    // families have a series (families without one are not exposed).
    let controller = modelcache::controller::metrics::Metrics::new();
    let info = modelcache::store::RedisInfo {
        used_memory: Some(1),
        maxmemory: Some(2),
        mem_fragmentation_ratio: Some(1.0),
        evicted_keys: Some(0),
        keyspace_hits: Some(1),
        keyspace_misses: Some(1),
        ..Default::default()
    };
    controller.cache("ml", "faq", true, 0, Some(&info));
    let known: std::collections::BTreeSet<String> = scraped_names(
        &(modelcache::gateway::metrics::Metrics::new("m", Default::default()).encode()
            + &controller.encode()),
    );
    for name in modelcache::gateway::metrics::NAMES {
        assert!(
            known.iter().any(|k| k.starts_with(name)),
            "{name} is not exported"
        );
    }
    let mut used = std::collections::BTreeSet::new();
    let panels = json["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let metrics: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("modelcache_"))
                .collect();
            assert!(!metrics.is_empty(), "{}: {expr}", panel["title"]);
            for m in metrics {
                assert!(known.contains(m), "{}: {m} is not a metric", panel["title"]);
                used.insert(m.to_owned());
            }
            // Labels the metrics do not carry would make empty panels.
            for label in ["tenant", "prompt", "user", "key"] {
                assert!(!expr.contains(&format!("{label}=")), "{expr}");
            }
        }
    }
    // Every gateway metric has a panel.
    for name in modelcache::gateway::metrics::NAMES {
        assert!(
            used.iter()
                .any(|u| u.starts_with(name.trim_end_matches("_total"))),
            "no panel shows {name}"
        );
    }
    // The variable's query reads a gateway metric too.
    let variable = json["templating"]["list"][1]["definition"]
        .as_str()
        .unwrap();
    assert!(variable.contains("modelcache_gateway_requests_total"));
}
