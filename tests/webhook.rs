//! The injection webhook served over TLS on loopback, with a certificate the
//! controller issued: the API server's request (an AdmissionReview fixture)
//! gets the patch, an unannotated pod none, a client that does not trust
//! the webhook's CA cannot talk to it, and a renewed certificate is served
//! from the next connection on.

mod support;

use std::sync::Arc;
use std::time::Duration;

use modelcache::controller::inject::{FailurePolicy, InjectConfig};
use modelcache::controller::webhook;
use modelcache::crd::ModelCache;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("tests/fixtures/inject/{name}")).unwrap()
}

/// The webhook on a free loopback port, with a certificate for `localhost`
/// from its own CA: the port, the issued material and the server's task.
async fn start(
    lookup: webhook::Lookup,
) -> (u16, webhook::TlsMaterial, tokio::task::JoinHandle<()>) {
    let names = vec!["localhost".to_string()];
    let material = webhook::issue(&names, k8s_openapi::jiff::Timestamp::now()).unwrap();
    let serving = webhook::ServingCert::new(&material.cert_pem, &material.key_pem).unwrap();
    let tls = webhook::server_config(serving).unwrap();
    let listener = webhook::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(webhook::serve(
        listener,
        tls,
        lookup,
        InjectConfig {
            image: "ghcr.io/modelcache/modelcache:0.1.0".into(),
            failure_policy: FailurePolicy::Fail,
            node_agent_port: None,
        },
    ));
    (port, material, server)
}

#[tokio::test]
async fn the_webhook_answers_over_tls_with_its_own_ca() {
    let chat: ModelCache = serde_saphyr::from_str(
        &std::fs::read_to_string("tests/fixtures/builders/chat/modelcache.yaml").unwrap(),
    )
    .unwrap();
    let lookups = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = lookups.clone();
    let lookup: webhook::Lookup = Arc::new(move |namespace: String, name: String| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found = (namespace == "ml-serving" && name == "chat").then(|| chat.clone());
        Box::pin(async move { Ok(found) })
    });
    let (port, material, server) = start(lookup).await;

    let url = format!("https://localhost:{port}/mutate");
    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(material.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let post = |body: Vec<u8>| {
        let client = trusting.clone();
        let url = url.clone();
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap()
        }
    };
    let annotated = post(fixture("annotated.json")).await;
    assert_eq!(annotated["response"]["allowed"], true);
    assert_eq!(annotated["response"]["patchType"], "JSONPatch");
    let unannotated = post(fixture("unannotated.json")).await;
    assert_eq!(unannotated["response"]["allowed"], true);
    assert!(unannotated["response"].get("patch").is_none());
    let unknown = post(fixture("unknown.json")).await;
    assert_eq!(unknown["response"]["allowed"], false);
    // Only annotated pods cost a lookup.
    assert_eq!(lookups.load(std::sync::atomic::Ordering::Relaxed), 2);

    // A client with the system roots only does not trust a self-issued CA.
    let stranger = reqwest::Client::builder().build().unwrap();
    assert!(
        stranger
            .post(&url)
            .body(fixture("annotated.json"))
            .send()
            .await
            .is_err()
    );
    server.abort();
}

/// A client that connects and never says hello must not stall every other
/// admission: handshakes run side by side, each within its own timeout. (They
/// ran one at a time inside accept(), with a 10 s timeout equal to the
/// webhook's own, so one idle client made the API server time out.)
#[tokio::test]
async fn an_idle_client_does_not_hold_back_other_admissions() {
    let lookup: webhook::Lookup =
        Arc::new(|_: String, _: String| Box::pin(async move { Ok(None) }));
    let (port, material, server) = start(lookup).await;
    // Three connections that send nothing, held open throughout.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(material.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let request = client
        .post(format!("https://localhost:{port}/mutate"))
        .header("content-type", "application/json")
        .body(fixture("unannotated.json"))
        .send();
    // Well inside the 10 s an idle handshake may take.
    let answered = tokio::time::timeout(Duration::from_secs(5), request).await;
    assert!(
        matches!(&answered, Ok(Ok(r)) if r.status() == 200),
        "{answered:?}"
    );
    drop(idle);
    server.abort();
}

/// A replica notices another's renewal by reading the Secret (`read_tls`,
/// every minute), not only at its own six-hourly check: it serves the new
/// certificate within a minute, and the read writes nothing.
#[tokio::test]
async fn a_renewal_by_another_replica_is_read_without_writing() {
    use support::fake_api::FakeApiServer;
    let (client, api) = FakeApiServer::start();
    let configuration = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mc";
    api.insert(
        configuration,
        serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mc"},
            "webhooks": [{"name": "inject.modelcache.dev", "admissionReviewVersions": ["v1"],
                          "sideEffects": "None",
                          "clientConfig": {"service": {"name": "mc-webhook", "namespace": "mc-system"}}}]
        }),
    );
    let secret = "/api/v1/namespaces/mc-system/secrets/mc-webhook-tls";
    let ensure = || webhook::ensure_tls(&client, "mc-system", "mc-webhook-tls", "mc-webhook", "mc");
    let read = || webhook::read_tls(&client, "mc-system", "mc-webhook-tls", "mc-webhook");

    assert!(read().await.unwrap().is_none(), "no Secret yet");
    let first = ensure().await.unwrap();
    assert_eq!(read().await.unwrap().unwrap().cert_pem, first.cert_pem);
    // Another replica issues anew (here: after the Secret was lost).
    api.remove(secret).unwrap();
    let renewed = ensure().await.unwrap();
    assert_ne!(renewed.cert_pem, first.cert_pem);
    api.take_requests();
    let seen = read().await.unwrap().expect("current material");
    assert_eq!(seen.cert_pem, renewed.cert_pem);
    assert_eq!(seen.key_pem, renewed.key_pem);
    let requests: Vec<String> = api.take_requests().iter().map(|r| r.line()).collect();
    assert_eq!(requests, [format!("GET {secret}")]);
}
