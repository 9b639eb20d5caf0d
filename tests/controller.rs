//! Reconcile against a faked API server (every request's method, path and
//! body asserted) and a real redis-server.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use modelcache::controller::metrics::Metrics;
use modelcache::controller::{Context, MANAGER, reconcile};
use modelcache::crd::ModelCache;
use serde_json::{Value, json};
use support::fake_api::{FakeApiServer, Recorded};
use support::{RedisServer, free_port};

const MC: &str = "/apis/modelcache.dev/v1alpha1/namespaces/ml/modelcaches/chat";
const POLICIES: &str = "/apis/modelcache.dev/v1alpha1/namespaces/ml/cachepolicies";
const SECRET: &str = "/api/v1/namespaces/ml/secrets/chat-redis";
const CONFIG_MAP: &str = "/api/v1/namespaces/ml/configmaps/chat-redis-config";
const STATEFUL_SET: &str = "/apis/apps/v1/namespaces/ml/statefulsets/chat-redis";
const SERVICE: &str = "/api/v1/namespaces/ml/services/chat-redis";
const HEADLESS: &str = "/api/v1/namespaces/ml/services/chat-redis-headless";
const NETWORK_POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/chat-redis";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";

fn model_cache(policy: Option<&str>) -> Value {
    let mut spec = json!({
        "model": "smollm2",
        "version": "v1",
        "source": {"uri": "s3://models/releases"},
        "redis": {"memory": "2Gi"}
    });
    if let Some(p) = policy {
        spec["cachePolicyRef"] = json!({"name": p});
    }
    json!({
        "apiVersion": "modelcache.dev/v1alpha1",
        "kind": "ModelCache",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "mc-uid-1", "generation": 1},
        "spec": spec
    })
}

fn policy(name: &str, eviction: &str, ratio: f64) -> Value {
    json!({
        "apiVersion": "modelcache.dev/v1alpha1",
        "kind": "CachePolicy",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"evictionPolicy": eviction, "maxmemoryRatio": ratio}
    })
}

fn context(client: &Client, redis_url: String) -> Arc<Context> {
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: Some("test".into()),
    };
    let mut ctx = Context::new(
        client.clone(),
        Arc::new(Metrics::new()),
        Recorder::new(client.clone(), reporter),
        Duration::from_secs(30),
    );
    ctx.redis_url_override = Some(redis_url);
    Arc::new(ctx)
}

/// Reconciles the ModelCache as currently stored, like the controller does
/// after a watch event.
async fn reconcile_stored(api: &FakeApiServer, ctx: &Arc<Context>) -> Action {
    let object: ModelCache =
        serde_json::from_value(api.get(MC).expect("stored ModelCache")).unwrap();
    reconcile(Arc::new(object), ctx.clone())
        .await
        .expect("reconcile")
}

fn lines(requests: &[Recorded]) -> Vec<String> {
    requests.iter().map(Recorded::line).collect()
}

fn body_of<'a>(requests: &'a [Recorded], method: &str, path: &str) -> &'a Value {
    requests
        .iter()
        .find(|r| r.method == method && r.path == path)
        .and_then(|r| r.body.as_ref())
        .unwrap_or_else(|| panic!("no {method} {path} in {:?}", lines(requests)))
}

fn condition(api: &FakeApiServer, type_: &str) -> Value {
    let mc = api.get(MC).unwrap();
    mc["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or_else(|| panic!("no {type_} condition in {}", mc["status"]))
}

/// A value of the generated Secret.
fn secret_value(api: &FakeApiServer, key: &str) -> String {
    let secret = api.get(SECRET).expect("the Secret was created");
    let encoded = secret["data"][key].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

/// A real redis-server with the users of the generated Secret's auth.conf,
/// as the provisioned pod runs; `url()` logs in as the controller does.
fn provisioned_redis(api: &FakeApiServer) -> RedisServer {
    RedisServer::start_with_users(
        &secret_value(api, "auth.conf"),
        modelcache::keyspace::acl::ADMIN_USER,
        &secret_value(api, "admin-password"),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Brings up the ModelCache: the first reconcile creates the objects (Redis is
/// not up yet), then a real redis-server starts with the generated users.
async fn bring_up(api: &FakeApiServer, client: &Client) -> (RedisServer, Arc<Context>) {
    let closed = format!("redis://127.0.0.1:{}", free_port());
    reconcile_stored(api, &context(client, closed)).await;
    let redis = provisioned_redis(api);
    let ctx = context(client, format!("redis://127.0.0.1:{}", redis.port()));
    reconcile_stored(api, &ctx).await;
    (redis, ctx)
}

#[tokio::test]
async fn first_reconcile_creates_everything_and_a_second_changes_nothing() {
    let (client, api) = FakeApiServer::start();
    api.insert(MC, model_cache(None));

    // Redis is not running yet: its pod would still be starting.
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let action = reconcile_stored(&api, &context(&client, closed)).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let first = api.take_requests();
    assert_eq!(
        lines(&first),
        vec![
            format!("GET {SECRET}"),
            "POST /api/v1/namespaces/ml/secrets".to_string(),
            // Each object is looked at before it is applied: someone
            // else's is never taken over.
            format!("GET {CONFIG_MAP}"),
            format!("PATCH {CONFIG_MAP}"),
            format!("GET {HEADLESS}"),
            format!("PATCH {HEADLESS}"),
            format!("GET {STATEFUL_SET}"),
            format!("PATCH {STATEFUL_SET}"),
            format!("GET {SERVICE}"),
            format!("PATCH {SERVICE}"),
            format!("GET {NETWORK_POLICY}"),
            format!("PATCH {NETWORK_POLICY}"),
            format!("PATCH {MC}/status"),
        ]
    );
    for r in first.iter().filter(|r| r.method == "PATCH") {
        assert!(
            r.query.contains("fieldManager=modelcache-controller")
                && r.query.contains("force=true"),
            "{r:?}"
        );
    }
    let config = body_of(&first, "PATCH", CONFIG_MAP);
    let conf = config["data"]["redis.conf"].as_str().unwrap();
    assert!(
        conf.contains("maxmemory 1717986918\n") && conf.contains("maxmemory-policy allkeys-lru\n"),
        "{conf}"
    );
    let sts = body_of(&first, "PATCH", STATEFUL_SET);
    let owner = &sts["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["uid"].as_str(), owner["controller"].as_bool()),
        (Some("mc-uid-1"), Some(true))
    );
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
        true
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["containers"][0]["resources"]["limits"]["memory"], "2Gi");
    assert_eq!(condition(&api, "Ready")["status"], "False");
    assert_eq!(condition(&api, "Ready")["reason"], "RedisUnavailable");
    let secret_before = api.get(SECRET).unwrap();
    // Only the ModelCache's clients and the controller reach the Redis.
    let policy = &body_of(&first, "PATCH", NETWORK_POLICY)["spec"];
    assert_eq!(policy["podSelector"], sts["spec"]["selector"]);
    assert_eq!(policy["policyTypes"], json!(["Ingress"]));
    let rule = &policy["ingress"][0];
    assert_eq!(rule["ports"], json!([{"port": 6379, "protocol": "TCP"}]));
    assert_eq!(
        rule["from"],
        json!([
            {"podSelector": {"matchLabels": {"modelcache.dev/client": "chat"}}},
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {
                "app.kubernetes.io/component": "controller",
                "app.kubernetes.io/name": "modelcache"}}},
        ])
    );

    // The Redis pod is up with the generated users.
    let redis = provisioned_redis(&api);
    let ctx = context(&client, format!("redis://127.0.0.1:{}", redis.port()));
    let action = reconcile_stored(&api, &ctx).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let second = api.take_requests();
    assert_eq!(
        lines(&second)[..12],
        [
            format!("GET {SECRET}"),
            format!("GET {CONFIG_MAP}"),
            format!("PATCH {CONFIG_MAP}"),
            format!("GET {HEADLESS}"),
            format!("PATCH {HEADLESS}"),
            format!("GET {STATEFUL_SET}"),
            format!("PATCH {STATEFUL_SET}"),
            format!("GET {SERVICE}"),
            format!("PATCH {SERVICE}"),
            format!("GET {NETWORK_POLICY}"),
            format!("PATCH {NETWORK_POLICY}"),
            format!("PATCH {MC}/status"),
        ]
    );
    for path in [CONFIG_MAP, HEADLESS, STATEFUL_SET, SERVICE, NETWORK_POLICY] {
        assert_eq!(
            body_of(&first, "PATCH", path),
            body_of(&second, "PATCH", path),
            "{path} changed"
        );
    }
    assert_eq!(
        api.get(SECRET).unwrap(),
        secret_before,
        "the password is never rotated"
    );
    assert_eq!(condition(&api, "Ready")["status"], "True");
    assert_eq!(condition(&api, "ConfigApplied")["status"], "True");
    assert_eq!(support::config_get(&redis, "maxmemory").await, "1717986918");
    let events: Vec<&Value> = second
        .iter()
        .filter(|r| r.path == EVENTS)
        .filter_map(|r| r.body.as_ref())
        .collect();
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        vec!["RedisReady", "ConfigApplied", "VersionLive"],
        "{events:?}"
    );
    let mc = api.get(MC).unwrap();
    assert_eq!(mc["status"]["activeVersion"], "v1");
    assert_eq!(mc["status"]["versions"][0]["phase"], "Live");

    // Nothing changed: the same applies, no creation, no Event.
    reconcile_stored(&api, &ctx).await;
    let third = api.take_requests();
    assert_eq!(
        lines(&third),
        vec![
            format!("GET {SECRET}"),
            format!("GET {CONFIG_MAP}"),
            format!("PATCH {CONFIG_MAP}"),
            format!("GET {HEADLESS}"),
            format!("PATCH {HEADLESS}"),
            format!("GET {STATEFUL_SET}"),
            format!("PATCH {STATEFUL_SET}"),
            format!("GET {SERVICE}"),
            format!("PATCH {SERVICE}"),
            format!("GET {NETWORK_POLICY}"),
            format!("PATCH {NETWORK_POLICY}"),
            format!("PATCH {MC}/status"),
        ]
    );
    for path in [CONFIG_MAP, HEADLESS, STATEFUL_SET, SERVICE, NETWORK_POLICY] {
        assert_eq!(
            body_of(&first, "PATCH", path),
            body_of(&third, "PATCH", path),
            "{path} changed"
        );
    }
    let text = ctx.metrics.encode();
    assert!(
        text.contains("modelcache_redis_ready{namespace=\"ml\",modelcache=\"chat\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_deleted_child_is_recreated() {
    let (client, api) = FakeApiServer::start();
    api.insert(MC, model_cache(None));
    let (_redis, ctx) = bring_up(&api, &client).await;
    let before = api.remove(STATEFUL_SET).expect("the StatefulSet exists");
    api.remove(SERVICE).expect("the Service exists");
    api.take_requests();

    reconcile_stored(&api, &ctx).await;
    let after = api
        .get(STATEFUL_SET)
        .expect("the StatefulSet was recreated");
    assert_eq!(after["spec"], before["spec"]);
    assert!(api.get(SERVICE).is_some(), "the Service was recreated");
    assert_eq!(condition(&api, "Ready")["status"], "True");
}

/// A StatefulSet from a release whose `serviceName` was the clients'
/// ClusterIP Service: the field cannot change in place (the API server
/// refuses the apply), so it is deleted with its pod left running (Orphan,
/// preconditioned on its uid), and the next reconcile creates it anew with
/// the headless Service; its pod template is unchanged, so the adopted pod
/// keeps its keys.
#[tokio::test]
async fn a_stateful_set_naming_the_clients_service_is_recreated_leaving_its_pod() {
    let (client, api) = FakeApiServer::start();
    api.insert(MC, model_cache(None));
    let (_redis, ctx) = bring_up(&api, &client).await;
    let current = api.get(STATEFUL_SET).unwrap();
    assert_eq!(current["spec"]["serviceName"], "chat-redis-headless");
    let headless = api.get(HEADLESS).expect("the headless Service exists");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(
        api.get(SERVICE).unwrap()["spec"]["type"],
        "ClusterIP",
        "clients keep their ClusterIP Service"
    );
    let mut old = current.clone();
    old["spec"]["serviceName"] = json!("chat-redis");
    api.insert(STATEFUL_SET, old.clone());
    let old_uid = api.get(STATEFUL_SET).unwrap()["metadata"]["uid"].clone();
    api.take_requests();

    reconcile_stored(&api, &ctx).await;
    let requests = api.take_requests();
    let delete = requests
        .iter()
        .find(|r| r.method == "DELETE")
        .unwrap_or_else(|| panic!("no DELETE in {:?}", lines(&requests)));
    assert_eq!(delete.path, STATEFUL_SET);
    let body = delete.body.as_ref().unwrap();
    assert_eq!(body["propagationPolicy"], "Orphan", "{body}");
    assert_eq!(body["preconditions"]["uid"], old_uid, "{body}");
    assert!(
        !lines(&requests).contains(&format!("PATCH {STATEFUL_SET}")),
        "the old StatefulSet is not applied to: {:?}",
        lines(&requests)
    );

    reconcile_stored(&api, &ctx).await;
    let created = api.get(STATEFUL_SET).expect("the StatefulSet was created");
    assert_eq!(created["spec"]["serviceName"], "chat-redis-headless");
    assert_eq!(created["spec"]["template"], old["spec"]["template"]);
    assert!(
        api.take_requests().iter().all(|r| r.method != "DELETE"),
        "one deletion only"
    );
}

#[tokio::test]
async fn a_policy_change_updates_the_running_config_without_a_restart() {
    let (client, api) = FakeApiServer::start();
    api.insert(
        &format!("{POLICIES}/faq"),
        policy("faq", "allkeys-lru", 0.8),
    );
    api.insert(MC, model_cache(Some("faq")));
    let (redis, ctx) = bring_up(&api, &client).await;
    assert_eq!(
        support::config_get(&redis, "maxmemory-policy").await,
        "allkeys-lru"
    );
    let before = api.take_requests();

    api.insert(
        &format!("{POLICIES}/faq"),
        policy("faq", "allkeys-lfu", 0.5),
    );
    reconcile_stored(&api, &ctx).await;
    let after = api.take_requests();
    assert_eq!(lines(&after)[0], format!("GET {POLICIES}/faq"));
    let conf = body_of(&after, "PATCH", CONFIG_MAP)["data"]["redis.conf"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        conf.contains("maxmemory-policy allkeys-lfu\n") && conf.contains("maxmemory 1073741824\n"),
        "{conf}"
    );
    // The pod template did not change, so the Redis pod keeps its keys.
    assert_eq!(
        body_of(&before, "PATCH", STATEFUL_SET),
        body_of(&after, "PATCH", STATEFUL_SET)
    );
    // The running Redis has the new config, read back.
    assert_eq!(
        support::config_get(&redis, "maxmemory-policy").await,
        "allkeys-lfu"
    );
    assert_eq!(support::config_get(&redis, "maxmemory").await, "1073741824");
    let status = &api.get(MC).unwrap()["status"]["redis"];
    assert_eq!(status["appliedConfig"]["maxmemory-policy"], "allkeys-lfu");
    assert_eq!(status["desiredConfig"]["maxmemory"], "1073741824");
    let applied = condition(&api, "ConfigApplied");
    assert!(
        applied["message"]
            .as_str()
            .unwrap()
            .contains("maxmemory-policy"),
        "{applied}"
    );
}

#[tokio::test]
async fn an_invalid_spec_sets_the_condition_and_creates_no_children() {
    let (client, api) = FakeApiServer::start();
    api.insert(MC, model_cache(Some("missing")));
    let ctx = context(&client, format!("redis://127.0.0.1:{}", free_port()));
    let action = reconcile_stored(&api, &ctx).await;
    assert_eq!(
        action,
        Action::await_change(),
        "an invalid spec waits for a change"
    );
    let requests = api.take_requests();
    assert_eq!(
        lines(&requests),
        vec![
            format!("GET {POLICIES}/missing"),
            format!("PATCH {MC}/status"),
            format!("POST {EVENTS}"),
        ]
    );
    let valid = condition(&api, "SpecValid");
    assert_eq!(
        (valid["status"].as_str(), valid["reason"].as_str()),
        (Some("False"), Some("PolicyNotFound"))
    );
    assert!(
        valid["message"]
            .as_str()
            .unwrap()
            .contains("spec.cachePolicyRef.name"),
        "{valid}"
    );
    let event = body_of(&requests, "POST", EVENTS);
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("PolicyNotFound"))
    );
    for path in [SECRET, CONFIG_MAP, STATEFUL_SET, SERVICE] {
        assert!(api.get(path).is_none(), "{path} must not exist");
    }

    // Too little memory is invalid too, and still creates nothing.
    let mut tiny = model_cache(None);
    tiny["spec"]["redis"]["memory"] = json!("32Mi");
    tiny["metadata"]["generation"] = json!(2);
    api.insert(MC, tiny);
    reconcile_stored(&api, &ctx).await;
    let requests = api.take_requests();
    assert!(
        requests
            .iter()
            .all(|r| r.path == format!("{MC}/status") || r.path == EVENTS),
        "{:?}",
        lines(&requests)
    );
    let valid = condition(&api, "SpecValid");
    assert_eq!(valid["reason"], "RedisMemoryInvalid");
    assert!(
        valid["message"].as_str().unwrap().contains("at least 64Mi"),
        "{valid}"
    );
}

#[tokio::test]
async fn an_external_redis_gets_no_objects_and_is_reported_plainly() {
    let (client, api) = FakeApiServer::start();
    // A managed Redis: CONFIG renamed away, password from the user's Secret.
    let redis =
        RedisServer::start_with_args(Some("managed-pw"), &["--rename-command", "CONFIG", ""])
            .unwrap_or_else(|e| panic!("{e}"));
    api.insert(
        "/api/v1/namespaces/ml/secrets/managed-redis",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "managed-redis", "namespace": "ml",
                            "annotations": {"modelcache.dev/allowed-modelcaches": "chat"}},
               "data": {"password": base64::engine::general_purpose::STANDARD.encode("managed-pw")}}),
    );
    let mut mc = model_cache(None);
    mc["spec"]["redis"] = json!({"external": {
        "url": format!("redis://127.0.0.1:{}", redis.port()),
        "passwordSecretRef": {"name": "managed-redis", "key": "password"}
    }});
    api.insert(MC, mc);
    let ctx = context(&client, "redis://unused:1".into());
    reconcile_stored(&api, &ctx).await;
    let requests = api.take_requests();
    assert_eq!(
        lines(&requests)[..2],
        [
            "GET /api/v1/namespaces/ml/secrets/managed-redis".to_string(),
            format!("PATCH {MC}/status"),
        ]
    );
    for path in [SECRET, CONFIG_MAP, STATEFUL_SET, SERVICE] {
        assert!(
            api.get(path).is_none(),
            "{path} must not exist for an external Redis"
        );
    }
    let applied = condition(&api, "ConfigApplied");
    assert_eq!(
        (applied["status"].as_str(), applied["reason"].as_str()),
        (Some("Unknown"), Some("ConfigUnreadable"))
    );
    assert!(
        applied["message"].as_str().unwrap().contains("forbids it"),
        "{applied}"
    );
    assert_eq!(condition(&api, "Ready")["status"], "True");
    let status = &api.get(MC).unwrap()["status"]["redis"];
    assert!(
        status["usedMemoryBytes"].as_i64().unwrap() > 0,
        "INFO is still read: {status}"
    );
}

const PODS: &str = "/api/v1/namespaces/ml/pods";

/// Reasons of the Events posted since the last look, in order.
fn event_reasons(api: &FakeApiServer) -> Vec<String> {
    api.take_requests()
        .iter()
        .filter(|r| r.path == EVENTS)
        .filter_map(|r| {
            r.body
                .as_ref()
                .map(|b| b["reason"].as_str().unwrap().to_string())
        })
        .collect()
}

fn pod(name: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "ml", "labels": {"app": "chat", "modelcache.dev/version": version}},
           "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
           "status": {"phase": "Running"}})
}

fn set_version(api: &FakeApiServer, version: &str) {
    let mut mc = api.get(MC).unwrap();
    mc["spec"]["version"] = json!(version);
    mc["metadata"]["generation"] = json!(mc["metadata"]["generation"].as_i64().unwrap() + 1);
    api.insert(MC, mc);
}

fn phase(api: &FakeApiServer, version: &str) -> Option<String> {
    api.get(MC).unwrap()["status"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == version)
        .map(|v| v["phase"].as_str().unwrap().to_string())
}

async fn populate(redis: &RedisServer, version: &str, n: usize) {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.set(
            modelcache::keyspace::keys::entry(
                "smollm2",
                version,
                modelcache::keyspace::keys::Layer::Result,
                &format!("{i:x}"),
            ),
            i,
        )
        .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
}

async fn count(redis: &RedisServer, version: &str) -> u64 {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    modelcache::keyspace::sweep::count_version(&mut conn, "smollm2", version, 1000)
        .await
        .unwrap()
}

fn rollout_fixture(grace: i64) -> (Client, FakeApiServer) {
    let (client, api) = FakeApiServer::start();
    let mut p = policy("rollout", "allkeys-lru", 0.8);
    p["spec"]["invalidation"] = json!({"gracePeriodSeconds": grace});
    api.insert(&format!("{POLICIES}/rollout"), p);
    api.insert(
        "/apis/apps/v1/namespaces/ml/deployments/chat",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat", "namespace": "ml"},
               "spec": {"selector": {"matchLabels": {"app": "chat"}}, "template": {}}}),
    );
    let mut mc = model_cache(Some("rollout"));
    mc["spec"]["workload"] = json!({"kind": "Deployment", "name": "chat"});
    api.insert(MC, mc);
    api.insert(&format!("{PODS}/p1"), pod("p1", "v1"));
    (client, api)
}

/// The Redis admits the pods of the workload a ModelCache names, by that
/// Deployment's selector, besides the webhook-labelled clients and the
/// controller.
#[tokio::test]
async fn the_redis_admits_the_pods_of_the_named_workload() {
    let (client, api) = rollout_fixture(0);
    let closed = format!("redis://127.0.0.1:{}", free_port());
    reconcile_stored(&api, &context(&client, closed)).await;
    let requests = api.take_requests();
    let from = &body_of(&requests, "PATCH", NETWORK_POLICY)["spec"]["ingress"][0]["from"];
    assert_eq!(
        from[0]["podSelector"]["matchLabels"],
        json!({"modelcache.dev/client": "chat"})
    );
    assert_eq!(
        from[1],
        json!({"podSelector": {"matchLabels": {"app": "chat"}}})
    );
    assert_eq!(from.as_array().unwrap().len(), 3, "{from}");
}

#[tokio::test]
async fn a_rollout_sweeps_the_retired_version_once_no_pod_serves_it() {
    let (client, api) = rollout_fixture(0);
    let (redis, ctx) = bring_up(&api, &client).await;
    assert_eq!(phase(&api, "v1").as_deref(), Some("Live"));
    populate(&redis, "v1", 5000).await;
    populate(&redis, "v2", 300).await;

    // Rolling update: v2 pods join, v1 pods still serve.
    set_version(&api, "v2");
    api.insert(&format!("{PODS}/p2"), pod("p2", "v2"));
    reconcile_stored(&api, &ctx).await;
    assert_eq!(
        (phase(&api, "v1").as_deref(), phase(&api, "v2").as_deref()),
        (Some("Live"), Some("Live"))
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let state = modelcache::keyspace::registry::read(&mut conn, "smollm2")
        .await
        .unwrap();
    assert_eq!(
        state.active.as_deref(),
        Some("v2"),
        "the new spec.version is published"
    );
    assert_eq!(
        state.live.iter().map(String::as_str).collect::<Vec<_>>(),
        vec!["v1", "v2"]
    );
    assert_eq!(
        count(&redis, "v1").await,
        5000,
        "nothing is swept while a pod serves v1"
    );

    // The last v1 pod goes: Draining, then (grace 0) Sweeping, then Swept.
    api.remove(&format!("{PODS}/p1"));
    let action = reconcile_stored(&api, &ctx).await;
    assert_eq!(phase(&api, "v1").as_deref(), Some("Draining"));
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(5)),
        "a draining version is looked at soon"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while phase(&api, "v1").as_deref() != Some("Swept") {
        assert!(
            std::time::Instant::now() < deadline,
            "v1 not swept: {}",
            api.get(MC).unwrap()["status"]["versions"]
        );
        reconcile_stored(&api, &ctx).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&redis, "v1").await, 0);
    assert_eq!(
        count(&redis, "v2").await,
        300,
        "the live version keeps every key"
    );
    let v1 = api.get(MC).unwrap()["status"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == "v1")
        .cloned()
        .unwrap();
    assert_eq!(v1["keys"], 5000);
    let state = modelcache::keyspace::registry::read(&mut conn, "smollm2")
        .await
        .unwrap();
    assert_eq!(
        state.live.iter().map(String::as_str).collect::<Vec<_>>(),
        vec!["v2"],
        "v1 is retired in the registry"
    );
    let reasons = event_reasons(&api);
    for wanted in ["VersionDraining", "SweepStarted", "VersionSwept"] {
        assert!(
            reasons.iter().any(|r| r == wanted),
            "no {wanted} Event in {reasons:?}"
        );
    }
}

#[tokio::test]
async fn a_rollback_cancels_the_pending_sweep() {
    let (client, api) = rollout_fixture(3600);
    let (redis, ctx) = bring_up(&api, &client).await;
    populate(&redis, "v1", 1000).await;
    set_version(&api, "v2");
    api.insert(&format!("{PODS}/p2"), pod("p2", "v2"));
    api.remove(&format!("{PODS}/p1"));
    reconcile_stored(&api, &ctx).await;
    assert_eq!(phase(&api, "v1").as_deref(), Some("Draining"));
    // A draining version's keys are counted once, in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let versions = api.get(MC).unwrap()["status"]["versions"].clone();
        let v1 = versions
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == "v1")
            .cloned()
            .unwrap();
        if v1["keys"] == 1000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "v1's keys were not counted: {v1}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        reconcile_stored(&api, &ctx).await;
    }

    // Roll back before the grace period ends.
    set_version(&api, "v1");
    api.insert(&format!("{PODS}/p1"), pod("p1", "v1"));
    api.remove(&format!("{PODS}/p2"));
    api.take_requests();
    reconcile_stored(&api, &ctx).await;
    assert_eq!(phase(&api, "v1").as_deref(), Some("Live"));
    assert_eq!(phase(&api, "v2").as_deref(), Some("Draining"));
    assert_eq!(
        count(&redis, "v1").await,
        1000,
        "the rollback finds v1's cache warm"
    );
    let reasons = event_reasons(&api);
    assert!(
        reasons.contains(&"SweepCancelled".to_string()),
        "{reasons:?}"
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let state = modelcache::keyspace::registry::read(&mut conn, "smollm2")
        .await
        .unwrap();
    assert_eq!(state.active.as_deref(), Some("v1"));
}

#[tokio::test]
async fn inline_warmup_prompts_are_applied_as_a_config_map_for_the_pods() {
    let (client, api) = FakeApiServer::start();
    let mut mc = model_cache(None);
    mc["spec"]["warmup"] = json!({"prompts": ["You are a bot.\nBe brief.", "Second"]});
    api.insert(MC, mc);
    let closed = format!("redis://127.0.0.1:{}", free_port());
    reconcile_stored(&api, &context(&client, closed)).await;
    let requests = api.take_requests();
    let path = "/api/v1/namespaces/ml/configmaps/chat-warmup";
    assert!(
        lines(&requests).contains(&format!("PATCH {path}")),
        "{:?}",
        lines(&requests)
    );
    let cm = body_of(&requests, "PATCH", path);
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "mc-uid-1");
    let jsonl = cm["data"]["prompts.jsonl"].as_str().unwrap();
    assert_eq!(
        modelcache::warm::prompts::parse(jsonl).unwrap(),
        vec!["You are a bot.\nBe brief.", "Second"]
    );
}

/// Inline CDN headers become a ConfigMap that the injected fetch container
/// mounts, so that their values are in neither the webhook's answer nor the
/// pod spec; a header name that cannot be a file name is an invalid spec.
#[tokio::test]
async fn inline_cdn_headers_are_applied_as_a_config_map_and_bad_names_are_invalid() {
    let (client, api) = FakeApiServer::start();
    let mut mc = model_cache(None);
    mc["spec"]["source"] = json!({
        "uri": "https://d111111abcdef8.cloudfront.net/models",
        "cdn": {"headers": {"X-Tenant": "acme"}}
    });
    api.insert(MC, mc.clone());
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let ctx = context(&client, closed);
    reconcile_stored(&api, &ctx).await;
    let requests = api.take_requests();
    let path = "/api/v1/namespaces/ml/configmaps/chat-cdn-headers";
    let cm = body_of(&requests, "PATCH", path);
    assert_eq!(cm["data"], json!({"X-Tenant": "acme"}));
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "mc-uid-1");

    mc["spec"]["source"]["cdn"]["headers"] = json!({"X Tenant": "acme"});
    api.insert(MC, mc);
    reconcile_stored(&api, &ctx).await;
    let spec_valid = condition(&api, "SpecValid");
    assert_eq!(spec_valid["status"], "False");
    assert_eq!(spec_valid["reason"], "CdnHeaderInvalid");
    assert!(
        spec_valid["message"]
            .as_str()
            .unwrap()
            .contains("\"X Tenant\""),
        "{spec_valid}"
    );
}

/// With leader election off (`leaderElection.enabled: false` in the chart)
/// the controller must reconcile until it is stopped. It once stopped at
/// start instead: the lost-lease signal fired when no elector held its sender.
#[tokio::test]
async fn without_leader_election_the_controller_reconciles_until_stopped() {
    use modelcache::controller::{ControllerConfig, run_with_client};
    let (client, api) = FakeApiServer::start();
    api.insert(MC, model_cache(None));
    let config = ControllerConfig {
        namespace: Some("ml".into()),
        http_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        health_interval: Duration::from_secs(30),
        leader_election: false,
        lease_namespace: "modelcache-system".into(),
        lease_name: "modelcache".into(),
        identity: "test".into(),
        lease_duration: Duration::from_secs(15),
        redis_url_override: Some(format!("redis://127.0.0.1:{}", free_port())),
        webhook: None,
        image: None,
        node_agents: None,
    };
    let controller = tokio::spawn(run_with_client(client, config));
    let status = format!("PATCH {MC}/status");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !seen.contains(&status) {
        assert!(
            !controller.is_finished(),
            "the controller stopped by itself: {seen:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconcile within 60 s: {seen:?}"
        );
        seen.extend(lines(&api.take_requests()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !controller.is_finished(),
        "it keeps running after a reconcile"
    );
    controller.abort();
}

/// Someone who may create ModelCaches but not read Secrets must not get the
/// controller to send a Secret of the namespace to a host of their choice as
/// a Redis password. A Secret is used only when its owner allows this
/// ModelCache by annotation; otherwise the spec is invalid and nothing is
/// sent anywhere.
#[tokio::test]
async fn a_secret_is_sent_to_an_external_redis_only_when_it_allows_the_modelcache() {
    let (client, api) = FakeApiServer::start();
    let secret_path = "/api/v1/namespaces/ml/secrets/db-credentials";
    let secret = |annotations: Value| {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "db-credentials", "namespace": "ml", "annotations": annotations},
               "data": {"password": base64::engine::general_purpose::STANDARD.encode("db-secret")}})
    };
    api.insert(secret_path, secret(json!({})));
    // The "Redis" of whoever wrote the spec: it records what it is sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut mc = model_cache(None);
    mc["spec"]["redis"] = json!({"external": {
        "url": format!("redis://{}", listener.local_addr().unwrap()),
        "passwordSecretRef": {"name": "db-credentials", "key": "password"}
    }});
    api.insert(MC, mc);
    let ctx = context(&client, "redis://unused:1".into());

    let action = reconcile_stored(&api, &ctx).await;
    assert_eq!(action, Action::await_change());
    let valid = condition(&api, "SpecValid");
    assert_eq!(
        (valid["status"].as_str(), valid["reason"].as_str()),
        (Some("False"), Some("SecretNotAllowed"))
    );
    let message = valid["message"].as_str().unwrap();
    assert!(
        message.contains("modelcache.dev/allowed-modelcaches") && !message.contains("db-secret"),
        "{message}"
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing may reach the spec's host"
    );

    // A list that names another ModelCache does not allow this one either.
    api.insert(
        secret_path,
        secret(json!({"modelcache.dev/allowed-modelcaches": "other, more"})),
    );
    reconcile_stored(&api, &ctx).await;
    assert_eq!(condition(&api, "SpecValid")["reason"], "SecretNotAllowed");

    // The Secret's owner allows it: now the controller connects.
    api.insert(
        secret_path,
        secret(json!({"modelcache.dev/allowed-modelcaches": "other, chat"})),
    );
    let reconciled = tokio::spawn({
        let (api, ctx) = (api.clone(), ctx.clone());
        async move { reconcile_stored(&api, &ctx).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no connection within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    drop(stream);
    reconciled.await.unwrap();
    assert_eq!(condition(&api, "SpecValid")["status"], "True");
}

/// Server-side apply with `force` would take over an object of the same name
/// that someone else made, and the owner reference would have it deleted with
/// the ModelCache. It is refused instead, with a condition that says what to
/// do, and looked at again at the health interval (its removal is no event
/// of ours).
#[tokio::test]
async fn an_object_of_the_same_name_made_by_someone_else_is_not_taken_over() {
    let (client, api) = FakeApiServer::start();
    let theirs = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "chat-redis", "namespace": "ml", "labels": {"app": "their-redis"}},
        "spec": {"serviceName": "chat-redis", "selector": {"matchLabels": {"app": "their-redis"}},
                 "template": {"metadata": {"labels": {"app": "their-redis"}}, "spec": {"containers": []}}}});
    api.insert(STATEFUL_SET, theirs);
    let before = api.get(STATEFUL_SET).unwrap();
    api.insert(MC, model_cache(None));
    let ctx = context(&client, format!("redis://127.0.0.1:{}", free_port()));

    let action = reconcile_stored(&api, &ctx).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let requests = api.take_requests();
    assert!(
        !lines(&requests).contains(&format!("PATCH {STATEFUL_SET}")),
        "{:?}",
        lines(&requests)
    );
    assert_eq!(
        api.get(STATEFUL_SET).unwrap(),
        before,
        "their object is untouched"
    );
    let valid = condition(&api, "SpecValid");
    assert_eq!(
        (valid["status"].as_str(), valid["reason"].as_str()),
        (Some("False"), Some("ObjectNotOurs"))
    );
    let message = valid["message"].as_str().unwrap();
    assert!(
        message.contains("StatefulSet ml/chat-redis") && message.contains("delete or rename"),
        "{message}"
    );

    // A Secret of the generated Secret's name is not used either.
    api.remove(STATEFUL_SET);
    api.remove(SECRET);
    api.insert(
        SECRET,
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "chat-redis", "namespace": "ml"},
        "data": {"password": base64::engine::general_purpose::STANDARD.encode("not-ours")}}),
    );
    reconcile_stored(&api, &ctx).await;
    let valid = condition(&api, "SpecValid");
    assert_eq!(valid["reason"], "ObjectNotOurs");
    assert!(
        valid["message"]
            .as_str()
            .unwrap()
            .contains("Secret ml/chat-redis")
    );
    assert!(
        api.get(STATEFUL_SET).is_none(),
        "nothing is built on their Secret"
    );
}

/// A context whose controller knows its image (a standalone gateway runs it).
fn context_with_image(client: &Client, redis_url: String) -> Arc<Context> {
    let mut ctx = Arc::into_inner(context(client, redis_url)).unwrap();
    ctx.image = Some("modelcache:test".into());
    Arc::new(ctx)
}

#[tokio::test]
async fn a_standalone_gateway_gets_its_objects_and_its_counters_reach_the_status() {
    let (client, api) = FakeApiServer::start();
    let mut mc = model_cache(Some("faq"));
    mc["spec"]["gateway"] = json!({
        "mode": "Standalone",
        "upstreamUrl": "https://api.openai.com",
        "upstreamKeySecretRef": {"name": "openai", "key": "api-key"},
        "price": {"inputPer1k": 0.03, "outputPer1k": 0.06}
    });
    api.insert(MC, mc);
    let mut faq = policy("faq", "allkeys-lru", 0.8);
    faq["spec"]["gateway"] = json!({"sharing": "Shared"});
    api.insert(&format!("{POLICIES}/faq"), faq);

    // Without its image the controller cannot run a standalone gateway.
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let _ = reconcile(
        Arc::new(serde_json::from_value(api.get(MC).unwrap()).unwrap()),
        context(&client, closed.clone()),
    )
    .await;
    assert_eq!(
        condition(&api, "SpecValid")["reason"],
        "GatewayImageUnknown"
    );
    api.take_requests();

    reconcile_stored(&api, &context_with_image(&client, closed)).await;
    let requests = api.take_requests();
    let seen = lines(&requests);
    for path in [
        "/api/v1/namespaces/ml/configmaps/chat-gateway",
        "/apis/apps/v1/namespaces/ml/deployments/chat-gateway",
        "/api/v1/namespaces/ml/services/chat-gateway",
    ] {
        assert!(seen.contains(&format!("PATCH {path}")), "{path}: {seen:?}");
    }
    assert!(
        seen.contains(&"POST /api/v1/namespaces/ml/secrets".to_string()),
        "{seen:?}"
    );
    let config = body_of(
        &requests,
        "PATCH",
        "/api/v1/namespaces/ml/configmaps/chat-gateway",
    );
    assert_eq!(config["data"]["MODELCACHE_GATEWAY_SHARING"], "shared");
    let deployment = body_of(
        &requests,
        "PATCH",
        "/apis/apps/v1/namespaces/ml/deployments/chat-gateway",
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "modelcache:test");
    assert_eq!(container["args"], json!(["gateway", "--follow-registry"]));
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["uid"],
        "mc-uid-1"
    );
    let gateway_secret = api
        .get("/api/v1/namespaces/ml/secrets/chat-gateway")
        .expect("the gateway Secret");
    assert!(gateway_secret["data"]["secret"].as_str().unwrap().len() >= 32);

    // The gateways add their counts to Redis as the serving user; the next
    // reconcile reports them.
    let redis = provisioned_redis(&api);
    let serving = format!(
        "redis://:{}@127.0.0.1:{}",
        secret_value(&api, "password"),
        redis.port()
    );
    let mut conn = redis::Client::open(serving)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let _: () = redis::pipe()
        .cmd("HINCRBY")
        .arg("mc:~{smollm2}:gateway")
        .arg("requests")
        .arg(10)
        .ignore()
        .cmd("HINCRBY")
        .arg("mc:~{smollm2}:gateway")
        .arg("hits")
        .arg(7)
        .ignore()
        .cmd("HINCRBY")
        .arg("mc:~{smollm2}:gateway")
        .arg("tokens_saved")
        .arg(420)
        .ignore()
        .cmd("HINCRBY")
        .arg("mc:~{smollm2}:gateway")
        .arg("cost_saved_micros")
        .arg(12_600)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let ctx = context_with_image(&client, format!("redis://127.0.0.1:{}", redis.port()));
    reconcile_stored(&api, &ctx).await;
    let status = &api.get(MC).unwrap()["status"]["gateway"];
    assert_eq!(status["requests"], 10);
    assert_eq!(status["hits"], 7);
    assert_eq!(status["hitRate"], 0.7);
    assert_eq!(status["tokensSaved"], 420);
    assert_eq!(status["costSaved"], 0.0126);
    assert_eq!(status["endpoint"], "http://chat-gateway.ml.svc:8090/v1");
    assert_eq!(status["readyReplicas"], 0);
}

/// `modelcache publish` of a small model as `m`/`version` to
/// `s3://models/prod` on `s3`; returns the manifest's digest.
fn publish_to(s3: &support::S3Server, version: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = support::model_dir(tmp.path(), 3, 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .args([
            "publish",
            "--dir",
            dir.to_str().unwrap(),
            "--to",
            "s3://models/prod",
        ])
        .args(["--model", "m", "--version", version, "--path-style"])
        .args(["--endpoint", &s3.endpoint()])
        .env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
        .env("AWS_REGION", &s3.region)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    summary["manifestDigest"].as_str().unwrap().to_owned()
}

fn digest_in_status(api: &FakeApiServer, version: &str) -> Option<String> {
    api.get(MC).unwrap()["status"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["version"] == version)?["manifestDigest"]
        .as_str()
        .map(str::to_owned)
}

/// The controller pins each live version's manifest digest in status, read
/// from the source once with the keys of the ModelCache's credentials
/// Secret (s3s-fs checks every signature), and reads nothing for a version
/// it has pinned.
#[tokio::test]
async fn a_live_versions_manifest_digest_is_read_once_with_the_secrets_keys() {
    let s3 = support::S3Server::s3s_fs().unwrap_or_else(|e| panic!("{e}"));
    s3.create_bucket("models").await;
    let v1 = publish_to(&s3, "v1");
    let proxy = support::proxy::Proxy::start(s3.port(), Default::default())
        .await
        .unwrap();

    let (client, api) = FakeApiServer::start();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.insert(
        "/api/v1/namespaces/ml/secrets/models-s3",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "models-s3", "namespace": "ml"},
               "data": {"AWS_ACCESS_KEY_ID": b64(&s3.access_key),
                        "AWS_SECRET_ACCESS_KEY": b64(&s3.secret_key)}}),
    );
    let mut mc = model_cache(None);
    mc["spec"]["model"] = json!("m");
    mc["spec"]["source"] = json!({
        "uri": "s3://models/prod", "endpoint": proxy.endpoint(), "pathStyle": true,
        "region": s3.region, "credentialsSecretRef": {"name": "models-s3"}
    });
    api.insert(MC, mc);
    let (_redis, ctx) = bring_up(&api, &client).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while digest_in_status(&api, "v1").is_none() {
        assert!(std::time::Instant::now() < deadline, "v1 was never pinned");
        tokio::time::sleep(Duration::from_millis(100)).await;
        reconcile_stored(&api, &ctx).await;
    }
    assert_eq!(digest_in_status(&api, "v1"), Some(v1.clone()));
    let manifest_reads = || proxy.stats.requests_for("/prod/m/v1/manifest.json");
    assert_eq!(manifest_reads(), 1, "read once");
    for _ in 0..3 {
        reconcile_stored(&api, &ctx).await;
    }
    assert_eq!(manifest_reads(), 1, "a pinned version is not read again");
    assert_eq!(digest_in_status(&api, "v1"), Some(v1));

    // Keys the store refuses: no digest, and the version stays unpinned
    // (its fetches read the manifest from the source themselves).
    let v2 = publish_to(&s3, "v2");
    api.insert(
        "/api/v1/namespaces/ml/secrets/models-s3",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "models-s3", "namespace": "ml"},
               "data": {"AWS_ACCESS_KEY_ID": b64(&s3.access_key),
                        "AWS_SECRET_ACCESS_KEY": b64("wrong")}}),
    );
    set_version(&api, "v2");
    for _ in 0..20 {
        reconcile_stored(&api, &ctx).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        proxy.stats.requests_for("/prod/m/v2/manifest.json") >= 1,
        "v2 was tried"
    );
    assert_eq!(digest_in_status(&api, "v2"), None, "not {v2}");
    assert_eq!(phase(&api, "v2").as_deref(), Some("Live"));
}

/// With `spec.prefetch` and no node selector of its own, the status tells
/// the node agents where the workload's pods may run (its pod template's
/// nodeSelector and required node affinity); with no agents known,
/// `Prefetched` says no node holds it.
#[tokio::test]
async fn prefetch_reports_the_workloads_placement_for_the_agents() {
    let (client, api) = rollout_fixture(0);
    let affinity = json!({"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "gpu", "operator": "In", "values": ["a100"]}]}]});
    api.insert(
        "/apis/apps/v1/namespaces/ml/deployments/chat",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat", "namespace": "ml"},
               "spec": {"selector": {"matchLabels": {"app": "chat"}},
                        "template": {"spec": {
                            "nodeSelector": {"pool": "inference"},
                            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": affinity}},
                            "containers": [{"name": "engine", "image": "vllm"}]}}}}),
    );
    let mut mc = api.get(MC).unwrap();
    mc["spec"]["prefetch"] = json!({});
    api.insert(MC, mc);
    let (_redis, _ctx) = bring_up(&api, &client).await;
    let status = &api.get(MC).unwrap()["status"];
    assert_eq!(
        status["prefetch"]["nodeSelector"],
        json!({"pool": "inference"})
    );
    assert_eq!(status["prefetch"]["nodeAffinity"], affinity);
    assert_eq!(status["prefetch"]["nodes"], "0/0");
    let c = condition(&api, "Prefetched");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("NoNodes"))
    );

    // A selector of its own: the workload's placement is not needed.
    let mut mc = api.get(MC).unwrap();
    mc["spec"]["prefetch"] = json!({"nodeSelector": {"gpu": "h100"}});
    api.insert(MC, mc);
    let closed = format!("redis://127.0.0.1:{}", free_port());
    reconcile_stored(&api, &context(&client, closed)).await;
    assert!(
        api.get(MC).unwrap()["status"]["prefetch"]
            .get("nodeSelector")
            .is_none()
    );
}
