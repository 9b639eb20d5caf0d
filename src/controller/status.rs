//! ModelCache status from what one reconcile observed, as a pure function.
//!
//! `Ready` means Redis answered with the desired config on this reconcile, not
//! that the objects exist: a dead Redis turns it False on the next check.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::condition::{condition, set_condition};
use crate::crd::model_cache::{
    GatewayStatus, ModelCacheStatus, PrefetchStatus, RedisStatus, VersionStatus,
};
use crate::store::RedisInfo;
use crate::store::live::{ConfigOutcome, Defrag};

use super::validate::Invalid;

/// Redis answers with the desired config.
pub const READY: &str = "Ready";
/// The spec can be reconciled.
pub const SPEC_VALID: &str = "SpecValid";
/// The running config is the desired one.
pub const CONFIG_APPLIED: &str = "ConfigApplied";
/// Memory fragmentation is above the policy's threshold.
pub const FRAGMENTED: &str = "Fragmented";
/// Every node `spec.prefetch` selects holds `spec.version`.
pub const PREFETCHED: &str = "Prefetched";

/// What one reconcile found out.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Why the spec cannot be reconciled, when it cannot.
    pub invalid: Option<Invalid>,
    /// The Redis address, without credentials.
    pub endpoint: Option<String>,
    /// Set when Redis could not be reached or did not answer.
    pub unreachable: Option<String>,
    /// Redis was reached but answered a command with an error.
    pub command_failed: bool,
    /// What the config check found and set.
    pub config: Option<ConfigOutcome>,
    /// Set when CONFIG is forbidden (managed services): what we cannot check.
    pub config_unreadable: Option<String>,
    /// INFO facts.
    pub info: Option<RedisInfo>,
    /// The policy's fragmentation threshold.
    pub fragmentation_threshold: f64,
    /// Whether active defragmentation was turned on, or why not.
    pub defrag: Option<Defrag>,
    /// Version phases and the version published as active, when the rollout
    /// was followed on this reconcile.
    pub rollout: Option<(Vec<VersionStatus>, Option<String>)>,
    /// The gateways' report, when the spec has a gateway.
    pub gateway: Option<GatewayStatus>,
    /// The node cache agents' prefetch, when the spec asks for one and the
    /// controller knows where the agents are.
    pub prefetch: Option<PrefetchStatus>,
}

/// The gateways' counters (the hash every gateway adds to, see
/// [`crate::keyspace::keys::gateway_stats`]) as status. Fields that are
/// missing or not numbers count as 0: the hash is written by pods.
pub fn gateway_status(counts: &std::collections::HashMap<String, String>) -> GatewayStatus {
    let int = |k: &str| {
        counts
            .get(k)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
            .max(0)
    };
    let (requests, hits) = (int("requests"), int("hits").min(int("requests")));
    GatewayStatus {
        endpoint: None,
        ready_replicas: None,
        requests,
        hits,
        hit_rate: (requests > 0).then(|| hits as f64 / requests as f64),
        tokens_saved: int("tokens_saved"),
        cost_saved: counts
            .contains_key("cost_saved_micros")
            .then(|| int("cost_saved_micros") as f64 / 1e6),
    }
}

/// Fragmentation below this many bytes is ignored whatever the ratio: on a
/// near-empty Redis the ratio is large and meaningless. Redis's own
/// `active-defrag-ignore-bytes` defaults to the same 100 MiB.
pub const FRAGMENTATION_IGNORE_BYTES: i64 = 100 << 20;

impl Observation {
    /// Whether fragmentation is above the threshold and worth acting on.
    pub fn fragmented(&self) -> bool {
        let Some(info) = &self.info else { return false };
        info.mem_fragmentation_ratio
            .is_some_and(|r| r > self.fragmentation_threshold)
            && info
                .mem_fragmentation_bytes
                .is_some_and(|b| b > FRAGMENTATION_IGNORE_BYTES)
    }
}

/// A condition to set: type, status, reason, message.
type Set = (&'static str, &'static str, &'static str, String);

/// The new status. Fields this reconcile does not own (versions) are kept.
pub fn model_cache_status(
    previous: Option<&ModelCacheStatus>,
    generation: Option<i64>,
    obs: &Observation,
    now: Time,
) -> ModelCacheStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let sets: Vec<Set> = match &obs.invalid {
        Some(invalid) => vec![
            (SPEC_VALID, "False", invalid.reason, invalid.message.clone()),
            (READY, "False", invalid.reason, invalid.message.clone()),
        ],
        None => std::iter::once((SPEC_VALID, "True", "Valid", "spec is valid".to_string()))
            .chain(config_conditions(obs))
            .chain(fragmentation_condition(obs))
            .collect(),
    };
    for (type_, state, reason, message) in sets {
        let c = condition(type_, state, reason, message, generation, now.clone());
        set_condition(&mut status.conditions, c);
    }
    if obs.invalid.is_some() {
        return status;
    }
    if let Some((versions, active)) = &obs.rollout {
        status.versions = versions.clone();
        if active.is_some() {
            status.active_version = active.clone();
        }
    }
    status.redis = Some(redis_status(status.redis.take(), obs, now.clone()));
    // While Redis cannot be read, the last report stands.
    if obs.unreachable.is_none() {
        status.gateway = obs.gateway.clone();
    }
    status.prefetch = obs.prefetch.clone();
    match &status.prefetch {
        Some(p) => {
            let (state, reason, message) = super::prefetch::condition(p);
            let c = condition(PREFETCHED, state, reason, message, generation, now);
            set_condition(&mut status.conditions, c);
        }
        None => status.conditions.retain(|c| c.type_ != PREFETCHED),
    }
    status
}

/// `ConfigApplied` and `Ready`, from whether Redis answered and with what config.
fn config_conditions(obs: &Observation) -> Vec<Set> {
    if let Some(why) = &obs.unreachable {
        return vec![
            (CONFIG_APPLIED, "Unknown", "RedisUnavailable", why.clone()),
            (READY, "False", "RedisUnavailable", why.clone()),
        ];
    }
    if let Some(why) = &obs.config_unreadable {
        let ready = format!("Redis answers; its config cannot be verified: {why}");
        return vec![
            (CONFIG_APPLIED, "Unknown", "ConfigUnreadable", why.clone()),
            (READY, "True", "RedisReachable", ready),
        ];
    }
    let Some(config) = &obs.config else {
        return Vec::new();
    };
    if config.converged() {
        let message = if config.changed.is_empty() {
            format!("all {} parameters match", config.desired.len())
        } else {
            format!("set {} to the desired values", config.changed.join(", "))
        };
        let ready = "Redis answers with the desired config".to_string();
        return vec![
            (CONFIG_APPLIED, "True", "Applied", message),
            (READY, "True", "RedisReady", ready),
        ];
    }
    let detail: Vec<String> = config
        .still_differs
        .iter()
        .map(|k| {
            let have = config.applied.get(k).map(String::as_str);
            let want = &config.desired[k];
            format!("{k}: want {want:?}, have {:?}", have.unwrap_or("<unset>"))
        })
        .collect();
    let message = format!("config differs: {}", detail.join("; "));
    vec![
        (CONFIG_APPLIED, "False", "Drift", message.clone()),
        (READY, "False", "ConfigDrift", message),
    ]
}

/// `Fragmented`, when INFO gave the fragmentation ratio.
fn fragmentation_condition(obs: &Observation) -> Option<Set> {
    let ratio = obs.info.as_ref()?.mem_fragmentation_ratio?;
    let threshold = obs.fragmentation_threshold;
    if obs.fragmented() {
        let action = match &obs.defrag {
            Some(Defrag::TurnedOn) => "turned on active defragmentation".to_string(),
            Some(Defrag::AlreadyOn) => "active defragmentation is on".to_string(),
            Some(Defrag::Unsupported(why)) => {
                format!("active defragmentation is not available in this build ({why})")
            }
            None => "active defragmentation was not tried".to_string(),
        };
        let message =
            format!("mem_fragmentation_ratio {ratio:.2} is above {threshold:.2}; {action}");
        return Some((FRAGMENTED, "True", "AboveThreshold", message));
    }
    if ratio > threshold {
        let message = format!(
            "mem_fragmentation_ratio {ratio:.2} is above {threshold:.2}, but fragmentation wastes \
             less than {} MiB, which is noise",
            FRAGMENTATION_IGNORE_BYTES >> 20
        );
        return Some((FRAGMENTED, "False", "BelowIgnoreBytes", message));
    }
    let message = format!("mem_fragmentation_ratio {ratio:.2} is at most {threshold:.2}");
    Some((FRAGMENTED, "False", "BelowThreshold", message))
}

/// `status.redis`: the endpoint, config and INFO facts this reconcile saw,
/// over what the last one wrote.
fn redis_status(previous: Option<RedisStatus>, obs: &Observation, now: Time) -> RedisStatus {
    let mut redis = previous.unwrap_or_default();
    redis.endpoint = obs.endpoint.clone().or(redis.endpoint);
    if let Some(config) = &obs.config {
        redis.desired_config = config.desired.clone();
        redis.applied_config = config.applied.clone();
    }
    let Some(info) = &obs.info else {
        return redis;
    };
    RedisStatus {
        used_memory_bytes: info.used_memory.map(saturate),
        maxmemory_bytes: info.maxmemory.map(saturate),
        fragmentation_ratio: info.mem_fragmentation_ratio,
        evicted_keys: info.evicted_keys.map(saturate),
        hit_rate: info.hit_rate().map(|r| (r * 10_000.0).round() / 10_000.0),
        last_checked: Some(now),
        ..redis
    }
}

fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::condition::condition_status;
    use k8s_openapi::jiff::Timestamp;
    use std::collections::BTreeMap;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn outcome(applied_maxmemory: &str) -> ConfigOutcome {
        let desired = BTreeMap::from([("maxmemory".to_string(), "100".to_string())]);
        let applied = BTreeMap::from([("maxmemory".to_string(), applied_maxmemory.to_string())]);
        let still_differs = crate::store::settings::config_drift(&desired, &applied);
        ConfigOutcome {
            desired,
            before: BTreeMap::new(),
            applied,
            changed: vec!["maxmemory".into()],
            still_differs,
        }
    }

    #[test]
    fn prefetch_sets_its_condition_and_goes_with_it() {
        let obs = Observation {
            prefetch: Some(PrefetchStatus {
                version: "v2".into(),
                nodes: "3/3".into(),
                ready: 3,
                total: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = model_cache_status(None, Some(1), &obs, at(10));
        assert_eq!(condition_status(&s.conditions, PREFETCHED), Some("True"));
        assert_eq!(s.prefetch.as_ref().unwrap().nodes, "3/3");
        // spec.prefetch removed: neither the status nor the condition stays.
        let s = model_cache_status(Some(&s), Some(2), &Observation::default(), at(20));
        assert_eq!(condition_status(&s.conditions, PREFETCHED), None);
        assert!(s.prefetch.is_none());
    }

    #[test]
    fn ready_needs_the_desired_config() {
        let obs = Observation {
            config: Some(outcome("100")),
            info: Some(RedisInfo {
                keyspace_hits: Some(3),
                keyspace_misses: Some(1),
                mem_fragmentation_ratio: Some(1.1),
                ..Default::default()
            }),
            fragmentation_threshold: 1.5,
            ..Default::default()
        };
        let s = model_cache_status(None, Some(2), &obs, at(10));
        assert_eq!(condition_status(&s.conditions, READY), Some("True"));
        assert_eq!(
            condition_status(&s.conditions, CONFIG_APPLIED),
            Some("True")
        );
        assert_eq!(condition_status(&s.conditions, FRAGMENTED), Some("False"));
        assert_eq!(s.observed_generation, Some(2));
        let redis = s.redis.unwrap();
        assert_eq!(redis.hit_rate, Some(0.75));
        assert_eq!(redis.desired_config["maxmemory"], "100");

        let obs = Observation {
            config: Some(outcome("0")),
            ..Default::default()
        };
        let s = model_cache_status(None, Some(2), &obs, at(10));
        assert_eq!(condition_status(&s.conditions, READY), Some("False"));
        let applied = s
            .conditions
            .iter()
            .find(|c| c.type_ == CONFIG_APPLIED)
            .unwrap();
        assert!(
            applied.message.contains("want \"100\", have \"0\""),
            "{applied:?}"
        );
    }

    #[test]
    fn a_dead_redis_is_not_ready_even_if_it_was() {
        let ready = Observation {
            config: Some(outcome("100")),
            ..Default::default()
        };
        let before = model_cache_status(None, Some(1), &ready, at(10));
        let dead = Observation {
            unreachable: Some("connection refused".into()),
            ..Default::default()
        };
        let after = model_cache_status(Some(&before), Some(1), &dead, at(20));
        assert_eq!(condition_status(&after.conditions, READY), Some("False"));
        let ready = after.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.last_transition_time, at(20));
        assert_eq!(ready.reason, "RedisUnavailable");
    }

    #[test]
    fn invalid_specs_and_fragmentation() {
        let obs = Observation {
            invalid: Some(Invalid {
                reason: "PolicyNotFound",
                message: "create it".into(),
            }),
            ..Default::default()
        };
        let s = model_cache_status(None, Some(3), &obs, at(1));
        assert_eq!(condition_status(&s.conditions, SPEC_VALID), Some("False"));
        assert_eq!(condition_status(&s.conditions, READY), Some("False"));

        let obs = Observation {
            config: Some(outcome("100")),
            info: Some(RedisInfo {
                mem_fragmentation_ratio: Some(2.4),
                mem_fragmentation_bytes: Some(300 << 20),
                ..Default::default()
            }),
            fragmentation_threshold: 1.5,
            defrag: Some(Defrag::TurnedOn),
            ..Default::default()
        };
        let s = model_cache_status(None, Some(3), &obs, at(1));
        let frag = s.conditions.iter().find(|c| c.type_ == FRAGMENTED).unwrap();
        assert_eq!(frag.status, "True");
        assert!(
            frag.message.contains("2.40") && frag.message.contains("turned on"),
            "{frag:?}"
        );

        // A high ratio over a few wasted bytes (an empty Redis) is noise.
        let mut small = obs.clone();
        small.info.as_mut().unwrap().mem_fragmentation_bytes = Some(2 << 20);
        let s = model_cache_status(None, Some(3), &small, at(1));
        let frag = s.conditions.iter().find(|c| c.type_ == FRAGMENTED).unwrap();
        assert_eq!(
            (frag.status.as_str(), frag.reason.as_str()),
            ("False", "BelowIgnoreBytes")
        );
    }
}
