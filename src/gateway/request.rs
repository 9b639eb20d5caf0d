//! What the exact layer makes of a chat or completions request: whether it
//! may be cached, its key, and the caller's scope.
//!
//! The key covers every field that can change the output, and any field the
//! gateway does not know: unknown means included, so a new sampling option
//! can only make requests miss, never make different requests share an
//! answer (LiteLLM and litellm-rs left out `response_format` and
//! `parallel_tool_calls`). Only fields that cannot change the output are
//! left out: `stream`, `stream_options` and `user`.

use serde_json::Value;

/// The fields left out of the key: they change how the answer is delivered
/// or who is billed, not what it says.
pub const IGNORED: [&str; 3] = ["stream", "stream_options", "user"];

/// OpenAI's default sampling temperature: a request that names none samples.
const DEFAULT_TEMPERATURE: f64 = 1.0;

/// The endpoints the caches serve; everything else passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

impl Endpoint {
    /// The endpoint of a request path, if the caches serve it.
    pub fn of_path(path: &str) -> Option<Endpoint> {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
        }
    }
}

/// Why a request is answered by the upstream without the exact layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Bypass {
    /// The body is not a JSON object.
    NotAnObject,
    /// It samples (a temperature above 0, or none: OpenAI's default is 1),
    /// so the same request may get another answer.
    Sampled {
        /// The temperature it asks for, or the default.
        temperature: f64,
    },
    /// It asks for several choices (`n` above 1).
    Several {
        /// The number of choices.
        n: u64,
    },
}

/// The request with the fields that cannot change the output removed, for
/// the key: everything else is kept, known or not.
pub fn canonical(body: &Value) -> Option<Value> {
    let mut fields = body.as_object()?.clone();
    for ignored in IGNORED {
        fields.remove(ignored);
    }
    Some(Value::Object(fields))
}

/// Whether the exact layer may answer `body`: `None` when it may; with
/// `allow_sampling` (a CachePolicy's choice) sampled requests and several
/// choices are cached too.
pub fn bypass(body: &Value, allow_sampling: bool) -> Option<Bypass> {
    let Some(fields) = body.as_object() else {
        return Some(Bypass::NotAnObject);
    };
    if allow_sampling {
        return None;
    }
    let temperature = match fields.get("temperature") {
        None | Some(Value::Null) => DEFAULT_TEMPERATURE,
        Some(t) => t.as_f64().unwrap_or(DEFAULT_TEMPERATURE),
    };
    if temperature > 0.0 {
        return Some(Bypass::Sampled { temperature });
    }
    match fields.get("n").and_then(Value::as_u64) {
        Some(n) if n > 1 => Some(Bypass::Several { n }),
        _ => None,
    }
}

/// The exact layer's key digest of a request to `endpoint`: SHA-256 of the
/// endpoint and the canonical JSON (object keys sorted at every level) of
/// [`canonical`]. `None` for a body that is not an object.
pub fn key_digest(endpoint: Endpoint, body: &Value) -> Option<String> {
    let canonical = canonical(body)?;
    let text = format!(
        "{}\n{}",
        endpoint.name(),
        crate::cache::codec::canonical_json(&canonical)
    );
    Some(crate::digest::sha256_hex(text.as_bytes()))
}

/// Whose cache a request reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Callers with this credential: an HMAC of their `Authorization`
    /// header under the gateway's secret. The credential itself is never
    /// stored, and the scope cannot be turned back into it.
    Caller(String),
    /// Callers that sent no credential.
    Anonymous,
    /// Every caller: a policy's explicit opt-in (one company-wide FAQ).
    Shared,
}

impl Scope {
    /// The scope's part of an entry's key.
    pub fn tag(&self) -> String {
        match self {
            Scope::Caller(hmac) => format!("caller:{hmac}"),
            Scope::Anonymous => "anonymous".into(),
            Scope::Shared => "shared".into(),
        }
    }
}

/// The scope of a request from its `Authorization` header (`None`: absent
/// or empty), under `secret`, the gateway's own key.
pub fn scope(authorization: Option<&str>, secret: &[u8]) -> Scope {
    match authorization.map(str::trim).filter(|a| !a.is_empty()) {
        None => Scope::Anonymous,
        Some(credential) => {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            let tag = aws_lc_rs::hmac::sign(&key, credential.as_bytes());
            Scope::Caller(crate::digest::hex(tag.as_ref()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(extra: Value) -> Value {
        let mut body = json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is our PTO policy?"}],
            "temperature": 0
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    }

    fn key(body: &Value) -> String {
        key_digest(Endpoint::Chat, body).unwrap()
    }

    #[test]
    fn delivery_and_billing_fields_leave_the_key_alone() {
        let plain = key(&chat(json!({})));
        let delivered = chat(json!({
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "alice"
        }));
        assert_eq!(key(&delivered), plain);
    }

    #[test]
    fn every_field_that_can_change_the_output_changes_the_key() {
        let plain = key(&chat(json!({})));
        for (field, value) in [
            ("model", json!("other")),
            (
                "messages",
                json!([{"role": "user", "content": "What is our PTO policy"}]),
            ),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("required")),
            ("response_format", json!({"type": "json_object"})),
            ("temperature", json!(0.0001)),
            ("top_p", json!(0.5)),
            ("seed", json!(7)),
            ("max_tokens", json!(16)),
            ("stop", json!(["\n"])),
            ("logit_bias", json!({"50256": -100})),
            ("n", json!(2)),
            ("parallel_tool_calls", json!(false)),
            // Unknown means included.
            ("reasoning_effort", json!("high")),
        ] {
            let mut body = chat(json!({}));
            body[field] = value;
            assert_ne!(key(&body), plain, "{field} is not in the key");
        }
    }

    #[test]
    fn key_order_and_endpoint() {
        let a = json!({"temperature": 0, "model": "m", "prompt": "x"});
        let b = json!({"prompt": "x", "model": "m", "temperature": 0});
        assert_eq!(
            key_digest(Endpoint::Completions, &a),
            key_digest(Endpoint::Completions, &b)
        );
        assert_ne!(
            key_digest(Endpoint::Completions, &a),
            key_digest(Endpoint::Chat, &a)
        );
        assert_eq!(key_digest(Endpoint::Chat, &json!([1])), None);
        assert_eq!(
            Endpoint::of_path("/v1/chat/completions/"),
            Some(Endpoint::Chat)
        );
        assert_eq!(Endpoint::of_path("/v1/embeddings"), None);
    }

    #[test]
    fn sampled_requests_and_several_choices_bypass_unless_allowed() {
        assert_eq!(bypass(&chat(json!({})), false), None);
        let mut unset = chat(json!({}));
        unset.as_object_mut().unwrap().remove("temperature");
        assert_eq!(
            bypass(&unset, false),
            Some(Bypass::Sampled { temperature: 1.0 }),
            "OpenAI samples at temperature 1 by default"
        );
        assert_eq!(
            bypass(&chat(json!({"temperature": 0.7})), false),
            Some(Bypass::Sampled { temperature: 0.7 })
        );
        assert_eq!(
            bypass(&chat(json!({"n": 3})), false),
            Some(Bypass::Several { n: 3 })
        );
        assert_eq!(bypass(&chat(json!({"n": 1})), false), None);
        assert_eq!(
            bypass(&chat(json!({"temperature": 0.7, "n": 3})), true),
            None
        );
        assert_eq!(bypass(&json!("text"), true), Some(Bypass::NotAnObject));
    }

    #[test]
    fn scopes_separate_credentials_and_never_hold_them() {
        let secret = b"gateway-secret";
        let alice = scope(Some("Bearer sk-alice"), secret);
        let bob = scope(Some("Bearer sk-bob"), secret);
        assert_ne!(alice, bob);
        assert_eq!(alice, scope(Some(" Bearer sk-alice "), secret));
        let Scope::Caller(tag) = &alice else {
            panic!("{alice:?}")
        };
        assert!(!tag.contains("alice") && tag.len() == 64, "{tag}");
        // Another gateway secret, another scope: tags do not travel.
        assert_ne!(scope(Some("Bearer sk-alice"), b"other"), alice);
        assert_eq!(scope(None, secret), Scope::Anonymous);
        assert_eq!(scope(Some(""), secret), Scope::Anonymous);
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        assert_eq!(
            scope(Some("what do ya want for nothing?"), b"Jefe"),
            Scope::Caller(
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843".into()
            )
        );
    }
}
