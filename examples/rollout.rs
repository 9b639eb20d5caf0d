//! A model rollout on one Redis, with the serving library and the sweeper:
//! v1 serves and fills its cache, v2 is rolled out and the follower switches
//! to it, v1's cache stays out of v2's answers, and once v1 is retired its
//! keys (and only those) are swept. Run by `scripts/demo.sh`:
//!
//! ```sh
//! MODELCACHE_REDIS_PASSWORD=… cargo run --example rollout -- redis://127.0.0.1:6379
//! ```

use std::time::Duration;

use modelcache::cache::{ResultCache, Versions};
use modelcache::keyspace::registry::{self, Follower, Transition};
use modelcache::keyspace::sweep::{self, Pace};
use modelcache::store::RedisTarget;
use serde_json::json;

const MODEL: &str = "smollm2";
const QUESTIONS: usize = 20_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let target = RedisTarget {
        url: url.clone(),
        username: None,
        password: std::env::var("MODELCACHE_REDIS_PASSWORD").ok(),
    };
    let mut conn = target.connect().await?;
    let client = target.client()?;

    // An older version whose keys nobody cleaned up; `modelcache invalidate`
    // takes care of it after this example.
    let old = ResultCache::new(conn.clone(), MODEL, Versions::Fixed("v0".into()), 0);
    for i in 0..500 {
        old.put(&json!({"q": i, "temperature": 0}), &json!("v0 answer"))
            .await?;
    }

    registry::transition(&mut conn, MODEL, "v1", Transition::Activate).await?;
    let follower = Follower::start(client, MODEL);
    follower
        .wait_for(Duration::from_secs(5), |s| {
            s.active.as_deref() == Some("v1")
        })
        .await;
    let cache = ResultCache::new(
        conn.clone(),
        MODEL,
        Versions::Registry(follower.subscribe()),
        3600,
    );
    let question = |i: usize| json!({"messages": [{"role": "user", "content": format!("question {i}")}], "temperature": 0});

    for i in 0..QUESTIONS {
        cache
            .put(&question(i), &json!(format!("v1 answer {i}")))
            .await?;
    }
    for i in 0..QUESTIONS / 2 {
        cache.get(&question(i)).await?;
    }
    println!(
        "v1 serves: {QUESTIONS} answers cached, hit rate {:.2} on repeats",
        cache.stats().hit_rate().unwrap_or(0.0)
    );

    let epoch = registry::transition(&mut conn, MODEL, "v2", Transition::Activate).await?;
    let state = follower
        .wait_for(Duration::from_secs(5), |s| {
            s.active.as_deref() == Some("v2")
        })
        .await
        .ok_or_else(|| anyhow::anyhow!("the follower did not see v2"))?;
    println!(
        "rolled out v2: registry epoch {epoch}, live versions {:?}",
        state.live
    );
    let before = cache.stats();
    let mut served_v1 = 0;
    for i in 0..1000 {
        if let Some(answer) = cache.get(&question(i)).await? {
            served_v1 += usize::from(answer.as_str().is_some_and(|a| a.starts_with("v1")));
        }
        cache
            .put(&question(i), &json!(format!("v2 answer {i}")))
            .await?;
    }
    let after = cache.stats();
    println!(
        "v2 asked 1000 repeated questions: {} hits, {} misses, {served_v1} answers from v1",
        after.hits - before.hits,
        after.misses - before.misses
    );

    registry::transition(&mut conn, MODEL, "v1", Transition::Retire).await?;
    let v2_before = sweep::count_version(&mut conn, MODEL, "v2", 1000).await?;
    let report = sweep::sweep_version(&mut conn, None, MODEL, "v1", Pace::default()).await?;
    let v1_left = sweep::count_version(&mut conn, MODEL, "v1", 1000).await?;
    let v2_after = sweep::count_version(&mut conn, MODEL, "v2", 1000).await?;
    println!(
        "retired v1 and swept it: {} keys deleted in {:.2}s ({:.0} keys/s); v1 keys left {v1_left}; v2 keys {v2_before} before, {v2_after} after",
        report.deleted,
        report.elapsed.as_secs_f64(),
        report.deleted as f64 / report.elapsed.as_secs_f64().max(1e-9),
    );
    anyhow::ensure!(
        v1_left == 0 && v2_after == v2_before && served_v1 == 0,
        "the rollout did not isolate versions"
    );
    Ok(())
}
