//! Leader election through a `coordination.k8s.io/v1` Lease, so that two
//! controller replicas never reconcile at once. The standby takes over when
//! the leader stops renewing; a leader that cannot renew in time stops itself.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Why leader election failed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum LeaderError {
    #[error("failed to {action} Lease {namespace}/{name}")]
    Kube {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder stopped renewing: take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live lease.
    Wait {
        /// The identity of the replica holding it.
        holder: String,
    },
}

/// Pure decision from the Lease's spec.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(t) if t.checked_add(duration).is_ok_and(|expiry| expiry > now) => {
            Decision::Wait { holder }
        }
        _ => Decision::Acquire,
    }
}

/// Takes and renews a coordination.k8s.io Lease, so that one replica reconciles.
pub struct LeaderElector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// An elector for the Lease `name` in `namespace`, as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    fn error(&self, action: &'static str) -> impl FnOnce(kube::Error) -> LeaderError {
        let (namespace, name) = (self.namespace.clone(), self.name.clone());
        move |source| LeaderError::Kube {
            action,
            namespace,
            name,
            source,
        }
    }

    /// One attempt to take or keep the lease. `Ok(false)`: someone else holds it.
    pub async fn try_lead(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let existing = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.error("read"))?;
        let decision = decide(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let stamp = Some(MicroTime(now));
        let mut lease = match (&decision, existing) {
            (Decision::Wait { .. }, _) => return Ok(false),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(self.duration.as_secs() as i32),
                        acquire_time: stamp.clone(),
                        renew_time: stamp,
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(self.error("create")(e)),
                };
            }
            (_, Some(lease)) => lease,
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if decision == Decision::Acquire {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = stamp.clone();
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(self.duration.as_secs() as i32);
        spec.renew_time = stamp;
        // replace() carries the resourceVersion we read: if another replica
        // wrote in between, this fails with 409 and we did not take the lease.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(self.error("update")(e)),
        }
    }

    /// Gives the lease up, so a standby takes over at once instead of after
    /// the lease expires.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.error("read"))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(self.error("release")(e)),
        }
    }

    /// How often the holder renews.
    pub fn renew_period(&self) -> Duration {
        self.duration / 3
    }

    /// How long a Lease lasts without renewal.
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_at: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
            ..Default::default()
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", at(100)), Decision::Acquire);
        assert_eq!(
            decide(Some(&spec(Some("a"), 90)), "a", at(100)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&spec(Some("b"), 90)), "a", at(100)),
            Decision::Wait { holder: "b".into() }
        );
        // b last renewed 16 s ago with a 15 s lease: it is gone.
        assert_eq!(
            decide(Some(&spec(Some("b"), 84)), "a", at(100)),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&spec(None, 99)), "a", at(100)),
            Decision::Acquire
        );
    }
}
