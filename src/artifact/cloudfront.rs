//! CloudFront signed URLs and signed cookies
//! (<https://docs.aws.amazon.com/AmazonCloudFront/latest/DeveloperGuide/private-content-signed-urls.html>):
//! RSA PKCS#1 v1.5 over SHA-1 of a JSON policy, in CloudFront's URL-safe
//! base64. A signature is reused until a fifth of its lifetime is left, then
//! renewed, so a download that outlives one signature keeps going. Signed
//! URLs and cookies are secrets: nothing here logs them, and [`redact`] strips
//! them from every URL that reaches a message.

use parking_lot::Mutex;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::signature::{SignatureEncoding as _, Signer as _};

/// Why CloudFront signing could not be set up.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum CloudFrontError {
    #[error("failed to read the CloudFront private key {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to parse the CloudFront private key {path}: expected an RSA key in PEM (`BEGIN RSA PRIVATE KEY` or `BEGIN PRIVATE KEY`), as CloudFront key groups use"
    )]
    Parse { path: String },
    #[error(
        "failed to sign for CloudFront: the key pair ID is empty; set it to the public key's ID in the key group"
    )]
    KeyPairId,
}

/// Whether the signature travels in the URL's query or in cookies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The signature in the URL's query string (one per file with a canned policy).
    SignedUrl,
    /// The signature in `CloudFront-*` cookies.
    SignedCookies,
}

/// Canned: one exact URL. Custom: a wildcard resource, so one signature covers
/// every file of the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// A policy for one exact URL.
    Canned,
    /// A policy for a wildcard resource: the version's prefix.
    Custom,
}

/// What a request needs to carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signed {
    /// Append to the URL's query.
    Query(String),
    /// The `Cookie` header's value.
    Cookie(String),
}

/// Signs CloudFront requests with a key of the distribution's key group; the key never appears in `Debug`.
pub struct Signer {
    key_pair_id: String,
    key: rsa::pkcs1v15::SigningKey<sha1::Sha1>,
    mode: Mode,
    policy: Policy,
    lifetime: Duration,
    // (resource, expires, signed) of the last custom-policy signature.
    cached: Mutex<Option<(String, u64, Signed)>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Signer")
            .field("key_pair_id", &self.key_pair_id)
            .field("mode", &self.mode)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a PEM file of the RSA private key; errors name the file, never its content.
    pub fn from_pem_file(
        path: &Path,
        key_pair_id: &str,
        mode: Mode,
        policy: Policy,
        lifetime: Duration,
    ) -> Result<Self, CloudFrontError> {
        let pem = std::fs::read_to_string(path).map_err(|source| CloudFrontError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&pem, key_pair_id, mode, policy, lifetime).map_err(|e| match e {
            CloudFrontError::Parse { .. } => CloudFrontError::Parse {
                path: path.display().to_string(),
            },
            other => other,
        })
    }

    /// A signer from PEM text.
    pub fn from_pem(
        pem: &str,
        key_pair_id: &str,
        mode: Mode,
        policy: Policy,
        lifetime: Duration,
    ) -> Result<Self, CloudFrontError> {
        if key_pair_id.trim().is_empty() {
            return Err(CloudFrontError::KeyPairId);
        }
        let key = rsa::PrivateKey::from_pkcs1_pem(pem)
            .or_else(|_| rsa::PrivateKey::from_pkcs8_pem(pem))
            .map_err(|_| CloudFrontError::Parse {
                path: "(inline)".into(),
            })?;
        Ok(Signer {
            key_pair_id: key_pair_id.trim().into(),
            key: rsa::pkcs1v15::SigningKey::new(key),
            mode,
            policy,
            lifetime: lifetime.max(Duration::from_secs(60)),
            cached: Mutex::new(None),
        })
    }

    /// CloudFront's signature of `policy`: base64 with `+=/` replaced by `-_~`.
    pub fn signature(&self, policy: &str) -> String {
        let signature = self.key.sign(policy.as_bytes());
        cloudfront_base64(&signature.to_bytes())
    }

    /// What a request for `url` must carry. `resource` is the wildcard a custom
    /// policy grants (the version's prefix followed by `*`).
    pub fn sign(&self, url: &str, resource: &str) -> Signed {
        self.sign_at(url, resource, unix_now())
    }

    fn sign_at(&self, url: &str, resource: &str, now: u64) -> Signed {
        let lifetime = self.lifetime.as_secs();
        match self.policy {
            Policy::Canned => {
                let expires = now + lifetime;
                let signature = self.signature(&canned_policy(url, expires));
                self.carry(&[
                    ("Expires", expires.to_string()),
                    ("Signature", signature),
                    ("Key-Pair-Id", self.key_pair_id.clone()),
                ])
            }
            Policy::Custom => {
                let mut cached = self.cached.lock();
                if let Some((r, expires, signed)) = cached.as_ref()
                    && r == resource
                    && *expires > now + lifetime / 5
                {
                    return signed.clone();
                }
                let expires = now + lifetime;
                let policy = custom_policy(resource, expires);
                let signed = self.carry(&[
                    ("Policy", cloudfront_base64(policy.as_bytes())),
                    ("Signature", self.signature(&policy)),
                    ("Key-Pair-Id", self.key_pair_id.clone()),
                ]);
                *cached = Some((resource.into(), expires, signed.clone()));
                signed
            }
        }
    }

    fn carry(&self, fields: &[(&str, String)]) -> Signed {
        match self.mode {
            Mode::SignedUrl => Signed::Query(
                fields
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&"),
            ),
            Mode::SignedCookies => Signed::Cookie(
                fields
                    .iter()
                    .map(|(k, v)| format!("CloudFront-{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        }
    }
}

/// The canned policy CloudFront reconstructs from a URL and `Expires`: exact
/// bytes, no whitespace.
pub fn canned_policy(url: &str, expires: u64) -> String {
    format!(
        r#"{{"Statement":[{{"Resource":"{url}","Condition":{{"DateLessThan":{{"AWS:EpochTime":{expires}}}}}}}]}}"#
    )
}

/// A custom policy granting `resource` (which may end in `*`) until `expires`.
pub fn custom_policy(resource: &str, expires: u64) -> String {
    serde_json::json!({
        "Statement": [{
            "Resource": resource,
            "Condition": {"DateLessThan": {"AWS:EpochTime": expires}}
        }]
    })
    .to_string()
}

/// Base64 with CloudFront's substitutions for characters URLs mangle.
pub fn cloudfront_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .chars()
        .map(|c| match c {
            '+' => '-',
            '=' => '_',
            '/' => '~',
            c => c,
        })
        .collect()
}

/// `url` without its query and fragment: what messages and logs may show.
pub fn redact(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let mut out = url[..end].to_string();
    // Credentials in the authority never reach a message either.
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let host_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..host_end].rfind('@') {
            out = format!("{}{}", &out[..scheme_end + 3], &rest[at + 1..]);
        }
    }
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A throwaway 2048-bit key, made with `openssl genrsa -traditional 2048` (tests/fixtures/cloudfront-test-key.pem); the
    // known answers against openssl live in tests/fetch_cloudfront.rs.
    const KEY: &str = include_str!("../../tests/fixtures/cloudfront-test-key.pem");

    fn signer(mode: Mode, policy: Policy) -> Signer {
        Signer::from_pem(
            KEY,
            "K2JCJMDEHXQW5F",
            mode,
            policy,
            Duration::from_secs(600),
        )
        .unwrap()
    }

    #[test]
    fn canned_policy_is_exact() {
        assert_eq!(
            canned_policy(
                "https://d111111abcdef8.cloudfront.net/image.jpg",
                1357034400
            ),
            r#"{"Statement":[{"Resource":"https://d111111abcdef8.cloudfront.net/image.jpg","Condition":{"DateLessThan":{"AWS:EpochTime":1357034400}}}]}"#
        );
    }

    #[test]
    fn base64_uses_cloudfront_substitutions() {
        assert_eq!(cloudfront_base64(&[0xfb, 0xff, 0xfe]), "-~~-");
        assert_eq!(cloudfront_base64(b"a"), "YQ__");
    }

    #[test]
    fn signed_urls_carry_expires_signature_and_key_pair() {
        let s = signer(Mode::SignedUrl, Policy::Canned);
        let Signed::Query(q) = s.sign_at("https://cdn/x", "https://cdn/*", 1000) else {
            panic!("query expected")
        };
        assert!(q.starts_with("Expires=1600&Signature="), "{q}");
        assert!(q.ends_with("&Key-Pair-Id=K2JCJMDEHXQW5F"), "{q}");
        let signature = q
            .split("&Signature=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        assert!(
            !signature.contains(['+', '/', '=']),
            "URL-safe: {signature}"
        );
    }

    #[test]
    fn custom_signatures_are_reused_then_renewed_before_they_expire() {
        let s = signer(Mode::SignedCookies, Policy::Custom);
        let a = s.sign_at("https://cdn/m/v/a", "https://cdn/m/v/*", 1000);
        let b = s.sign_at("https://cdn/m/v/b", "https://cdn/m/v/*", 1400);
        assert_eq!(a, b, "one signature covers the version while it is fresh");
        // 600 s lifetime: renewed once less than 120 s are left.
        let c = s.sign_at("https://cdn/m/v/b", "https://cdn/m/v/*", 1481);
        assert_ne!(a, c);
        let Signed::Cookie(cookie) = c else {
            panic!("cookie expected")
        };
        assert!(cookie.starts_with("CloudFront-Policy="), "{cookie}");
        assert!(cookie.contains("; CloudFront-Signature="), "{cookie}");
        assert!(cookie.ends_with("; CloudFront-Key-Pair-Id=K2JCJMDEHXQW5F"));
    }

    #[test]
    fn redact_drops_query_fragment_and_userinfo() {
        assert_eq!(
            redact("https://u:p@cdn.example/m/v/a.bin?Signature=abc&Key-Pair-Id=K#x"),
            "https://cdn.example/m/v/a.bin"
        );
        assert_eq!(redact("s3://bucket/m/v/a"), "s3://bucket/m/v/a");
    }

    #[test]
    fn bad_keys_are_refused_with_the_expected_format() {
        let err = Signer::from_pem(
            "not a key",
            "K",
            Mode::SignedUrl,
            Policy::Canned,
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(err.to_string().contains("BEGIN RSA PRIVATE KEY"), "{err}");
        assert!(matches!(
            Signer::from_pem(
                KEY,
                " ",
                Mode::SignedUrl,
                Policy::Canned,
                Duration::from_secs(60)
            ),
            Err(CloudFrontError::KeyPairId)
        ));
    }
}
