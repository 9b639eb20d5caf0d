//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`, see
//! `scripts/fuzz.sh`): one per parser of bytes that cross a trust boundary,
//! each taking the raw bytes as an attacker or a broken peer would send
//! them. The property is that none of them panics, hangs or allocates without
//! bound; each returns whether the input was accepted, so that the seeds can
//! be checked to reach past the first check. Hidden from the docs; not an API.
//!
//! Every crash the fuzzer finds becomes a regression test that calls the
//! same function (`tests/fuzz_regressions.rs`).

use std::sync::OnceLock;

use serde_json::Value;

/// A version manifest, as an origin (S3, a CDN, a node agent) serves it.
pub fn manifest(bytes: &[u8]) -> bool {
    let _ = crate::artifact::manifest::parse("fuzz", bytes.to_vec(), Some(("m", "v1")));
    crate::artifact::manifest::parse("fuzz", bytes.to_vec(), None).is_ok()
}

/// GGUF metadata, as a model file from a registry holds it.
pub fn gguf(bytes: &[u8]) -> bool {
    crate::model::gguf::parse(std::io::Cursor::new(bytes)).is_ok()
}

/// A prefix-cache block (safetensors), as the warm-up reads it back from a
/// directory other pods write.
pub fn prefix_block(bytes: &[u8]) -> bool {
    crate::warm::prefix_cache::decode(bytes).is_some()
}

/// An AdmissionReview body, as any caller that reaches the webhook sends it.
pub fn admission_review(bytes: &[u8]) -> bool {
    let Ok(request) = serde_json::from_slice::<Value>(bytes) else {
        return false;
    };
    let config = crate::controller::inject::InjectConfig {
        image: "ghcr.io/modelcache/modelcache:fuzz".into(),
        failure_policy: crate::controller::inject::FailurePolicy::Fail,
        node_agent_port: Some(8095),
    };
    let found = |namespace: &str, name: &str| Ok(model_cache(namespace, name));
    let _ = crate::controller::inject::review(&request, |_, _| Ok(None), &config);
    let answer = crate::controller::inject::review(&request, found, &config);
    answer["response"]["allowed"] == true
}

/// A YAML stream of ModelCaches and CachePolicies, as `modelcache validate`
/// and the controller's validation read what users write.
pub fn resources(bytes: &[u8]) -> bool {
    static VALIDATOR: OnceLock<Option<crate::crd::validate::Validator>> = OnceLock::new();
    let Some(validator) = VALIDATOR.get_or_init(|| crate::crd::validate::Validator::new().ok())
    else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    if let Ok(docs) = serde_saphyr::from_multiple::<Value>(text) {
        for doc in docs {
            if let Ok(mc) = serde_json::from_value::<crate::crd::ModelCache>(doc) {
                let _ = crate::controller::validate::validate(&mc, Ok(None));
            }
        }
    }
    validator.validate_yaml("fuzz", text).is_ok()
}

/// Keys of a SCAN reply (untrusted to match the pattern asked for), one per
/// line: the key schema's parsing of them.
pub fn scan_keys(bytes: &[u8]) -> bool {
    let mut any = false;
    for key in bytes.split(|b| *b == b'\n') {
        let _ = crate::keyspace::keys::unescape(key);
        let _ = crate::keyspace::keys::belongs_to(key, "chat", "v1");
        any |= crate::keyspace::keys::version_of(key, "chat").is_some();
    }
    any
}

/// What a Redis (or something in its place) answers: INFO and CLUSTER
/// NODES text, cached values, per-entry observations and semantic vectors.
pub fn redis_replies(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let info = crate::store::info::parse_info(&text);
    let nodes = crate::keyspace::sweep::parse_cluster_nodes(&text);
    let value = crate::cache::codec::decode(bytes);
    let _ = crate::cache::per_entry::decode(bytes);
    let _ = crate::cache::semantic::bytes_vector(bytes, bytes.len() / 4);
    let _ = crate::cache::semantic::bytes_vector(bytes, 384);
    info.used_memory.is_some() || !nodes.is_empty() || value.is_some()
}

/// Warm-up prompts (JSONL), as a ConfigMap or a file holds them.
pub fn prompts(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|text| crate::warm::prompts::parse(text).is_ok())
}

/// An upstream's answer as the gateway reads it: the first byte picks the
/// size of the pieces the rest arrives in; the rest is an event stream (or,
/// as a whole, a JSON body). Whatever it is, parsing it piece by piece gives
/// the same events as parsing it whole, and checking, assembling, splitting
/// and replaying it never panics.
pub fn upstream_answer(bytes: &[u8]) -> bool {
    use crate::gateway::request::Endpoint;
    use crate::gateway::{response, sse};
    let Some((&step, stream)) = bytes.split_first() else {
        return false;
    };
    let limit = 1 << 16;
    let mut whole = sse::Parser::new(limit);
    let expected = whole.push(stream).and_then(|mut e| {
        e.extend(whole.finish()?);
        Ok(e)
    });
    let mut pieces = sse::Parser::new(limit);
    let mut got = Ok(Vec::new());
    for piece in stream.chunks(usize::from(step).max(1)) {
        if let Ok(events) = &mut got {
            match pieces.push(piece) {
                Ok(more) => events.extend(more),
                Err(e) => got = Err(e),
            }
        }
    }
    if let Ok(events) = &mut got {
        match pieces.finish() {
            Ok(more) => events.extend(more),
            Err(e) => got = Err(e),
        }
    }
    // A stream refused whole may be refused earlier in pieces (a long event
    // is seen before its end), never the other way round.
    if let (Ok(a), Ok(b)) = (&expected, &got) {
        assert_eq!(a, b, "pieces of {step} bytes parse differently");
    }
    let chunks: Vec<String> = expected
        .iter()
        .flatten()
        .filter_map(|e| e.data.clone())
        .filter(|d| d != sse::DONE)
        .collect();
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let form = response::Form::Chunks(chunks.clone());
        let _ = response::check_chunks(&chunks, true);
        let body = form.body(endpoint);
        let _ = form.events(endpoint, true);
        let _ = form.usage();
        let _ = response::Form::Body(body).events(endpoint, false);
        if let Ok(value) = serde_json::from_slice::<Value>(stream) {
            let _ = response::check_body(200, &value);
            let _ = response::assemble(endpoint, &response::split(endpoint, &value));
            let _ = response::Stored::from_json(&value);
        }
    }
    response::check_chunks(&chunks, true).is_ok()
}

/// The ModelCache the admission target finds: a CDN source with headers
/// and signing, inline warm-up prompts and the default Redis, so that every
/// branch of the patch is built.
fn model_cache(namespace: &str, name: &str) -> Option<crate::crd::ModelCache> {
    let value = serde_json::json!({
        "apiVersion": "modelcache.dev/v1alpha1",
        "kind": "ModelCache",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": "m",
            "version": "v1",
            "source": {
                "uri": "https://cdn.example/models",
                "cdn": {
                    "headers": {"X-Tenant": "t"},
                    "headersSecretRef": {"name": "h"},
                    "signing": {"keyPairId": "K", "privateKeySecretRef": {"name": "k", "key": "k"}}
                }
            },
            "warmup": {"prompts": ["You are a bot."]}
        }
    });
    serde_json::from_value(value).ok()
}
