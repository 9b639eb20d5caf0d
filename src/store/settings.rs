//! What a model's Redis should run with: CachePolicy settings overridden by the
//! ModelCache's own, resolved to exact bytes, and the config derived from them.

use std::collections::BTreeMap;

use crate::crd::cache_policy::{CachePolicySpec, EvictionPolicy};
use crate::crd::model_cache::RedisOverrides;
use crate::quantity::{self, QuantityError};

/// Below this memory limit Redis has no room for its own overhead, so the
/// controller refuses the spec instead of starting a Redis that OOMs.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;

/// Why a policy could not be resolved to Redis settings.
/// Each variant is documented by its message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[allow(missing_docs)]
pub enum SettingsError {
    #[error("failed to read the Redis memory limit {field}")]
    Memory {
        field: &'static str,
        #[source]
        source: QuantityError,
    },
    #[error(
        "failed to size Redis: the memory limit {quantity} ({bytes} bytes) is below the 64Mi that \
         Redis needs; raise {field} to at least 64Mi"
    )]
    MemoryTooSmall {
        field: &'static str,
        quantity: String,
        bytes: u64,
    },
    #[error("failed to read the Redis CPU request {field}")]
    Cpu {
        field: &'static str,
        #[source]
        source: QuantityError,
    },
    #[error("failed to compute maxmemory from the policy's maxmemoryRatio")]
    Ratio(#[source] QuantityError),
}

/// Resolved settings of one model's Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// The Redis image.
    pub image: String,
    /// Memory request and limit as written, for the container.
    pub memory: String,
    /// The memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU request as written.
    pub cpu: String,
    /// `floor(maxmemoryRatio × memory_bytes)`.
    pub maxmemory_bytes: u64,
    /// maxmemory-policy.
    pub eviction_policy: EvictionPolicy,
    /// Fragmentation ratio above which defragmentation is turned on.
    pub fragmentation_threshold: f64,
}

/// Resolves the policy's Redis settings with the ModelCache's overrides.
pub fn resolve(
    policy: &CachePolicySpec,
    overrides: Option<&RedisOverrides>,
) -> Result<RedisSettings, SettingsError> {
    let image = overrides
        .and_then(|o| o.image.clone())
        .unwrap_or_else(|| policy.redis.image.clone());
    let (memory, memory_field) = match overrides.and_then(|o| o.memory.as_ref()) {
        Some(q) => (q.0.clone(), "ModelCache spec.redis.memory"),
        None => (
            policy.redis.memory.0.clone(),
            "CachePolicy spec.redis.memory",
        ),
    };
    let (cpu, cpu_field) = match overrides.and_then(|o| o.cpu.as_ref()) {
        Some(q) => (q.0.clone(), "ModelCache spec.redis.cpu"),
        None => (policy.redis.cpu.0.clone(), "CachePolicy spec.redis.cpu"),
    };
    let memory_bytes = quantity::to_units(&memory).map_err(|source| SettingsError::Memory {
        field: memory_field,
        source,
    })?;
    if memory_bytes < MIN_MEMORY_BYTES {
        return Err(SettingsError::MemoryTooSmall {
            field: memory_field,
            quantity: memory,
            bytes: memory_bytes,
        });
    }
    quantity::to_units(&cpu).map_err(|source| SettingsError::Cpu {
        field: cpu_field,
        source,
    })?;
    let maxmemory_bytes =
        quantity::ratio_of(memory_bytes, policy.maxmemory_ratio).map_err(SettingsError::Ratio)?;
    Ok(RedisSettings {
        image,
        memory,
        memory_bytes,
        cpu,
        maxmemory_bytes,
        eviction_policy: policy.eviction_policy,
        fragmentation_threshold: policy.fragmentation_threshold,
    })
}

/// Parameters that make Redis a cache. All of them can change at run time
/// with CONFIG SET, so a policy change never needs a restart.
pub fn desired_config(settings: &RedisSettings) -> BTreeMap<String, String> {
    let mut config = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        config.insert(k.to_owned(), v.to_owned());
    };
    set("maxmemory", &settings.maxmemory_bytes.to_string());
    set("maxmemory-policy", settings.eviction_policy.as_redis());
    // A cache is rebuilt from its source: persistence only costs fork latency
    // and disk.
    set("save", "");
    set("appendonly", "no");
    // Evictions, expiries and sweeps free memory in a background thread, so
    // deleting a large value never blocks the event loop.
    set("lazyfree-lazy-eviction", "yes");
    set("lazyfree-lazy-expire", "yes");
    set("lazyfree-lazy-server-del", "yes");
    set("lazyfree-lazy-user-del", "yes");
    set("lazyfree-lazy-user-flush", "yes");
    set("replica-lazy-flush", "yes");
    config
}

/// Where the password file is mounted from the generated Secret.
pub const AUTH_CONF_PATH: &str = "/etc/redis-auth/auth.conf";

/// `redis.conf` for a provisioned Redis: the desired config plus what only
/// matters at start. The password is not here: it is `include`d from the
/// Secret, so the ConfigMap holds nothing secret.
pub fn redis_conf(settings: &RedisSettings) -> String {
    let mut out = String::from(
        "# Generated by the modelcache controller. Live settings are also applied\n\
         # with CONFIG SET, so editing this file by hand changes nothing for long.\n\
         port 6379\nbind * -::*\nprotected-mode no\ndir /data\ndaemonize no\n",
    );
    for (key, value) in desired_config(settings) {
        if value.is_empty() {
            out.push_str(&format!("{key} \"\"\n"));
        } else {
            out.push_str(&format!("{key} {value}\n"));
        }
    }
    out.push_str(&format!("include {AUTH_CONF_PATH}\n"));
    out
}

/// The parameters whose applied value differs from the desired one.
pub fn config_drift(
    desired: &BTreeMap<String, String>,
    applied: &BTreeMap<String, String>,
) -> Vec<String> {
    desired
        .iter()
        .filter(|(k, v)| applied.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn policy(ratio: f64, memory: &str) -> CachePolicySpec {
        let mut p = CachePolicySpec {
            maxmemory_ratio: ratio,
            ..Default::default()
        };
        p.redis.memory = Quantity(memory.into());
        p
    }

    #[test]
    fn maxmemory_is_the_ratio_of_the_limit_in_exact_bytes() {
        let s = resolve(&policy(0.8, "2Gi"), None).unwrap();
        assert_eq!(s.memory_bytes, 2_147_483_648);
        assert_eq!(s.maxmemory_bytes, 1_717_986_918);
        assert_eq!(desired_config(&s)["maxmemory"], "1717986918");
        assert_eq!(desired_config(&s)["maxmemory-policy"], "allkeys-lru");
    }

    #[test]
    fn model_cache_overrides_win() {
        let overrides = RedisOverrides {
            image: Some("redis:7.4".into()),
            memory: Some(Quantity("4Gi".into())),
            cpu: None,
            external: None,
        };
        let s = resolve(&policy(0.5, "1Gi"), Some(&overrides)).unwrap();
        assert_eq!(s.image, "redis:7.4");
        assert_eq!(s.memory, "4Gi");
        assert_eq!(s.maxmemory_bytes, 2 << 30);
        assert_eq!(s.cpu, "250m", "cpu falls back to the policy");
    }

    #[test]
    fn too_little_memory_names_the_field_and_the_fix() {
        let overrides = RedisOverrides {
            memory: Some(Quantity("32Mi".into())),
            ..Default::default()
        };
        let err = resolve(&policy(0.8, "1Gi"), Some(&overrides)).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("ModelCache spec.redis.memory"),
            "{message}"
        );
        assert!(
            message.contains("32Mi") && message.contains("at least 64Mi"),
            "{message}"
        );

        let err = resolve(&policy(0.8, "lots"), None).unwrap_err();
        assert!(
            err.to_string().contains("CachePolicy spec.redis.memory"),
            "{err}"
        );
    }

    #[test]
    fn redis_conf_is_a_cache_without_secrets() {
        let s = resolve(&policy(0.8, "2Gi"), None).unwrap();
        let conf = redis_conf(&s);
        for line in [
            "maxmemory 1717986918",
            "maxmemory-policy allkeys-lru",
            "save \"\"",
            "appendonly no",
            "lazyfree-lazy-eviction yes",
            "include /etc/redis-auth/auth.conf",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "missing {line:?} in\n{conf}"
            );
        }
        assert!(!conf.contains("requirepass"));
    }

    #[test]
    fn drift_lists_changed_and_missing_parameters() {
        let s = resolve(&policy(0.8, "2Gi"), None).unwrap();
        let desired = desired_config(&s);
        let mut applied = desired.clone();
        assert!(config_drift(&desired, &applied).is_empty());
        applied.insert("maxmemory".into(), "0".into());
        applied.remove("appendonly");
        assert_eq!(
            config_drift(&desired, &applied),
            vec!["appendonly", "maxmemory"]
        );
    }
}
