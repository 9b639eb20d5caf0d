//! The one key schema that every cache layer writes and the sweeper deletes.
//! `docs/key-schema.md` is the reference; this module is its implementation.
//!
//! ```text
//! mc:<model>:<version>:<layer>:<digest>      cache entries
//! mc:<model>:<version>:gen:<entity>          per-entity generation numbers
//! mc:~{<model>}:registry                     active version and epoch (hash)
//! mc:~{<model>}:live                         live versions (set)
//! mc:~{<model>}:events                       registry event log (stream) and channel
//! mc:~{<model>}:entity-events                entity invalidation events (stream)
//! mc:~{<model>}:semantic-events              semantic-cache entry events (stream)
//! mc:~{<model>}:gateway                      the gateways' counters (hash)
//! mc:~{<model>}:sweep:<version>              sweep checkpoint (hash)
//! mc:~{~n<i>}:sweep:<model>:<version>:<node> sweep checkpoint of one cluster primary
//! ```
//!
//! Model and version are escaped so that they contain only `[A-Za-z0-9._-]`
//! and `%XX`. Hence `:` always separates components, a version's keys are
//! exactly those under `mc:<model>:<version>:` (the trailing `:` keeps `v1`
//! from matching `v10`), glob characters never reach a SCAN MATCH pattern
//! unescaped, and the model's own `~` keys never fall under any version (an
//! escaped model never starts with `~`). The model's own keys share the hash
//! tag `{<model>}`, so on Redis Cluster they sit in one slot and the registry
//! is updated atomically; cache entries carry no hash tag and spread over
//! every primary.

use std::fmt::Write as _;

/// First component of every modelcache key, so that a shared Redis can tell
/// our keys from anyone else's.
pub const ROOT: &str = "mc";

/// A cache layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// Exact-match results.
    Result,
    /// Semantic-cache entries.
    Semantic,
    /// Feature vectors.
    Feature,
    /// The gateway's stored responses.
    Response,
}

impl Layer {
    /// The layer's name in keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Result => "result",
            Layer::Semantic => "semantic",
            Layer::Feature => "feature",
            Layer::Response => "response",
        }
    }
}

/// Escapes one key component: bytes outside `[A-Za-z0-9._-]` become `%XX`.
/// Injective, so two different versions never share a prefix.
pub fn escape(component: &str) -> String {
    let mut out = String::with_capacity(component.len());
    for b in component.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Reverses [`escape`]; `None` for bytes that [`escape`] cannot produce.
pub fn unescape(escaped: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        match escaped[i] {
            b'%' => {
                let hex = std::str::from_utf8(escaped.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Escapes the characters that are special in a Redis glob pattern.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `mc:<model>:`
pub fn model_prefix(model: &str) -> String {
    format!("{ROOT}:{}:", escape(model))
}

/// `mc:<model>:<version>:`: every key of one model version starts so.
pub fn version_prefix(model: &str, version: &str) -> String {
    format!("{}{}:", model_prefix(model), escape(version))
}

/// The SCAN MATCH pattern of exactly one model version's keys.
pub fn version_pattern(model: &str, version: &str) -> String {
    format!("{}*", glob_escape(&version_prefix(model, version)))
}

/// A cache entry's key; `digest` is hex.
pub fn entry(model: &str, version: &str, layer: Layer, digest: &str) -> String {
    format!(
        "{}{}:{digest}",
        version_prefix(model, version),
        layer.as_str()
    )
}

/// The generation counter of one entity (a user, a session) under a version.
pub fn generation(model: &str, version: &str, entity: &str) -> String {
    format!("{}gen:{}", version_prefix(model, version), escape(entity))
}

/// `mc:~{<model>}:`: the model's own keys, in one cluster slot.
pub fn model_meta(model: &str) -> String {
    format!("{ROOT}:~{{{}}}:", escape(model))
}

/// Hash with the active version and the epoch.
pub fn registry(model: &str) -> String {
    format!("{}registry", model_meta(model))
}

/// Set of live versions.
pub fn live_versions(model: &str) -> String {
    format!("{}live", model_meta(model))
}

/// Stream, and pub/sub channel, of registry events.
pub fn events(model: &str) -> String {
    format!("{}events", model_meta(model))
}

/// Stream of entity invalidation events.
pub fn entity_events(model: &str) -> String {
    format!("{}entity-events", model_meta(model))
}

/// Stream of semantic-cache entry events (put, del), which every replica's
/// index follows.
pub fn semantic_events(model: &str) -> String {
    format!("{}semantic-events", model_meta(model))
}

/// The gateways' counters of a model: requests, hits, tokens saved (a hash
/// every gateway adds to, the controller reads into status).
pub fn gateway_stats(model: &str) -> String {
    format!("{}gateway", model_meta(model))
}

/// Checkpoint of the sweep of one version.
pub fn sweep_checkpoint(model: &str, version: &str) -> String {
    format!("{}sweep:{}", model_meta(model), escape(version))
}

/// Whether `key` belongs to the given model version (what the sweeper
/// checks again before deleting, so a pattern mistake can never widen a sweep).
pub fn belongs_to(key: &[u8], model: &str, version: &str) -> bool {
    key.starts_with(version_prefix(model, version).as_bytes())
}

/// The version a key of `model` belongs to (`mc:<model>:<version>:...`), or
/// `None` for a key that is not one. Keys come from SCAN replies, which are
/// not trusted to match the pattern asked for.
pub fn version_of(key: &[u8], model: &str) -> Option<String> {
    let rest = key.strip_prefix(model_prefix(model).as_bytes())?;
    let end = rest.iter().position(|b| *b == b':')?;
    unescape(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's own glob, for checking patterns without a server.
    fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
        match (pattern.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                glob_match(&pattern[1..], s) || (!s.is_empty() && glob_match(pattern, &s[1..]))
            }
            (Some(b'\\'), Some(c)) if pattern.len() > 1 => {
                pattern[1] == *c && glob_match(&pattern[2..], &s[1..])
            }
            (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &s[1..]),
            (Some(p), Some(c)) => p == c && glob_match(&pattern[1..], &s[1..]),
            _ => false,
        }
    }

    #[test]
    fn components_are_escaped() {
        assert_eq!(escape("v1.2_rc-3"), "v1.2_rc-3");
        assert_eq!(escape("a:b"), "a%3Ab");
        assert_eq!(escape("v*[1]?"), "v%2A%5B1%5D%3F");
        assert_eq!(escape("~registry"), "%7Eregistry");
        assert_eq!(escape("ü"), "%C3%BC");
    }

    #[test]
    fn unescape_reverses_escape() {
        for s in ["v1", "a:b", "v*[1]?", "~x", "ü space", ""] {
            assert_eq!(unescape(escape(s).as_bytes()).as_deref(), Some(s));
        }
        assert_eq!(unescape(b"a:b"), None);
        assert_eq!(unescape(b"%zz"), None);
    }

    #[test]
    fn v1_never_matches_v10() {
        let p = version_pattern("m", "v1");
        assert!(glob_match(
            p.as_bytes(),
            entry("m", "v1", Layer::Result, "ab").as_bytes()
        ));
        assert!(!glob_match(
            p.as_bytes(),
            entry("m", "v10", Layer::Result, "ab").as_bytes()
        ));
        assert!(!belongs_to(
            entry("m", "v10", Layer::Result, "ab").as_bytes(),
            "m",
            "v1"
        ));
    }

    #[test]
    fn glob_characters_in_versions_match_only_themselves() {
        for version in ["v*", "v?", "v[1]", "v\\1", "*"] {
            let p = version_pattern("m", version);
            assert!(
                glob_match(
                    p.as_bytes(),
                    entry("m", version, Layer::Feature, "x").as_bytes()
                ),
                "{version}"
            );
            for other in ["v1", "va", "v", "v[1]x", "vX"] {
                if other != version {
                    assert!(
                        !glob_match(
                            p.as_bytes(),
                            entry("m", other, Layer::Feature, "x").as_bytes()
                        ),
                        "{version} vs {other}"
                    );
                }
            }
        }
    }

    #[test]
    fn model_keys_fall_under_no_version() {
        for version in ["~registry", "~live", "~events", "~sweep", "~{m}", ""] {
            let p = version_pattern("m", version);
            for k in [
                registry("m"),
                live_versions("m"),
                events("m"),
                entity_events("m"),
                sweep_checkpoint("m", "v1"),
            ] {
                assert!(
                    !glob_match(p.as_bytes(), k.as_bytes()),
                    "{version:?} matches {k}"
                );
            }
        }
        // Nor do another model's keys, even one whose name is a prefix.
        let p = version_pattern("m", "v1");
        assert!(!glob_match(
            p.as_bytes(),
            entry("m2", "v1", Layer::Result, "a").as_bytes()
        ));
    }

    #[test]
    fn layout() {
        assert_eq!(
            entry("llama 3", "v1", Layer::Semantic, "00ff"),
            "mc:llama%203:v1:semantic:00ff"
        );
        assert_eq!(generation("m", "v1", "user:42"), "mc:m:v1:gen:user%3A42");
        assert_eq!(registry("m"), "mc:~{m}:registry");
        assert_eq!(sweep_checkpoint("m", "v/1"), "mc:~{m}:sweep:v%2F1");
        assert_eq!(
            events("a{b}"),
            "mc:~{a%7Bb%7D}:events",
            "braces cannot break the hash tag"
        );
    }
}
