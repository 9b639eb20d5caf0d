//! The serving library on a real redis-server: result and feature caches,
//! the version registry and its follower, entity invalidation.

mod support;

use std::time::Duration;

use modelcache::cache::entity::{self, EntityConsumer};
use modelcache::cache::{CacheError, FeatureCache, ResultCache, Versions};
use modelcache::keyspace::keys;
use modelcache::keyspace::registry::{self, Follower, Transition};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use support::RedisServer;

async fn connect(redis: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap()
}

fn fixed(v: &str) -> Versions {
    Versions::Fixed(v.into())
}

#[tokio::test]
async fn result_cache_hits_exact_inputs_in_any_key_order_and_counts() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let conn = connect(&redis).await;
    let cache = ResultCache::new(conn.clone(), "chat", fixed("v1"), 3600);
    let question = json!({"messages": [{"role": "user", "content": "What is our PTO policy?"}], "temperature": 0});
    assert_eq!(cache.get(&question).await.unwrap(), None);
    cache
        .put(&question, &json!({"answer": "25 days"}))
        .await
        .unwrap();
    let reordered = json!({"temperature": 0, "messages": [{"content": "What is our PTO policy?", "role": "user"}]});
    assert_eq!(
        cache.get(&reordered).await.unwrap(),
        Some(json!({"answer": "25 days"}))
    );
    let other = json!({"messages": [{"role": "user", "content": "What is our PTO policy"}], "temperature": 0});
    assert_eq!(cache.get(&other).await.unwrap(), None);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (1, 2));

    // The TTL comes from the policy.
    let mut c = conn.clone();
    let ttl: i64 = redis::cmd("TTL")
        .arg(cache.key("v1", &question, None))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "{ttl}");
}

#[tokio::test]
async fn non_deterministic_calls_are_refused_unless_allowed() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let cache = ResultCache::new(connect(&redis).await, "chat", fixed("v1"), 60);
    let sampled = json!({"prompt": "a poem", "temperature": 0.7});
    let err = cache.put(&sampled, &json!("roses")).await.unwrap_err();
    assert!(
        matches!(err, CacheError::NonDeterministic { temperature } if temperature == 0.7),
        "{err}"
    );
    assert!(err.to_string().contains("allow_nondeterministic"), "{err}");
    assert_eq!(cache.get(&sampled).await.unwrap(), None);
    assert_eq!(cache.stats().refused, 1);

    let cache = cache.allow_nondeterministic(true);
    cache.put(&sampled, &json!("roses")).await.unwrap();
    assert_eq!(cache.get(&sampled).await.unwrap(), Some(json!("roses")));
}

#[tokio::test]
async fn values_in_a_foreign_format_are_misses_never_code() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mut conn = connect(&redis).await;
    let cache = ResultCache::new(conn.clone(), "chat", fixed("v1"), 60);
    let q = json!({"q": 1, "temperature": 0});
    // What the reference design stored: a pickle.
    let _: () = redis::cmd("SET")
        .arg(cache.key("v1", &q, None))
        .arg(b"\x80\x04\x95\x10\x00\x00\x00".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cache.get(&q).await.unwrap(), None);
    assert_eq!(cache.stats().undecodable, 1);
}

#[tokio::test]
async fn feature_cache_reads_and_writes_batches() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let features = FeatureCache::new(connect(&redis).await, "ranker", fixed("v1"), 300);
    features
        .put_many(&[
            ("user:1", "embedding", json!([0.1, 0.2])),
            ("user:1", "clicks_7d", json!(12)),
            ("user:2", "embedding", json!([0.3, 0.4])),
        ])
        .await
        .unwrap();
    let got = features
        .get_many(&[
            ("user:1", "clicks_7d"),
            ("user:2", "embedding"),
            ("user:3", "embedding"),
            ("user:1", "embedding"),
        ])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            Some(json!(12)),
            Some(json!([0.3, 0.4])),
            None,
            Some(json!([0.1, 0.2]))
        ]
    );
    assert_eq!((features.stats().hits, features.stats().misses), (3, 1));
}

#[tokio::test]
async fn a_version_switch_isolates_each_versions_entries() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mut conn = connect(&redis).await;
    registry::transition(&mut conn, "chat", "v1", Transition::Activate)
        .await
        .unwrap();
    let follower = Follower::start(redis::Client::open(redis.url()).unwrap(), "chat");
    follower
        .wait_for(Duration::from_secs(5), |s| {
            s.active.as_deref() == Some("v1")
        })
        .await
        .expect("follower sees v1");
    let cache = ResultCache::new(
        conn.clone(),
        "chat",
        Versions::Registry(follower.subscribe()),
        60,
    );
    let q = json!({"q": "hello", "temperature": 0});
    cache.put(&q, &json!("v1 says hi")).await.unwrap();

    let epoch = registry::transition(&mut conn, "chat", "v2", Transition::Activate)
        .await
        .unwrap();
    let state = follower
        .wait_for(Duration::from_secs(5), |s| {
            s.active.as_deref() == Some("v2")
        })
        .await
        .expect("follower sees v2");
    assert_eq!(state.epoch, epoch);
    assert_eq!(
        state.live.iter().cloned().collect::<Vec<_>>(),
        vec!["v1", "v2"]
    );
    assert_eq!(
        cache.get(&q).await.unwrap(),
        None,
        "v2 never serves v1's answer"
    );
    cache.put(&q, &json!("v2 says hi")).await.unwrap();

    // A rollback finds v1's cache intact.
    registry::transition(&mut conn, "chat", "v1", Transition::Activate)
        .await
        .unwrap();
    follower
        .wait_for(Duration::from_secs(5), |s| {
            s.active.as_deref() == Some("v1")
        })
        .await
        .unwrap();
    assert_eq!(cache.get(&q).await.unwrap(), Some(json!("v1 says hi")));

    // The active version cannot be retired; another can.
    let err = registry::transition(&mut conn, "chat", "v1", Transition::Retire)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("active version"), "{err}");
    registry::transition(&mut conn, "chat", "v2", Transition::Retire)
        .await
        .unwrap();
    let state = registry::read(&mut conn, "chat").await.unwrap();
    assert_eq!(state.live.into_iter().collect::<Vec<_>>(), vec!["v1"]);
    // Every transition is in the log, in order.
    let log: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys::events("chat"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let transitions: Vec<String> = log
        .iter()
        .map(|(_, f)| format!("{} {}", f[0].1, f[1].1))
        .collect();
    assert_eq!(
        transitions,
        vec!["activate v1", "activate v2", "activate v1", "retire v2"]
    );
}

#[tokio::test]
async fn a_consumer_that_missed_a_transition_uses_the_new_version_after_it_reconnects() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mut admin = connect(&redis).await;
    registry::transition(&mut admin, "chat", "v1", Transition::Activate)
        .await
        .unwrap();
    let follower = Follower::start(redis::Client::open(redis.url()).unwrap(), "chat");
    follower
        .wait_for(Duration::from_secs(5), |s| {
            s.active.as_deref() == Some("v1")
        })
        .await
        .unwrap();

    // Cut the follower off (as a restarting pod or a network blip would) and
    // make the transition while it is away. Pub/sub alone would lose it.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("locked")
        .query_async(&mut admin)
        .await
        .unwrap();
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1);
    registry::transition(&mut admin, "chat", "v2", Transition::Activate)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        follower.current().active.as_deref(),
        Some("v1"),
        "it cannot have seen v2 yet"
    );
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("")
        .query_async(&mut admin)
        .await
        .unwrap();

    let state = follower
        .wait_for(Duration::from_secs(15), |s| {
            s.active.as_deref() == Some("v2")
        })
        .await;
    assert!(
        state.is_some(),
        "after reconnecting the follower must use v2, not {:?}",
        follower.current()
    );
}

#[tokio::test]
async fn entity_events_retire_that_entitys_entries_only_even_if_published_while_the_consumer_was_down()
 {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mut conn = connect(&redis).await;
    registry::transition(&mut conn, "ranker", "v1", Transition::Activate)
        .await
        .unwrap();
    let features = FeatureCache::new(conn.clone(), "ranker", fixed("v1"), 300);
    let results = ResultCache::new(conn.clone(), "ranker", fixed("v1"), 300);
    let q = json!({"q": "recommend", "temperature": 0});
    for user in ["user:1", "user:2"] {
        features
            .put_many(&[(user, "clicks_7d", json!(3))])
            .await
            .unwrap();
        results
            .put_personal(user, &q, &json!(format!("for {user}")))
            .await
            .unwrap();
    }

    // The consumer joins, then goes down; an event is published meanwhile.
    let consumer = EntityConsumer::join(connect(&redis).await, "ranker", "pod-a")
        .await
        .unwrap();
    drop(consumer);
    entity::publish(&mut conn, "ranker", "user:1")
        .await
        .unwrap();
    assert_eq!(
        features.get_many(&[("user:1", "clicks_7d")]).await.unwrap(),
        vec![Some(json!(3))],
        "not applied yet"
    );

    let mut consumer = EntityConsumer::join(connect(&redis).await, "ranker", "pod-a")
        .await
        .unwrap();
    let applied = consumer
        .apply_once(Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(applied, vec!["user:1"]);
    assert_eq!(
        features
            .get_many(&[("user:1", "clicks_7d"), ("user:2", "clicks_7d")])
            .await
            .unwrap(),
        vec![None, Some(json!(3))]
    );
    assert_eq!(results.get_personal("user:1", &q).await.unwrap(), None);
    assert_eq!(
        results.get_personal("user:2", &q).await.unwrap(),
        Some(json!("for user:2"))
    );

    // Applied once: nothing is pending, and the invalidation touched one key
    // per live version, no scan.
    assert!(
        consumer
            .apply_once(Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
    let generation: u64 = redis::cmd("GET")
        .arg(keys::generation("ranker", "v1", "user:1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(generation, 1);
}

/// A pod that read an entity event and died before acknowledging it, and
/// never came back under its name: another consumer takes the event over
/// once it has been left long enough, so the invalidation is not lost.
#[tokio::test]
async fn an_event_a_dead_consumer_read_is_applied_by_another() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mut conn = connect(&redis).await;
    registry::transition(&mut conn, "ranker", "v1", Transition::Activate)
        .await
        .unwrap();
    let features = FeatureCache::new(conn.clone(), "ranker", fixed("v1"), 300);
    features
        .put_many(&[("user:1", "clicks_7d", json!(3))])
        .await
        .unwrap();
    let dead = EntityConsumer::join(connect(&redis).await, "ranker", "pod-dead")
        .await
        .unwrap();
    drop(dead);
    entity::publish(&mut conn, "ranker", "user:1")
        .await
        .unwrap();
    // pod-dead reads the event (as its last act) and is gone for good.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(modelcache::cache::entity::GROUP)
        .arg("pod-dead")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(modelcache::keyspace::keys::entity_events("ranker"))
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut alive = EntityConsumer::join(connect(&redis).await, "ranker", "pod-b")
        .await
        .unwrap()
        .claim_after(Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let applied = alive.apply_once(Duration::from_millis(100)).await.unwrap();
    assert_eq!(applied, vec!["user:1"]);
    assert_eq!(
        features.get_many(&[("user:1", "clicks_7d")]).await.unwrap(),
        vec![None]
    );
}

/// A provisioned Redis's users (issue 16, item 6): serving pods log in as
/// `default` with the password alone and reach their model's keys, registry,
/// events and entity streams, and nothing else: another model's keys and
/// every `@dangerous` command (CONFIG, FLUSHALL, KEYS, INFO, ACL, SAVE) are
/// refused. The controller's user does all of it. Before, the one password
/// every pod holds could flush or reconfigure the Redis.
#[tokio::test]
async fn serving_pods_reach_their_models_keys_and_nothing_else() {
    use modelcache::keyspace::acl;
    let conf = acl::auth_conf("chat", "admin-pw", "serving-pw");
    let redis = RedisServer::start_with_users(&conf, acl::ADMIN_USER, "admin-pw")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut admin = connect(&redis).await;
    registry::transition(&mut admin, "chat", "v1", Transition::Activate)
        .await
        .unwrap();
    let serving_url = format!("redis://:serving-pw@127.0.0.1:{}", redis.port());
    let mut serving = redis::Client::open(serving_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();

    // What serving code does, with the serving password.
    let follower = Follower::start(redis::Client::open(serving_url.as_str()).unwrap(), "chat");
    let state = follower
        .wait_for(Duration::from_secs(10), |s| {
            s.active.as_deref() == Some("v1")
        })
        .await;
    assert!(state.is_some(), "{:?}", follower.current());
    let cache = ResultCache::new(
        serving.clone(),
        "chat",
        Versions::Registry(follower.subscribe()),
        60,
    );
    let q = json!({"q": "What is our PTO policy?", "temperature": 0});
    cache.put(&q, &json!("25 days")).await.unwrap();
    assert_eq!(cache.get(&q).await.unwrap(), Some(json!("25 days")));
    let mut consumer = EntityConsumer::join(serving.clone(), "chat", "pod-a")
        .await
        .unwrap();
    entity::publish(&mut serving, "chat", "user:1")
        .await
        .unwrap();
    assert_eq!(
        consumer
            .apply_once(Duration::from_millis(500))
            .await
            .unwrap(),
        vec!["user:1"]
    );

    // Another model's keys, and dangerous commands, are refused.
    let other = ResultCache::new(serving.clone(), "ranker", fixed("v1"), 60);
    let err = other.put(&q, &json!("x")).await.unwrap_err();
    assert!(err.to_string().contains("failed"), "{err}");
    let refused = async |cmd: &mut redis::Cmd| {
        let mut conn = serving.clone();
        let err = cmd
            .query_async::<redis::Value>(&mut conn)
            .await
            .unwrap_err();
        err.to_string()
    };
    for (name, mut cmd) in [
        (
            "another model",
            redis::cmd("GET").arg("mc:ranker:v1:x").clone(),
        ),
        (
            "a foreign key",
            redis::cmd("SET").arg("session:1").arg("x").clone(),
        ),
        (
            "CONFIG",
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg("1")
                .clone(),
        ),
        ("FLUSHALL", redis::cmd("FLUSHALL").clone()),
        ("KEYS", redis::cmd("KEYS").arg("*").clone()),
        ("INFO", redis::cmd("INFO").clone()),
        ("ACL", redis::cmd("ACL").arg("LIST").clone()),
        ("SAVE", redis::cmd("SAVE").clone()),
    ] {
        let message = refused(&mut cmd).await;
        assert!(
            message.to_uppercase().contains("NOPERM"),
            "{name}: {message}"
        );
    }
    let anonymous = format!("redis://127.0.0.1:{}", redis.port());
    let mut conn = redis::Client::open(anonymous.as_str())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&support::patient())
        .await
        .unwrap();
    let err = redis::cmd("GET")
        .arg(keys::registry("chat"))
        .query_async::<redis::Value>(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NOAUTH"), "{err}");

    // The controller's user may do everything.
    assert_eq!(support::config_get(&redis, "maxmemory").await, "0");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .unwrap();
}
