//! The injection webhook served over TLS on loopback, with a certificate the
//! controller issued: the API server's request (an AdmissionReview fixture)
//! gets the patch, an unannotated pod none, a client that does not trust
//! the webhook's CA cannot talk to it, and a renewed certificate is served
//! from the next connection on.

mod support;

use std::sync::Arc;

use modelcache::controller::inject::{FailurePolicy, InjectConfig};
use modelcache::controller::webhook;
use modelcache::crd::ModelCache;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("tests/fixtures/inject/{name}")).unwrap()
}

#[tokio::test]
async fn the_webhook_answers_over_tls_with_its_own_ca() {
    let names = vec!["localhost".to_string()];
    let material = webhook::issue(&names, k8s_openapi::jiff::Timestamp::now()).unwrap();
    let serving = webhook::ServingCert::new(&material.cert_pem, &material.key_pem).unwrap();
    let tls = webhook::server_config(serving.clone()).unwrap();
    let listener = webhook::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
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
    let server = tokio::spawn(webhook::serve(
        listener,
        tls,
        lookup,
        InjectConfig {
            image: "ghcr.io/modelcache/modelcache:0.1.0".into(),
            failure_policy: FailurePolicy::Fail,
        },
    ));

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
