//! `modelcache check-redis`: the controller's config and health logic run
//! once against any Redis, for the main job and for debugging a cache by hand.

use std::fmt::Write as _;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::cache_policy::CachePolicySpec;
use crate::crd::model_cache::{ModelCacheStatus, RedisOverrides};
use crate::store::live::RedisTarget;
use crate::store::settings::{self, SettingsError};

use super::reconcile::observe;
use super::status::{Observation, model_cache_status};

/// The observation and the status the controller would write from it.
pub struct CheckReport {
    /// What was found.
    pub observation: Observation,
    /// The status the controller would write.
    pub status: ModelCacheStatus,
}

/// Resolves the policy (with an optional memory limit override), brings the
/// Redis's config in line when `apply` is set (otherwise only compares), reads
/// INFO, and builds the status.
pub async fn check_redis(
    target: &RedisTarget,
    policy: &CachePolicySpec,
    overrides: Option<&RedisOverrides>,
    apply: bool,
) -> Result<CheckReport, SettingsError> {
    let resolved = settings::resolve(policy, overrides)?;
    let desired = settings::desired_config(&resolved);
    let observation = observe(
        target,
        &desired,
        apply,
        policy.fragmentation_threshold,
        None,
    )
    .await;
    let status = model_cache_status(None, None, &observation, Time(Timestamp::now()));
    Ok(CheckReport {
        observation,
        status,
    })
}

/// A table of desired vs applied config, then health and conditions.
pub fn render(report: &CheckReport) -> String {
    let mut out = String::new();
    let obs = &report.observation;
    if let Some(endpoint) = &obs.endpoint {
        let _ = writeln!(out, "Redis at {endpoint}");
    }
    if let Some(config) = &obs.config {
        let _ = writeln!(
            out,
            "{:<26} {:<14} {:<14} {:<14}",
            "parameter", "desired", "before", "applied"
        );
        for (key, want) in &config.desired {
            let show = |v: Option<&String>| match v.map(String::as_str) {
                None => "<unset>".to_string(),
                Some("") => "\"\"".to_string(),
                Some(v) => v.to_string(),
            };
            let mark = if config.still_differs.contains(key) {
                "  DIFFERS"
            } else if config.changed.contains(key) {
                "  (set now)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{key:<26} {:<14} {:<14} {:<14}{mark}",
                show(Some(want)),
                show(config.before.get(key)),
                show(config.applied.get(key)),
            );
        }
    }
    if let Some(redis) = &report.status.redis {
        let _ = writeln!(
            out,
            "health: used_memory={} maxmemory={} fragmentation={} evicted_keys={} hit_rate={}",
            fmt(redis.used_memory_bytes),
            fmt(redis.maxmemory_bytes),
            fmt(redis.fragmentation_ratio),
            fmt(redis.evicted_keys),
            fmt(redis.hit_rate),
        );
    }
    for c in &report.status.conditions {
        let _ = writeln!(
            out,
            "condition {}={} ({}): {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    out
}

fn fmt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
