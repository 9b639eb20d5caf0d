//! Observation of a Redis: its config brought in line (or only compared),
//! INFO read, and active defragmentation turned on when fragmented. Shared by
//! the reconcile and by `modelcache check-redis`.

use std::collections::BTreeMap;

use crate::error::chain as error_chain;
use crate::store::live::{self, Defrag, LiveError, RedisTarget};

use crate::controller::status::Observation;

/// Talks to Redis: config (set only where it differs, when we own it),
/// INFO, active defragmentation when fragmented, and the counters of the
/// gateways of `gateway_model`, when it has gateways.
pub async fn observe(
    target: &RedisTarget,
    desired: &BTreeMap<String, String>,
    enforce: bool,
    fragmentation_threshold: f64,
    gateway_model: Option<&str>,
) -> Observation {
    let mut obs = Observation {
        endpoint: Some(target.url.clone()),
        fragmentation_threshold,
        ..Default::default()
    };
    let endpoint = target.url.as_str();
    let mut conn = match target.connect().await {
        Ok(c) => c,
        Err(e) => {
            obs.unreachable = Some(error_chain(&e));
            return obs;
        }
    };
    match live::reconcile_config(&mut conn, endpoint, desired, enforce).await {
        Ok(outcome) => obs.config = Some(outcome),
        Err(e @ LiveError::ConfigForbidden { .. }) => obs.config_unreadable = Some(error_chain(&e)),
        Err(e) => {
            obs.command_failed = !e.is_temporary() || matches!(e, LiveError::Command { .. });
            obs.unreachable = Some(error_chain(&e));
            return obs;
        }
    }
    match live::read_info(&mut conn, endpoint).await {
        Ok(info) => obs.info = Some(info),
        Err(e) => {
            obs.command_failed = true;
            obs.unreachable = Some(error_chain(&e));
            return obs;
        }
    }
    if let Some(model) = gateway_model {
        // Counters are a report, not a health check: unreadable ones leave
        // the status without them and nothing else.
        let counts: Result<std::collections::HashMap<String, String>, _> = redis::cmd("HGETALL")
            .arg(crate::keyspace::keys::gateway_stats(model))
            .query_async(&mut conn)
            .await;
        obs.gateway = Some(crate::controller::status::gateway_status(
            &counts.unwrap_or_default(),
        ));
    }
    if enforce && obs.fragmented() {
        obs.defrag = Some(
            live::enable_active_defrag(&mut conn, endpoint)
                .await
                .unwrap_or_else(|e| Defrag::Unsupported(error_chain(&e))),
        );
    }
    obs
}
