//! The metadata of a GGUF file (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! header and key/value pairs, read as plain data. Tensor data is not read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// GGUF type u8.
    U8(u8),
    /// GGUF type i8.
    I8(i8),
    /// GGUF type u16.
    U16(u16),
    /// GGUF type i16.
    I16(i16),
    /// GGUF type u32.
    U32(u32),
    /// GGUF type i32.
    I32(i32),
    /// GGUF type u64.
    U64(u64),
    /// GGUF type i64.
    I64(i64),
    /// GGUF type f32.
    F32(f32),
    /// GGUF type f64.
    F64(f64),
    /// A GGUF bool.
    Bool(bool),
    /// A GGUF string.
    String(String),
    /// A GGUF array.
    Array(Vec<Value>),
}

impl Value {
    /// An unsigned integer of any width (negative values are not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// A GGUF file's header and metadata.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// The GGUF format version.
    pub version: u32,
    /// Tensors in the file.
    pub tensor_count: u64,
    /// Every metadata key and its value.
    pub values: BTreeMap<String, Value>,
}

impl Metadata {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}

/// Why a GGUF file's metadata could not be read.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum GgufError {
    #[error("failed to read GGUF file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse GGUF file {path}: {why}; is it a GGUF model (version 2 or 3)?")]
    Format { path: PathBuf, why: String },
}

/// Strings and arrays longer than this are refused: no real key, value or
/// vocabulary comes close, and a corrupt length must not allocate gigabytes.
const MAX_LEN: u64 = 64 << 20;

/// Array elements in the whole file at most. A value takes 32 bytes in
/// memory for one byte in the file, so without a budget a 64 MiB array of
/// u8 would take 2 GiB; the largest vocabularies with their merges and
/// scores hold about two million.
const MAX_ELEMENTS: u64 = 8 << 20;

/// The largest `general.alignment` accepted (llama.cpp writes 32).
const MAX_ALIGNMENT: u64 = 1 << 20;

/// Read the metadata of the GGUF file at `path`.
pub fn read(path: &Path) -> Result<Metadata, GgufError> {
    let file = std::fs::File::open(path).map_err(|source| GgufError::Io {
        path: path.into(),
        source,
    })?;
    parse(std::io::BufReader::with_capacity(1 << 20, file)).map_err(|e| match e {
        ParseError::Io(source) if source.kind() != std::io::ErrorKind::UnexpectedEof => {
            GgufError::Io {
                path: path.into(),
                source,
            }
        }
        ParseError::Io(_) => GgufError::Format {
            path: path.into(),
            why: "it ends inside its metadata".into(),
        },
        ParseError::Format(why) => GgufError::Format {
            path: path.into(),
            why,
        },
    })
}

#[derive(Debug)]
pub(crate) enum ParseError {
    Io(std::io::Error),
    Format(String),
}

impl From<std::io::Error> for ParseError {
    fn from(e: std::io::Error) -> Self {
        ParseError::Io(e)
    }
}

pub(crate) fn parse(mut r: impl Read) -> Result<Metadata, ParseError> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        return Err(ParseError::Format("the magic bytes are not `GGUF`".into()));
    }
    let version = u32::from_le_bytes(bytes(&mut r)?);
    if !(2..=3).contains(&version) {
        return Err(ParseError::Format(format!(
            "version {version} is not 2 or 3"
        )));
    }
    let tensor_count = u64::from_le_bytes(bytes(&mut r)?);
    let kv_count = u64::from_le_bytes(bytes(&mut r)?);
    if kv_count > MAX_LEN {
        return Err(ParseError::Format(format!("{kv_count} metadata entries")));
    }
    let mut values = BTreeMap::new();
    let mut budget = MAX_ELEMENTS;
    for _ in 0..kv_count {
        let key = string(&mut r)?;
        let kind = u32::from_le_bytes(bytes(&mut r)?);
        let value = value(&mut r, kind, 0, &mut budget)?;
        values.insert(key, value);
    }
    // Tensor data starts at the next multiple of the alignment: zero would
    // divide by zero in the loaders the file is handed to next (candle's).
    if let Some(alignment) = values.get("general.alignment") {
        let valid = alignment
            .as_u64()
            .is_some_and(|a| a.is_power_of_two() && a <= MAX_ALIGNMENT);
        if !valid {
            return Err(ParseError::Format(format!(
                "general.alignment is {alignment:?}; expected a power of two up to {MAX_ALIGNMENT}"
            )));
        }
    }
    Ok(Metadata {
        version,
        tensor_count,
        values,
    })
}

fn bytes<const N: usize>(r: &mut impl Read) -> Result<[u8; N], ParseError> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn length(r: &mut impl Read) -> Result<u64, ParseError> {
    let n = u64::from_le_bytes(bytes(r)?);
    if n > MAX_LEN {
        return Err(ParseError::Format(format!("a length of {n}")));
    }
    Ok(n)
}

fn string(r: &mut impl Read) -> Result<String, ParseError> {
    let n = length(r)? as usize;
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(|_| ParseError::Format("a string is not UTF-8".into()))
}

fn value(r: &mut impl Read, kind: u32, depth: u32, budget: &mut u64) -> Result<Value, ParseError> {
    Ok(match kind {
        0 => Value::U8(u8::from_le_bytes(bytes(r)?)),
        1 => Value::I8(i8::from_le_bytes(bytes(r)?)),
        2 => Value::U16(u16::from_le_bytes(bytes(r)?)),
        3 => Value::I16(i16::from_le_bytes(bytes(r)?)),
        4 => Value::U32(u32::from_le_bytes(bytes(r)?)),
        5 => Value::I32(i32::from_le_bytes(bytes(r)?)),
        6 => Value::F32(f32::from_le_bytes(bytes(r)?)),
        7 => Value::Bool(u8::from_le_bytes(bytes(r)?) != 0),
        8 => Value::String(string(r)?),
        9 => {
            if depth > 2 {
                return Err(ParseError::Format("arrays nested too deep".into()));
            }
            let inner = u32::from_le_bytes(bytes(r)?);
            let n = length(r)?;
            *budget = budget.checked_sub(n).ok_or_else(|| {
                ParseError::Format(format!(
                    "its arrays hold more than {MAX_ELEMENTS} elements in all"
                ))
            })?;
            let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                items.push(value(r, inner, depth + 1, budget)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(u64::from_le_bytes(bytes(r)?)),
        11 => Value::I64(i64::from_le_bytes(bytes(r)?)),
        12 => Value::F64(f64::from_le_bytes(bytes(r)?)),
        other => return Err(ParseError::Format(format!("unknown value type {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(kv.to_le_bytes());
        b
    }

    fn key(b: &mut Vec<u8>, k: &str, kind: u32) {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(kind.to_le_bytes());
    }

    #[test]
    fn parses_scalars_strings_and_arrays() {
        let mut b = header(3);
        key(&mut b, "general.architecture", 8);
        b.extend(5u64.to_le_bytes());
        b.extend(b"llama");
        key(&mut b, "llama.block_count", 4);
        b.extend(30u32.to_le_bytes());
        key(&mut b, "tokenizer.ggml.tokens", 9);
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        for t in ["a", "bc"] {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        }
        let m = parse(&b[..]).unwrap();
        assert_eq!(m.architecture(), Some("llama"));
        assert_eq!(m.get("llama.block_count").and_then(Value::as_u64), Some(30));
        assert_eq!(
            m.get("tokenizer.ggml.tokens"),
            Some(&Value::Array(vec![
                Value::String("a".into()),
                Value::String("bc".into())
            ]))
        );
    }

    #[test]
    fn refuses_a_zero_alignment_and_arrays_past_the_element_budget() {
        // alignment 0 made candle divide by zero when the file was loaded.
        for alignment in [0u32, 3, 1 << 21] {
            let mut b = header(1);
            key(&mut b, "general.alignment", 4);
            b.extend(alignment.to_le_bytes());
            let err = parse(&b[..]).unwrap_err();
            assert!(
                matches!(&err, ParseError::Format(why) if why.contains("general.alignment")),
                "{alignment}: {err:?}"
            );
        }
        let mut b = header(1);
        key(&mut b, "general.alignment", 4);
        b.extend(32u32.to_le_bytes());
        assert!(parse(&b[..]).is_ok());
        // Two arrays that each fit the length bound but not the budget.
        let n = MAX_ELEMENTS / 2 + 1;
        let mut b = header(2);
        for k in ["a", "b"] {
            key(&mut b, k, 9);
            b.extend(0u32.to_le_bytes());
            b.extend(n.to_le_bytes());
            b.extend(std::iter::repeat_n(0u8, n as usize));
        }
        let err = parse(&b[..]).unwrap_err();
        assert!(
            matches!(&err, ParseError::Format(why) if why.contains("elements in all")),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_what_is_not_gguf_or_is_cut_short() {
        assert!(matches!(
            parse(&b"GGML\x03\0\0\0"[..]),
            Err(ParseError::Format(_))
        ));
        let mut b = header(1);
        key(&mut b, "x", 8);
        b.extend(u64::MAX.to_le_bytes());
        assert!(
            matches!(parse(&b[..]), Err(ParseError::Format(_))),
            "huge lengths are refused"
        );
        let b = header(1);
        assert!(matches!(parse(&b[..]), Err(ParseError::Io(_))));
    }
}
