//! Leader election on a faked API server: two replicas never both lead, a
//! released lease passes at once, an expired one is taken over.

mod support;

use std::time::Duration;

use modelcache::controller::leader::LeaderElector;
use support::fake_api::FakeApiServer;

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/modelcache-system/leases/modelcache-controller";

#[tokio::test]
async fn one_leader_at_a_time() {
    let (client, api) = FakeApiServer::start();
    let a = LeaderElector::new(
        client.clone(),
        "modelcache-system",
        "modelcache-controller",
        "a",
        Duration::from_secs(15),
    );
    let b = LeaderElector::new(
        client.clone(),
        "modelcache-system",
        "modelcache-controller",
        "b",
        Duration::from_secs(15),
    );

    assert!(
        a.try_lead().await.unwrap(),
        "the first candidate creates the lease"
    );
    assert!(
        !b.try_lead().await.unwrap(),
        "a live lease keeps the second out"
    );
    assert!(a.try_lead().await.unwrap(), "the leader renews");
    assert!(!b.try_lead().await.unwrap());
    assert_eq!(api.get(LEASE).unwrap()["spec"]["holderIdentity"], "a");

    a.release().await.unwrap();
    assert!(
        b.try_lead().await.unwrap(),
        "a released lease passes at once"
    );
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert!(!a.try_lead().await.unwrap());
}

#[tokio::test]
async fn an_expired_lease_is_taken_over() {
    let (client, api) = FakeApiServer::start();
    api.insert(
        LEASE,
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "modelcache-controller", "namespace": "modelcache-system"},
            "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 15,
                     "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 4}
        }),
    );
    let a = LeaderElector::new(
        client,
        "modelcache-system",
        "modelcache-controller",
        "a",
        Duration::from_secs(15),
    );
    assert!(a.try_lead().await.unwrap());
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "a");
    assert_eq!(lease["spec"]["leaseTransitions"], 5);
}
