//! The metadata of a GGUF file (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! header and key/value pairs, read with candle's GGUF reader and kept as
//! plain data. Tensor data is not read.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

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
enum ParseError {
    Io(std::io::Error),
    Format(String),
}

impl From<candle_core::Error> for ParseError {
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::Io(e) => ParseError::Io(e),
            candle_core::Error::WithBacktrace { inner, .. } => ParseError::from(*inner),
            other => ParseError::Format(other.to_string()),
        }
    }
}

/// Candle's reader (it bounds every length by the bytes left in the file,
/// so a corrupt length cannot allocate gigabytes), then its values as ours:
/// plain data, sorted by key. Tensor data is not read.
fn parse(mut r: impl Read + Seek) -> Result<Metadata, ParseError> {
    let content = gguf_file::Content::read(&mut r)?;
    let version = match content.magic {
        gguf_file::VersionedMagic::GgufV1 => 1,
        gguf_file::VersionedMagic::GgufV2 => 2,
        gguf_file::VersionedMagic::GgufV3 => 3,
    };
    if !(2..=3).contains(&version) {
        let why = format!("version {version} is not 2 or 3");
        return Err(ParseError::Format(why));
    }
    Ok(Metadata {
        version,
        tensor_count: content.tensor_infos.len() as u64,
        values: content
            .metadata
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect(),
    })
}

impl From<gguf_file::Value> for Value {
    fn from(v: gguf_file::Value) -> Self {
        use gguf_file::Value as G;
        match v {
            G::U8(v) => Value::U8(v),
            G::I8(v) => Value::I8(v),
            G::U16(v) => Value::U16(v),
            G::I16(v) => Value::I16(v),
            G::U32(v) => Value::U32(v),
            G::I32(v) => Value::I32(v),
            G::U64(v) => Value::U64(v),
            G::I64(v) => Value::I64(v),
            G::F32(v) => Value::F32(v),
            G::F64(v) => Value::F64(v),
            G::Bool(v) => Value::Bool(v),
            G::String(v) => Value::String(v),
            G::Array(v) => Value::Array(v.into_iter().map(Value::from).collect()),
        }
    }
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
        let m = parse(std::io::Cursor::new(&b[..])).unwrap();
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
    fn refuses_what_is_not_gguf_or_is_cut_short() {
        assert!(matches!(
            parse(std::io::Cursor::new(&b"GGML\x03\0\0\0"[..])),
            Err(ParseError::Format(_))
        ));
        let mut b = header(1);
        key(&mut b, "x", 8);
        b.extend(u64::MAX.to_le_bytes());
        assert!(
            matches!(
                parse(std::io::Cursor::new(&b[..])),
                Err(ParseError::Format(_))
            ),
            "huge lengths are refused"
        );
        let b = header(1);
        // Cut short: candle finds it from the declared counts before reading
        // on, and a file cut short is refused as not a GGUF model.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.gguf");
        std::fs::write(&path, &b).unwrap();
        let cut = read(&path);
        assert!(matches!(cut, Err(GgufError::Format { .. })), "{cut:?}");
    }
}
