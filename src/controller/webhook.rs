//! The admission webhook that injects modelcache into model pods
//! ([`super::inject`]), served over TLS by the controller.
//!
//! TLS is managed by the controller unless cert-manager is: it keeps a CA
//! and a serving certificate for the webhook Service's DNS names in one
//! Secret, issues them when the Secret is missing, names other hosts, or
//! is within 30 days of expiry, and patches the CA into the
//! MutatingWebhookConfiguration's `caBundle`. The pure parts (is the Secret
//! current, the Secret, the patch) are here; the client calls are in
//! [`ensure_tls`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff;
use serde_json::Value;

use super::inject::{InjectConfig, review};
use crate::crd::ModelCache;

/// Annotations on the TLS Secret: when its certificate expires (RFC 3339)
/// and which names it serves, so that renewal needs no X.509 parsing.
pub const NOT_AFTER_ANNOTATION: &str = "modelcache.dev/not-after";
/// Annotation of the TLS Secret: the DNS names its certificate covers.
pub const DNS_NAMES_ANNOTATION: &str = "modelcache.dev/dns-names";
/// Renew this long before expiry.
const RENEW_BEFORE: jiff::SignedDuration = jiff::SignedDuration::from_hours(30 * 24);
const VALID_FOR: jiff::SignedDuration = jiff::SignedDuration::from_hours(365 * 24);

/// Why the injection webhook could not start or keep its certificate.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum WebhookError {
    #[error("failed to issue the webhook's certificate")]
    Issue(#[source] rcgen::Error),
    #[error("failed to date the webhook's certificate")]
    Date(#[source] jiff::Error),
    #[error("failed to load the webhook's certificate and key")]
    Tls(#[source] rustls::Error),
    #[error("failed to read {what} from the webhook TLS Secret {secret}")]
    Incomplete { what: &'static str, secret: String },
    #[error("failed to {action} {what}")]
    Kube {
        action: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to listen on {addr} for the webhook")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A CA and a serving certificate signed by it, PEM.
#[derive(Clone, PartialEq)]
pub struct TlsMaterial {
    /// The CA certificate, for the caBundle.
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving certificate's private key.
    pub key_pem: String,
    /// When the serving certificate expires.
    pub not_after: jiff::Timestamp,
}

impl std::fmt::Debug for TlsMaterial {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The DNS names the API server may use for the webhook Service.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Issue a new CA and a serving certificate for `dns_names`, valid a year
/// from `now`.
pub fn issue(dns_names: &[String], now: jiff::Timestamp) -> Result<TlsMaterial, WebhookError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let not_after = now + VALID_FOR;
    let window = |p: &mut CertificateParams| {
        // Whole days: a day of slack for clocks behind ours.
        let (y, m, d) = ymd(now - jiff::SignedDuration::from_hours(24));
        p.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = ymd(not_after);
        p.not_after = rcgen::date_time_ymd(y, m, d);
    };
    let ca_key = KeyPair::generate().map_err(WebhookError::Issue)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "modelcache webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    window(&mut ca);
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).map_err(WebhookError::Issue)?;

    let key = KeyPair::generate().map_err(WebhookError::Issue)?;
    let mut leaf = CertificateParams::new(dns_names.to_vec()).map_err(WebhookError::Issue)?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    window(&mut leaf);
    let cert = leaf.signed_by(&key, &ca).map_err(WebhookError::Issue)?;
    let date = not_after.to_zoned(jiff::tz::TimeZone::UTC).date();
    Ok(TlsMaterial {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        // What the certificate says: midnight UTC of that day.
        not_after: date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map_err(WebhookError::Date)?
            .timestamp(),
    })
}

fn ymd(t: jiff::Timestamp) -> (i32, u8, u8) {
    let d = t.to_zoned(jiff::tz::TimeZone::UTC).date();
    (i32::from(d.year()), d.month() as u8, d.day() as u8)
}

/// The Secret that keeps `material`.
pub fn tls_secret(
    name: &str,
    namespace: &str,
    material: &TlsMaterial,
    dns_names: &[String],
) -> Secret {
    let data = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "modelcache".to_string(),
            )])),
            annotations: Some(BTreeMap::from([
                (
                    NOT_AFTER_ANNOTATION.to_string(),
                    material.not_after.to_string(),
                ),
                (DNS_NAMES_ANNOTATION.to_string(), dns_names.join(",")),
            ])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_string(), data(&material.ca_pem)),
            ("tls.crt".to_string(), data(&material.cert_pem)),
            ("tls.key".to_string(), data(&material.key_pem)),
        ])),
        ..Default::default()
    }
}

/// The material in `secret`, if it is complete, serves `dns_names` and is
/// not within 30 days of expiry at `now`.
pub fn current_material(
    secret: &Secret,
    dns_names: &[String],
    now: jiff::Timestamp,
) -> Option<TlsMaterial> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let not_after: jiff::Timestamp = annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?;
    if annotations.get(DNS_NAMES_ANNOTATION)? != &dns_names.join(",") {
        return None;
    }
    if now + RENEW_BEFORE >= not_after {
        return None;
    }
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(TlsMaterial {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after,
    })
}

/// Set `ca_pem` as the caBundle of every webhook of `configuration`;
/// whether anything changed.
pub fn set_ca_bundle(configuration: &mut MutatingWebhookConfiguration, ca_pem: &str) -> bool {
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let mut changed = false;
    for w in configuration.webhooks.iter_mut().flatten() {
        if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
            w.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    changed
}

/// The material the TLS Secret holds now, if it is current, without
/// issuing or writing anything: how a replica notices, within a minute, a
/// renewal another replica made (so that it serves the new certificate long
/// before its own six-hourly check).
pub async fn read_tls(
    client: &kube::Client,
    namespace: &str,
    secret_name: &str,
    service: &str,
) -> Result<Option<TlsMaterial>, WebhookError> {
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(secret_name)
        .await
        .map_err(|source| WebhookError::Kube {
            action: "read",
            what: format!("Secret {namespace}/{secret_name}"),
            source,
        })?;
    let dns_names = service_dns_names(service, namespace);
    let now = jiff::Timestamp::now();
    Ok(secret.and_then(|s| current_material(&s, &dns_names, now)))
}

/// Make sure the TLS Secret holds current material and the webhook
/// configuration trusts its CA; returns the material to serve with.
pub async fn ensure_tls(
    client: &kube::Client,
    namespace: &str,
    secret_name: &str,
    service: &str,
    configuration: &str,
) -> Result<TlsMaterial, WebhookError> {
    use kube::api::{Api, PostParams};
    let kube_err = |action: &'static str, what: String| {
        move |source| WebhookError::Kube {
            action,
            what,
            source,
        }
    };
    let dns_names = service_dns_names(service, namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let now = jiff::Timestamp::now();
    let existing = secrets.get_opt(secret_name).await.map_err(kube_err(
        "read",
        format!("Secret {namespace}/{secret_name}"),
    ))?;
    let material = match existing
        .as_ref()
        .and_then(|s| current_material(s, &dns_names, now))
    {
        Some(m) => m,
        None => {
            let material = issue(&dns_names, now)?;
            match existing {
                None => {
                    let desired = tls_secret(secret_name, namespace, &material, &dns_names);
                    match secrets.create(&PostParams::default(), &desired).await {
                        Ok(_) => material,
                        // Another replica created it meanwhile: use theirs.
                        Err(kube::Error::Api(s)) if s.code == 409 => {
                            let theirs = secrets.get(secret_name).await.map_err(kube_err(
                                "read",
                                format!("Secret {namespace}/{secret_name}"),
                            ))?;
                            current_material(&theirs, &dns_names, now).ok_or(
                                WebhookError::Incomplete {
                                    what: "a current certificate",
                                    secret: secret_name.into(),
                                },
                            )?
                        }
                        Err(e) => {
                            return Err(kube_err(
                                "create",
                                format!("Secret {namespace}/{secret_name}"),
                            )(e));
                        }
                    }
                }
                Some(old) => {
                    // The other replicas serve the old certificate until they
                    // reload (up to 6 h): the bundle keeps the old CA too.
                    let mut material = material;
                    let old_ca = old
                        .data
                        .as_ref()
                        .and_then(|d| d.get("ca.crt"))
                        .and_then(|b| std::str::from_utf8(&b.0).ok())
                        .unwrap_or_default();
                    material.ca_pem = ca_bundle(&material.ca_pem, old_ca);
                    // Replace only the version we read, so two replicas
                    // renewing at once do not each install their own.
                    let mut desired = tls_secret(secret_name, namespace, &material, &dns_names);
                    desired.metadata.resource_version = old.metadata.resource_version.clone();
                    secrets
                        .replace(secret_name, &PostParams::default(), &desired)
                        .await
                        .map_err(kube_err(
                            "renew",
                            format!("Secret {namespace}/{secret_name}"),
                        ))?;
                    material
                }
            }
        }
    };
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let what = format!("MutatingWebhookConfiguration {configuration}");
    let mut current = configs
        .get(configuration)
        .await
        .map_err(kube_err("read", what.clone()))?;
    // A replace of the version read: a concurrent change fails it, and the
    // next start tries again.
    if set_ca_bundle(&mut current, &material.ca_pem) {
        configs
            .replace(configuration, &PostParams::default(), &current)
            .await
            .map_err(kube_err("set the caBundle of", what))?;
    }
    Ok(material)
}

/// The CA bundle after a renewal: the new CA, then the previous one (the
/// first certificate of the old bundle), so that a replica still serving a
/// certificate of the old CA is trusted until it reloads. Two at most.
pub fn ca_bundle(new_ca: &str, old_bundle: &str) -> String {
    const END: &str = "-----END CERTIFICATE-----";
    let previous = old_bundle
        .find(END)
        .map(|i| old_bundle[..i + END.len()].trim())
        .filter(|p| !p.is_empty() && *p != new_ca.trim());
    match previous {
        Some(previous) => format!("{}\n{previous}\n", new_ca.trim_end()),
        None => new_ca.to_owned(),
    }
}

/// Looks a ModelCache up by namespace and name: `Ok(None)` when there is
/// none, `Err` (why, for the message) when the lookup failed.
pub type Lookup = Arc<
    dyn Fn(
            String,
            String,
        ) -> Pin<Box<dyn Future<Output = Result<Option<ModelCache>, String>> + Send>>
        + Send
        + Sync,
>;

/// A lookup through the API server.
pub fn api_lookup(client: kube::Client) -> Lookup {
    Arc::new(move |namespace: String, name: String| {
        let client = client.clone();
        Box::pin(async move {
            let api: kube::Api<ModelCache> = kube::Api::namespaced(client, &namespace);
            api.get_opt(&name).await.map_err(|e| {
                let why = crate::error::chain(&e);
                tracing::warn!(error = %why, "failed to read a ModelCache for the webhook");
                why
            })
        })
    })
}

/// The certificate the webhook serves, replaceable while it serves: a
/// renewal (ours, or cert-manager's) takes effect without a restart.
#[derive(Debug)]
pub struct ServingCert(parking_lot::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl ServingCert {
    /// A certificate to serve from PEM text.
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<ServingCert>, WebhookError> {
        Ok(Arc::new(ServingCert(parking_lot::RwLock::new(Arc::new(
            certified_key(cert_pem, key_pem)?,
        )))))
    }

    /// Serve `cert_pem` from the next handshake on.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), WebhookError> {
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        *self.0.write() = key;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certified_key(
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::sign::CertifiedKey, WebhookError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let incomplete = |what| WebhookError::Incomplete {
        what,
        secret: "(loaded)".into(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| incomplete("tls.crt"))?;
    if certs.is_empty() {
        return Err(incomplete("tls.crt"));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| incomplete("tls.key"))?;
    rustls::sign::CertifiedKey::from_der(certs, key, &provider()).map_err(WebhookError::Tls)
}

/// The rustls server config serving `cert`, on the tree's one crypto
/// provider.
pub fn server_config(cert: Arc<ServingCert>) -> Result<rustls::ServerConfig, WebhookError> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(WebhookError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(cert))
}

/// Serve `POST /mutate` over TLS on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    lookup: Lookup,
    config: InjectConfig,
) {
    use axum::routing::post;
    let config = Arc::new(config);
    let app = axum::Router::new().route(
        "/mutate",
        post(move |body: axum::body::Bytes| {
            let lookup = lookup.clone();
            let config = config.clone();
            async move {
                use axum::http::{StatusCode, header};
                let json = [(header::CONTENT_TYPE, "application/json")];
                let Ok(request) = serde_json::from_slice::<Value>(&body) else {
                    return (
                        StatusCode::BAD_REQUEST,
                        json,
                        b"expected an AdmissionReview (JSON)".to_vec(),
                    );
                };
                // The one lookup a review may need, made before the pure
                // decision (and only for annotated pods not yet injected).
                let found = match super::inject::lookup_for(&request) {
                    Some((namespace, name)) => lookup(namespace, name).await,
                    None => Ok(None),
                };
                let response = review(&request, |_, _| found.clone(), &config);
                (StatusCode::OK, json, response.to_string().into_bytes())
            }
        }),
    );
    let Ok(listener) = TlsListener::start(listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
    else {
        tracing::error!("the webhook's listener has no local address");
        return;
    };
    let _ = axum::serve(listener, app).await;
}

/// How long one client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TCP accepted in a task of its own, each TLS handshake in a task of its
/// own (bounded by [`HANDSHAKE_TIMEOUT`]), the streams that completed handed
/// to the server: a client that stalls holds back no one else.
struct TlsListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    _accepting: AbortOnDrop,
}

/// Stops the accept loop with the listener.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TlsListener {
    fn start(
        tcp: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: do not spin.
                        tracing::warn!(error = %e, "the webhook failed to accept a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = acceptor.accept(stream);
                    if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        let _ = tx.send((tls, addr)).await;
                    }
                });
            }
        });
        Ok(TlsListener {
            local,
            ready,
            _accepting: AbortOnDrop(accepting),
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended (it never does while the listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Bind `addr` for the webhook.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, WebhookError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WebhookError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn a_renewal_keeps_the_previous_ca_in_the_bundle_and_no_older_one() {
        let names = service_dns_names("modelcache-webhook", "modelcache-system");
        let (a, b, c) = (
            issue(&names, at(1_800_000_000)).unwrap().ca_pem,
            issue(&names, at(1_800_000_000)).unwrap().ca_pem,
            issue(&names, at(1_800_000_000)).unwrap().ca_pem,
        );
        assert_eq!(ca_bundle(&a, ""), a, "a first issue has no previous CA");
        let ab = ca_bundle(&b, &a);
        assert!(
            ab.starts_with(b.trim_end()) && ab.contains(a.trim()),
            "{ab}"
        );
        let bca = ca_bundle(&c, &ab);
        assert_eq!(bca.matches("BEGIN CERTIFICATE").count(), 2, "{bca}");
        assert!(bca.contains(b.trim()) && !bca.contains(a.trim()));
        assert_eq!(ca_bundle(&a, &a), a, "the same CA once");
    }

    #[test]
    fn issued_material_is_kept_and_renewed_30_days_before_expiry() {
        let names = service_dns_names("modelcache-webhook", "modelcache-system");
        let now = at(1_800_000_000);
        let material = issue(&names, now).unwrap();
        assert!(material.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(material.key_pem.contains("PRIVATE KEY"));
        let days = (material.not_after.as_second() - now.as_second()) / 86_400;
        assert!((364..=366).contains(&days), "{days}");
        // The key is never printed.
        assert!(!format!("{material:?}").contains("PRIVATE"));

        let secret = tls_secret(
            "modelcache-webhook-tls",
            "modelcache-system",
            &material,
            &names,
        );
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(
            current_material(&secret, &names, now),
            Some(material.clone())
        );
        // 31 days before expiry: kept; 29: renewed.
        let day = jiff::SignedDuration::from_hours(24);
        assert!(current_material(&secret, &names, material.not_after - day * 31).is_some());
        assert!(current_material(&secret, &names, material.not_after - day * 29).is_none());
        // Another Service name: renewed.
        let other = service_dns_names("other", "modelcache-system");
        assert!(current_material(&secret, &other, now).is_none());
        // A Secret someone emptied: renewed.
        let mut emptied = secret.clone();
        emptied.data.as_mut().unwrap().remove("tls.key");
        assert!(current_material(&emptied, &names, now).is_none());
        // The pair loads into rustls; a key of another certificate does not.
        let serving = ServingCert::new(&material.cert_pem, &material.key_pem).unwrap();
        server_config(serving.clone()).unwrap();
        let other = issue(&names, now).unwrap();
        assert!(serving.replace(&material.cert_pem, &other.key_pem).is_err());
    }

    #[test]
    fn the_ca_bundle_is_set_on_every_webhook_once() {
        let mut config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "modelcache"},
            "webhooks": [
                {"name": "inject.modelcache.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"service": {"name": "modelcache-webhook", "namespace": "modelcache-system"}}}
            ]
        }))
        .unwrap();
        assert!(set_ca_bundle(&mut config, "CA PEM"));
        let webhooks = config.webhooks.as_ref().unwrap();
        assert_eq!(
            webhooks[0].client_config.ca_bundle.as_ref().unwrap().0,
            b"CA PEM"
        );
        assert!(
            !set_ca_bundle(&mut config, "CA PEM"),
            "a second pass changes nothing"
        );
        assert!(set_ca_bundle(&mut config, "NEW CA"));
    }
}
