//! Validation of a ModelCache against what it references, as a pure function.
//! A spec that fails here sets the `SpecValid` condition and waits for a change
//! instead of being retried: retrying cannot fix it.

use std::collections::BTreeMap;

use crate::crd::ModelCache;
use crate::crd::cache_policy::CachePolicySpec;
use crate::crd::model_cache::ExternalRedis;
use crate::store::settings::{self, RedisSettings};

use super::builders::MAX_NAME_LEN;

/// Why a spec cannot be reconciled, for the condition and the Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// What is wrong and what to change.
    pub message: String,
}

/// The reason when an object the ModelCache would own exists and is someone
/// else's.
pub const OBJECT_NOT_OURS: &str = "ObjectNotOurs";

impl Invalid {
    /// Whether what must change lies outside the ModelCache (another object
    /// in the way), so that no event of ours announces the fix: such a spec
    /// is looked at again at the health interval instead of waiting.
    pub fn outside_the_spec(&self) -> bool {
        self.reason == OBJECT_NOT_OURS
    }
}

/// How the ModelCache's Redis is to be had.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisBackend {
    /// The controller runs a Redis with these settings.
    Provisioned(RedisSettings),
    /// An existing Redis, checked against `desired` but not changed.
    External {
        /// Where it is and how to log in.
        redis: ExternalRedis,
        /// The config the policy asks of it.
        desired: BTreeMap<String, String>,
    },
}

/// A spec that passed validation, with its policy resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    /// The referenced CachePolicy's spec, or the defaults.
    pub policy: CachePolicySpec,
    /// How the Redis is to be had.
    pub redis: RedisBackend,
}

/// `policy` is the referenced CachePolicy's spec: `Err(name)` when the
/// reference names a policy that does not exist, `Ok(None)` when the
/// ModelCache references none (the defaults apply).
pub fn validate(
    mc: &ModelCache,
    policy: Result<Option<CachePolicySpec>, String>,
) -> Result<ValidSpec, Invalid> {
    let name = mc.metadata.name.as_deref().unwrap_or_default();
    let namespace = mc.metadata.namespace.as_deref().unwrap_or("default");
    if name.len() > MAX_NAME_LEN {
        return Err(Invalid {
            reason: "NameTooLong",
            message: format!(
                "metadata.name {name:?} has {} characters; the Redis objects are named \
                 <name>-redis, which allows at most {MAX_NAME_LEN}: recreate the ModelCache \
                 under a shorter name",
                name.len()
            ),
        });
    }
    check_source(&mc.spec.source.uri)?;
    check_headers(mc)?;
    let policy = match policy {
        Ok(p) => p.unwrap_or_default(),
        Err(missing) => {
            return Err(Invalid {
                reason: "PolicyNotFound",
                message: format!(
                    "CachePolicy {missing:?} does not exist in namespace {namespace}: create it, \
                     or fix spec.cachePolicyRef.name"
                ),
            });
        }
    };
    check_semantic(mc, &policy)?;
    let overrides = mc.spec.redis.as_ref();
    let redis = match overrides.and_then(|o| o.external.clone()) {
        Some(redis) => RedisBackend::External {
            redis,
            desired: BTreeMap::from([(
                "maxmemory-policy".to_string(),
                policy.eviction_policy.as_redis().to_string(),
            )]),
        },
        None => RedisBackend::Provisioned(settings::resolve(&policy, overrides).map_err(|e| {
            Invalid {
                reason: "RedisMemoryInvalid",
                message: crate::error::chain(&e),
            }
        })?),
    };
    Ok(ValidSpec { policy, redis })
}

/// A gateway's semantic layer needs the policy's threshold: a guessed one
/// is how a semantic cache serves wrong answers (see `modelcache calibrate`).
fn check_semantic(mc: &ModelCache, policy: &CachePolicySpec) -> Result<(), Invalid> {
    let semantic = mc.spec.gateway.as_ref().and_then(|g| g.semantic.as_ref());
    match (semantic, policy.semantic.threshold) {
        (Some(semantic), None) => Err(Invalid {
            reason: "SemanticThresholdUnset",
            message: format!(
                "spec.gateway.semantic asks for a semantic layer, and {} sets no \
                 semantic.threshold: run `modelcache calibrate` with the embedding model \
                 {:?} on labeled question pairs, and set semantic.threshold in the \
                 CachePolicy to the threshold it picks",
                match &mc.spec.cache_policy_ref {
                    Some(r) => format!("CachePolicy {:?}", r.name),
                    None => "no CachePolicy (spec.cachePolicyRef is unset)".to_string(),
                },
                semantic.embedding_model.name
            ),
        }),
        _ => Ok(()),
    }
}

/// Inline CDN headers are mounted as files of a ConfigMap, named by header.
fn check_headers(mc: &ModelCache) -> Result<(), Invalid> {
    let headers = mc.spec.source.cdn.iter().flat_map(|c| c.headers.keys());
    match headers
        .into_iter()
        .find(|h| !super::builders::is_config_map_key(h))
    {
        None => Ok(()),
        Some(name) => Err(Invalid {
            reason: "CdnHeaderInvalid",
            message: format!(
                "spec.source.cdn.headers has a header named {name:?}; inline headers are \
                 mounted as files, so a name may hold only letters, digits, '-', '.' and '_': \
                 rename it, or put it in the Secret of spec.source.cdn.headersSecretRef"
            ),
        }),
    }
}

/// The schema checks the URI on admission; this catches objects admitted
/// before that rule existed, or written with validation off.
fn check_source(uri: &str) -> Result<(), Invalid> {
    let invalid = |why: &str| Invalid {
        reason: "SourceInvalid",
        message: format!(
            "spec.source.uri {uri:?} {why}: use s3://bucket/prefix or https://host/prefix"
        ),
    };
    if let Some(rest) = uri.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or_default();
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        return if valid {
            Ok(())
        } else {
            Err(invalid("names no valid bucket"))
        };
    }
    if let Some(rest) = uri.strip_prefix("https://") {
        return if rest.split('/').next().is_some_and(|h| !h.is_empty()) {
            Ok(())
        } else {
            Err(invalid("names no host"))
        };
    }
    Err(invalid("has an unsupported scheme"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::model_cache::{ArtifactSource, ModelCacheSpec, RedisOverrides};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    pub(crate) fn model_cache(name: &str, uri: &str) -> ModelCache {
        let mut mc = ModelCache::new(
            name,
            ModelCacheSpec {
                model: "m".into(),
                version: "v1".into(),
                source: ArtifactSource {
                    uri: uri.into(),
                    endpoint: None,
                    region: None,
                    path_style: false,
                    credentials_secret_ref: None,
                    cdn: None,
                },
                cache_policy_ref: None,
                workload: None,
                redis: None,
                warmup: None,
                gateway: None,
                prefetch: None,
            },
        );
        mc.metadata.namespace = Some("ml".into());
        mc
    }

    #[test]
    fn defaults_apply_without_a_policy() {
        let spec = validate(&model_cache("chat", "s3://models/x"), Ok(None)).unwrap();
        let RedisBackend::Provisioned(s) = spec.redis else {
            panic!()
        };
        assert_eq!(s.memory, "1Gi");
        assert_eq!(s.maxmemory_bytes, 858_993_459);
    }

    #[test]
    fn a_missing_policy_says_what_to_fix() {
        let err = validate(&model_cache("chat", "s3://models/x"), Err("faq".into())).unwrap_err();
        assert_eq!(err.reason, "PolicyNotFound");
        assert!(
            err.message.contains("\"faq\"") && err.message.contains("namespace ml"),
            "{err:?}"
        );
        assert!(err.message.contains("spec.cachePolicyRef.name"), "{err:?}");
    }

    #[test]
    fn too_little_memory_is_invalid() {
        let mut mc = model_cache("chat", "s3://models/x");
        mc.spec.redis = Some(RedisOverrides {
            memory: Some(Quantity("16Mi".into())),
            ..Default::default()
        });
        let err = validate(&mc, Ok(None)).unwrap_err();
        assert_eq!(err.reason, "RedisMemoryInvalid");
        assert!(err.message.contains("at least 64Mi"), "{err:?}");
    }

    #[test]
    fn a_semantic_gateway_needs_the_policys_threshold() {
        let mut mc = model_cache("faq", "s3://models/x");
        mc.spec.gateway = Some(
            serde_json::from_value(serde_json::json!({"semantic": {
                "embeddingModel": {"name": "all-minilm-l6-v2", "version": "1"}}}))
            .unwrap(),
        );
        let err = validate(&mc, Ok(None)).unwrap_err();
        assert_eq!(err.reason, "SemanticThresholdUnset");
        assert!(
            err.message.contains("modelcache calibrate")
                && err.message.contains("\"all-minilm-l6-v2\"")
                && err.message.contains("spec.cachePolicyRef is unset"),
            "{err:?}"
        );
        let mut policy = CachePolicySpec::default();
        policy.semantic.threshold = Some(0.84);
        assert!(validate(&mc, Ok(Some(policy))).is_ok());
    }

    #[test]
    fn bad_sources_and_long_names_are_invalid() {
        for uri in ["ftp://x/y", "s3://A_B/x", "https://", "s3://ab"] {
            let err = validate(&model_cache("chat", uri), Ok(None)).unwrap_err();
            assert_eq!(err.reason, "SourceInvalid", "{uri}");
            assert!(err.message.contains("spec.source.uri"), "{err:?}");
        }
        let err = validate(&model_cache(&"a".repeat(47), "s3://models/x"), Ok(None)).unwrap_err();
        assert_eq!(err.reason, "NameTooLong");
    }

    #[test]
    fn external_redis_is_checked_against_the_policy() {
        let mut mc = model_cache("chat", "https://cdn.example.com/m");
        mc.spec.redis = Some(RedisOverrides {
            external: Some(ExternalRedis {
                url: "rediss://cache.example.com:6380".into(),
                password_secret_ref: None,
                username: None,
                cluster: false,
            }),
            ..Default::default()
        });
        let spec = validate(&mc, Ok(None)).unwrap();
        let RedisBackend::External { desired, .. } = spec.redis else {
            panic!()
        };
        assert_eq!(desired["maxmemory-policy"], "allkeys-lru");
    }
}
