//! The build stage of a reconcile: everything a valid ModelCache should have,
//! as one value computed without IO from the validated spec and the
//! dereferenced credentials. The apply stage sends it; observation checks the
//! running Redis against it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::crd::ModelCache;
use crate::store::live::RedisTarget;
use crate::store::settings;

use super::dereference::Credentials;
use crate::controller::validate::{RedisBackend, ValidSpec};
use crate::controller::{builders, gateway, network};

/// The objects to apply and the Redis to bring in line.
#[derive(Debug, Clone)]
pub struct DesiredResources {
    /// The warm-up prompts for model pods, when the spec has inline prompts.
    pub warmup: Option<ConfigMap>,
    /// The inline CDN headers for the fetch container, when the spec has any.
    pub cdn_headers: Option<ConfigMap>,
    /// A provisioned Redis's objects; `None` for an external Redis.
    pub redis: Option<RedisObjects>,
    /// How the controller reaches the Redis.
    pub target: RedisTarget,
    /// The Redis config the policy asks for.
    pub config: BTreeMap<String, String>,
    /// Whether the controller sets `config` (a Redis it provisioned) or only
    /// compares it (an external one, which may serve others).
    pub enforce: bool,
    /// Whether the Redis is a cluster (keys spread over primaries).
    pub cluster: bool,
    /// The caching gateway's objects, when the spec asks for one.
    pub gateway: Option<GatewayObjects>,
}

/// The caching gateway's objects (its Secret is created once, apart).
#[derive(Debug, Clone)]
pub struct GatewayObjects {
    /// The policy's decisions, as every gateway's environment.
    pub config_map: ConfigMap,
    /// A standalone gateway's Deployment and Service.
    pub standalone: Option<(Deployment, Service)>,
}

/// The objects of a provisioned Redis.
#[derive(Debug, Clone)]
pub struct RedisObjects {
    /// redis.conf.
    pub config_map: ConfigMap,
    /// The Redis pod.
    pub stateful_set: StatefulSet,
    /// Its in-cluster address.
    pub service: Service,
    /// The StatefulSet's governing Service.
    pub headless: Service,
    /// Who may connect to it.
    pub network_policy: NetworkPolicy,
}

/// What the objects depend on besides the spec and the credentials: where the
/// controller runs, and the pods of the workload.
#[derive(Debug, Clone, Copy, Default)]
pub struct Surroundings<'a> {
    /// Replaces the in-cluster Service address of a provisioned Redis (a
    /// controller run outside the cluster, and tests).
    pub redis_url_override: Option<&'a str>,
    /// The controller's namespace, for the Redis NetworkPolicy.
    pub controller_namespace: Option<&'a str>,
    /// The selector of the workload's pods, which the Redis admits.
    pub clients: Option<&'a LabelSelector>,
    /// The modelcache image, which a standalone gateway runs.
    pub image: Option<&'a str>,
}

/// Builds the desired resources.
pub fn build(
    mc: &ModelCache,
    spec: &ValidSpec,
    credentials: &Credentials,
    surroundings: Surroundings<'_>,
) -> DesiredResources {
    let warmup = builders::warmup_config_map(mc);
    let cdn_headers = builders::cdn_headers_config_map(mc);
    let gateway = mc.spec.gateway.as_ref().map(|_| GatewayObjects {
        config_map: gateway::config_map(mc, &spec.policy),
        standalone: surroundings
            .image
            .and_then(|image| gateway::standalone(mc, image)),
    });
    let password = credentials.password().map(str::to_owned);
    match &spec.redis {
        RedisBackend::Provisioned(settings) => {
            let secret_uid = match credentials {
                Credentials::Generated { secret_uid, .. } => secret_uid.as_str(),
                Credentials::External(_) => "",
            };
            let url = surroundings
                .redis_url_override
                .map(str::to_owned)
                .unwrap_or_else(|| builders::service_url(mc));
            DesiredResources {
                warmup,
                cdn_headers,
                redis: Some(RedisObjects {
                    config_map: builders::config_map(mc, settings),
                    stateful_set: builders::stateful_set(mc, settings, secret_uid),
                    service: builders::service(mc),
                    headless: builders::headless_service(mc),
                    network_policy: network::redis_network_policy(
                        mc,
                        surroundings.clients,
                        surroundings.controller_namespace,
                    ),
                }),
                target: RedisTarget {
                    url,
                    username: credentials.username().map(str::to_owned),
                    password,
                },
                config: settings::desired_config(settings),
                enforce: true,
                cluster: false,
                gateway,
            }
        }
        RedisBackend::External { redis, desired } => DesiredResources {
            warmup,
            cdn_headers,
            redis: None,
            target: RedisTarget {
                url: redis.url.clone(),
                username: redis.username.clone(),
                password,
            },
            config: desired.clone(),
            enforce: false,
            cluster: redis.cluster,
            gateway,
        },
    }
}
