//! The value format and the digests of cache keys.

use serde_json::Value;

/// Format tag in front of every stored value. A value without it (an older
/// or foreign format) is a miss, never an error and never executed.
pub const FORMAT: &[u8] = b"mc1\n";

/// The bytes stored for a cached value: the format tag, then JSON.
pub fn encode(value: &Value) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = FORMAT.to_vec();
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

/// The value of stored bytes; `None` (a miss) for bytes without our format tag.
pub fn decode(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice(bytes.strip_prefix(FORMAT)?).ok()
}

/// JSON with object keys sorted at every level and no insignificant white
/// space, so that equal inputs written in any key order hash alike.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

pub use crate::digest::sha256_hex;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": "s"}});
        let b = json!({"a": {"x": "s", "y": [1, {"c": 3, "d": 2}]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":"s","y":[1,{"c":3,"d":2}]},"b":1}"#
        );
        assert_ne!(
            canonical_json(&json!([1, 2])),
            canonical_json(&json!([2, 1]))
        );
    }

    #[test]
    fn values_round_trip_and_foreign_bytes_are_misses() {
        let v = json!({"answer": "42", "tokens": [1, 2]});
        assert_eq!(decode(&encode(&v).unwrap()), Some(v));
        // A pickle (protocol 4 header) or any untagged value is not read.
        assert_eq!(decode(b"\x80\x04\x95\x00"), None);
        assert_eq!(decode(b"{\"a\":1}"), None);
        assert_eq!(decode(b"mc1\nnot json"), None);
    }

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
