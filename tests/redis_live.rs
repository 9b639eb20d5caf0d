//! Live config and health against a real redis-server: CONFIG SET applied and
//! verified, drift found and fixed, INFO parsed into status fields.

mod support;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use modelcache::controller::reconcile::observe;
use modelcache::controller::status::{CONFIG_APPLIED, READY, model_cache_status};
use modelcache::crd::cache_policy::{CachePolicySpec, EvictionPolicy};
use modelcache::crd::condition::condition_status;
use modelcache::store::live::{self, LiveError, RedisTarget};
use modelcache::store::settings::{desired_config, resolve};
use support::RedisServer;

fn desired(policy: EvictionPolicy, ratio: f64, memory: &str) -> BTreeMap<String, String> {
    let mut spec = CachePolicySpec {
        eviction_policy: policy,
        maxmemory_ratio: ratio,
        ..Default::default()
    };
    spec.redis.memory = Quantity(memory.into());
    desired_config(&resolve(&spec, None).unwrap())
}

fn target(redis: &RedisServer) -> RedisTarget {
    RedisTarget {
        url: format!("redis://127.0.0.1:{}", redis.port()),
        username: None,
        password: redis.password.clone(),
    }
}

async fn config_set(redis: &RedisServer, key: &str, value: &str) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn config_is_applied_verified_and_drift_is_fixed() {
    let redis = RedisServer::start_with(Some("pw"), &[]).unwrap_or_else(|e| panic!("{e}"));
    let want = desired(EvictionPolicy::AllkeysLru, 0.8, "2Gi");
    let t = target(&redis);
    let mut conn = t.connect().await.unwrap();

    let first = live::reconcile_config(&mut conn, &t.url, &want, true)
        .await
        .unwrap();
    assert!(first.converged(), "{first:?}");
    assert!(
        first.changed.contains(&"maxmemory".to_string()),
        "{first:?}"
    );
    assert_eq!(first.applied, want);
    // Verified independently of the code under test.
    assert_eq!(support::config_get(&redis, "maxmemory").await, "1717986918");
    assert_eq!(
        support::config_get(&redis, "maxmemory-policy").await,
        "allkeys-lru"
    );
    assert_eq!(
        support::config_get(&redis, "lazyfree-lazy-eviction").await,
        "yes"
    );

    let again = live::reconcile_config(&mut conn, &t.url, &want, true)
        .await
        .unwrap();
    assert!(
        again.changed.is_empty(),
        "a converged Redis needs no CONFIG SET: {again:?}"
    );

    // Someone changes the config by hand.
    config_set(&redis, "maxmemory-policy", "noeviction").await;
    config_set(&redis, "maxmemory", "0").await;
    let fixed = live::reconcile_config(&mut conn, &t.url, &want, true)
        .await
        .unwrap();
    assert_eq!(fixed.changed, vec!["maxmemory", "maxmemory-policy"]);
    assert_eq!(fixed.before["maxmemory-policy"], "noeviction");
    assert!(fixed.converged());
    assert_eq!(
        support::config_get(&redis, "maxmemory-policy").await,
        "allkeys-lru"
    );

    // A policy change reaches the running Redis without a restart.
    let lfu = desired(EvictionPolicy::AllkeysLfu, 0.5, "2Gi");
    let changed = live::reconcile_config(&mut conn, &t.url, &lfu, true)
        .await
        .unwrap();
    assert_eq!(changed.changed, vec!["maxmemory", "maxmemory-policy"]);
    assert_eq!(
        support::config_get(&redis, "maxmemory").await,
        (1u64 << 30).to_string()
    );
    assert_eq!(
        support::config_get(&redis, "maxmemory-policy").await,
        "allkeys-lfu"
    );
}

#[tokio::test]
async fn a_redis_we_do_not_own_is_only_compared() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let want = desired(EvictionPolicy::AllkeysLru, 0.8, "1Gi");
    let t = target(&redis);
    let mut conn = t.connect().await.unwrap();
    let outcome = live::reconcile_config(&mut conn, &t.url, &want, false)
        .await
        .unwrap();
    assert!(outcome.changed.is_empty());
    assert!(
        outcome
            .still_differs
            .contains(&"maxmemory-policy".to_string()),
        "{outcome:?}"
    );
    assert_eq!(
        support::config_get(&redis, "maxmemory-policy").await,
        "noeviction",
        "nothing was set"
    );
}

/// The serving password of a provisioned Redis may not run CONFIG (it is in
/// `@dangerous`): the error says which user may, so `check-redis` with the
/// wrong password points at the right one.
#[tokio::test]
async fn config_refused_to_the_serving_user_names_the_admin_user() {
    let conf = modelcache::keyspace::acl::auth_conf("chat", "admin-pw", "serving-pw");
    let redis = RedisServer::start_with_users(&conf, "default", "serving-pw")
        .unwrap_or_else(|e| panic!("{e}"));
    let serving = RedisTarget::from_url(&redis.url(), None);
    let mut conn = serving.connect().await.unwrap();
    let err = live::read_config(&mut conn, &serving.url, [&"maxmemory".to_string()])
        .await
        .expect_err("CONFIG is not a serving right");
    assert!(matches!(err, LiveError::ConfigForbidden { .. }), "{err:?}");
    assert!(err.to_string().contains("modelcache-admin"), "{err}");
}

#[tokio::test]
async fn forbidden_config_is_reported_plainly_and_info_still_read() {
    // What managed services do: CONFIG is renamed away.
    let redis = RedisServer::start_with_args(None, &["--rename-command", "CONFIG", ""])
        .unwrap_or_else(|e| panic!("{e}"));
    let t = target(&redis);
    let mut conn = t.connect().await.unwrap();
    let forbidden = live::read_config(&mut conn, &t.url, [&"maxmemory".to_string()]).await;
    let err = forbidden.expect_err("CONFIG is renamed away");
    assert!(matches!(err, LiveError::ConfigForbidden { .. }), "{err:?}");
    assert!(err.to_string().contains("forbids"), "{err}");

    let want = desired(EvictionPolicy::AllkeysLru, 0.8, "1Gi");
    let obs = observe(&t, &want, false, 1.5, None).await;
    assert!(obs.config_unreadable.is_some(), "{obs:?}");
    assert!(obs.info.is_some(), "INFO is still read: {obs:?}");
    let status = model_cache_status(None, None, &obs, Time(Timestamp::now()));
    assert_eq!(
        condition_status(&status.conditions, CONFIG_APPLIED),
        Some("Unknown")
    );
    assert_eq!(condition_status(&status.conditions, READY), Some("True"));
}

#[tokio::test]
async fn info_becomes_status_fields() {
    let redis = RedisServer::start_with(Some("pw"), &[("maxmemory", "100mb")])
        .unwrap_or_else(|e| panic!("{e}"));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("a")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in ["a", "a", "a", "missing"] {
        let _: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let t = target(&redis);
    let want = desired(EvictionPolicy::AllkeysLru, 0.8, "1Gi");
    let obs = observe(&t, &want, true, 1.5, None).await;
    let info = obs.info.clone().unwrap();
    assert_eq!(info.keyspace_hits, Some(3));
    assert_eq!(info.keyspace_misses, Some(1));
    let status = model_cache_status(None, Some(1), &obs, Time(Timestamp::now()));
    let r = status.redis.unwrap();
    assert_eq!(r.hit_rate, Some(0.75));
    assert_eq!(
        r.maxmemory_bytes,
        Some(858_993_459),
        "maxmemory after CONFIG SET, read from INFO"
    );
    assert!(r.used_memory_bytes.unwrap() > 0);
    assert!(r.fragmentation_ratio.unwrap() > 0.0);
    assert_eq!(r.evicted_keys, Some(0));
    assert_eq!(condition_status(&status.conditions, READY), Some("True"));
}

#[tokio::test]
async fn a_dead_redis_is_not_ready() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let t = target(&redis);
    drop(redis);
    let obs = observe(&t, &BTreeMap::new(), true, 1.5, None).await;
    assert!(
        obs.unreachable
            .as_deref()
            .unwrap()
            .contains("failed to connect"),
        "{obs:?}"
    );
    let status = model_cache_status(None, None, &obs, Time(Timestamp::now()));
    assert_eq!(condition_status(&status.conditions, READY), Some("False"));
}

/// A password in `--redis-url` (`redis://:pw@host`) is taken out of the URL
/// before anything prints it: not in the report, not in the status the
/// report shows, not in an error.
#[test]
fn a_password_in_the_redis_url_is_never_printed() {
    let redis = RedisServer::start_with(Some("s3cret-pw"), &[]).unwrap_or_else(|e| panic!("{e}"));
    let bin = env!("CARGO_BIN_EXE_modelcache");
    let check = |url: String| {
        let out = std::process::Command::new(bin)
            .args(["check-redis", "--apply", "--redis-url", &url])
            .env_remove("MODELCACHE_REDIS_PASSWORD")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = check(format!("redis://:s3cret-pw@127.0.0.1:{}", redis.port()));
    assert!(ok, "the password from the URL is used: {text}");
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert!(
        text.contains(&format!("redis://127.0.0.1:{}", redis.port())),
        "{text}"
    );

    let closed = support::free_port();
    let (ok, text) = check(format!("redis://user:s3cret-pw@127.0.0.1:{closed}"));
    assert!(!ok);
    assert!(!text.contains("s3cret-pw"), "{text}");
}

/// The Redis pod's probes, run as the kubelet runs them, against a real
/// redis-server that is busy in a long script: readiness fails (it cannot
/// serve), but liveness passes, since restarting a busy cache would lose
/// every key for nothing.
#[test]
fn a_busy_redis_is_unready_but_alive() {
    use modelcache::crd::ModelCache;
    let redis = RedisServer::start_with(Some("pw"), &[("busy-reply-threshold", "100")])
        .unwrap_or_else(|e| panic!("{e}"));
    let mc: ModelCache = serde_json::from_value(serde_json::json!({
        "apiVersion": "modelcache.dev/v1alpha1", "kind": "ModelCache",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u1"},
        "spec": {"model": "m", "version": "v1", "source": {"uri": "s3://models/x"}}
    }))
    .unwrap();
    let settings = resolve(&CachePolicySpec::default(), None).unwrap();
    let sts = modelcache::controller::builders::stateful_set(&mc, &settings, "uid");
    let pod = sts.spec.template.spec.unwrap();
    let container = &pod.containers[0];
    let run = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let command = probe
            .as_ref()
            .unwrap()
            .exec
            .as_ref()
            .unwrap()
            .command
            .clone()
            .unwrap();
        let script = command[2].replace("-p 6379", &format!("-p {}", redis.port()));
        std::process::Command::new(&command[0])
            .args([&command[1], &script])
            .env("REDISCLI_AUTH", "pw")
            .status()
            .unwrap()
            .success()
    };
    assert!(run(&container.readiness_probe) && run(&container.liveness_probe));

    // A script that runs for a second: Redis answers BUSY meanwhile.
    let url = redis.url();
    let busy = std::thread::spawn(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let _: redis::RedisResult<()> = redis::cmd("EVAL")
            .arg("local t = redis.call('TIME') while redis.call('TIME')[1] - t[1] < 2 do end")
            .arg(0)
            .query(&mut conn);
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !run(&container.readiness_probe),
        "a busy Redis is not ready"
    );
    assert!(run(&container.liveness_probe), "a busy Redis is alive");
    busy.join().unwrap();
}
