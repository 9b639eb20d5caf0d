//! Exact KV-cache sizing, from a model's config.json, its GGUF metadata, or
//! numbers given directly:
//!
//! ```text
//! bytes = 2 (K and V) × layers × kv_heads × head_dim × bytes_per_element × tokens × batch
//! ```
//!
//! `kv_heads` is the number of key/value heads, which grouped-query attention
//! makes smaller than the number of attention heads: using the attention
//! heads instead is the usual mistake, and overstates a GQA model's cache by
//! their ratio (3× for SmolLM2-135M, 4× for Llama-3-8B).

use serde::Serialize;

use super::gguf::{Metadata, Value};

/// What a KV cache's size depends on, per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KvShape {
    /// Transformer layers.
    pub layers: u64,
    /// Key/value heads (fewer than attention heads under GQA).
    pub kv_heads: u64,
    /// Width of one key head.
    pub head_dim: u64,
    /// Width of one value head: the same as `head_dim` for Llama-family
    /// models, different for some others (GGUF `value_length`).
    pub value_dim: u64,
}

/// The element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 4 bytes.
    F32,
    /// 2 bytes.
    F16,
    /// 2 bytes.
    Bf16,
    /// 1 byte.
    Fp8,
    /// 1 byte.
    Int8,
}

impl KvDtype {
    /// The name used in flags and output.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Fp8 => "fp8",
            KvDtype::Int8 => "int8",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
            KvDtype::Fp8 | KvDtype::Int8 => 1,
        }
    }
}

/// Why a KV cache could not be sized.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum KvSizeError {
    #[error("failed to size the KV cache: {what} is missing from {source_name}; pass --{flag}")]
    Missing {
        what: String,
        source_name: &'static str,
        flag: &'static str,
    },
    #[error("failed to size the KV cache: {what} is {value}, expected a positive whole number")]
    Invalid { what: String, value: String },
    #[error(
        "failed to size the KV cache: hidden size {hidden} is not a multiple of {heads} attention heads; pass --head-dim"
    )]
    HeadDim { hidden: u64, heads: u64 },
    #[error("failed to size the KV cache: the size does not fit in 64 bits")]
    Overflow,
    #[error("failed to read {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {} as JSON", path.display())]
    Json {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Gguf(super::gguf::GgufError),
}

/// The sizing of one cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KvSize {
    /// The shape sized.
    pub shape: KvShape,
    /// The element type.
    pub dtype: KvDtype,
    /// Tokens per sequence.
    pub tokens: u64,
    /// Sequences.
    pub batch: u64,
    /// Bytes per token of one sequence.
    pub bytes_per_token: u64,
    /// The whole cache.
    pub bytes: u64,
}

impl KvSize {
    /// The whole cache in GiB.
    pub fn gib(&self) -> f64 {
        self.bytes as f64 / (1u64 << 30) as f64
    }

    /// The formula with the numbers, and the result in bytes, MiB and GiB.
    pub fn explain(&self) -> String {
        let s = &self.shape;
        let dims = if s.head_dim == s.value_dim {
            format!(
                "2 × {} layers × {} KV heads × {} head dim",
                s.layers, s.kv_heads, s.head_dim
            )
        } else {
            format!(
                "{} layers × {} KV heads × ({} key + {} value dims)",
                s.layers, s.kv_heads, s.head_dim, s.value_dim
            )
        };
        format!(
            "{dims} × {} bytes ({}) × {} tokens × batch {}\n= {} bytes ({:.3} MiB, {:.3} GiB); {} bytes per token",
            self.dtype.bytes(),
            self.dtype.name(),
            self.tokens,
            self.batch,
            self.bytes,
            self.bytes as f64 / (1u64 << 20) as f64,
            self.gib(),
            self.bytes_per_token,
        )
    }
}

/// The exact size of a cache of `tokens` × `batch`.
pub fn kv_size(
    shape: KvShape,
    dtype: KvDtype,
    tokens: u64,
    batch: u64,
) -> Result<KvSize, KvSizeError> {
    let per_token = shape
        .layers
        .checked_mul(shape.kv_heads)
        .and_then(|v| v.checked_mul(shape.head_dim + shape.value_dim))
        .and_then(|v| v.checked_mul(dtype.bytes()))
        .ok_or(KvSizeError::Overflow)?;
    let bytes = per_token
        .checked_mul(tokens)
        .and_then(|v| v.checked_mul(batch))
        .ok_or(KvSizeError::Overflow)?;
    Ok(KvSize {
        shape,
        dtype,
        tokens,
        batch,
        bytes_per_token: per_token,
        bytes,
    })
}

fn positive(what: &str, value: Option<u64>) -> Result<Option<u64>, KvSizeError> {
    match value {
        Some(0) => Err(KvSizeError::Invalid {
            what: what.into(),
            value: "0".into(),
        }),
        v => Ok(v),
    }
}

/// Build a shape from what a source knows, with `--flags` taking precedence.
fn assemble(
    source_name: &'static str,
    layers: Option<u64>,
    heads: Option<u64>,
    kv_heads: Option<u64>,
    head_dim: Option<u64>,
    value_dim: Option<u64>,
    hidden: Option<u64>,
) -> Result<KvShape, KvSizeError> {
    let missing = |what: &str, flag| KvSizeError::Missing {
        what: what.into(),
        source_name,
        flag,
    };
    let layers =
        positive("layers", layers)?.ok_or_else(|| missing("the number of layers", "layers"))?;
    let heads = positive("attention heads", heads)?;
    let kv_heads = positive("KV heads", kv_heads)?
        .or(heads)
        .ok_or_else(|| missing("the number of KV heads", "kv-heads"))?;
    let head_dim = match positive("head dim", head_dim)? {
        Some(d) => d,
        None => {
            let hidden = hidden.ok_or_else(|| missing("the head dimension", "head-dim"))?;
            let heads = heads.ok_or_else(|| missing("the head dimension", "head-dim"))?;
            if hidden % heads != 0 {
                return Err(KvSizeError::HeadDim { hidden, heads });
            }
            hidden / heads
        }
    };
    let value_dim = positive("value dim", value_dim)?.unwrap_or(head_dim);
    Ok(KvShape {
        layers,
        kv_heads,
        head_dim,
        value_dim,
    })
}

/// The shape from a config.json file or a GGUF file, whichever is given
/// (config.json first); `None` when neither is.
pub fn shape_from_files(
    config: Option<&std::path::Path>,
    gguf: Option<&std::path::Path>,
) -> Result<Option<KvShape>, KvSizeError> {
    if let Some(path) = config {
        let text = std::fs::read_to_string(path).map_err(|source| KvSizeError::Read {
            path: path.into(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| KvSizeError::Json {
                path: path.into(),
                source,
            })?;
        return shape_from_config(&json).map(Some);
    }
    match gguf {
        Some(path) => {
            let meta = super::gguf::read(path).map_err(KvSizeError::Gguf)?;
            shape_from_gguf(&meta).map(Some)
        }
        None => Ok(None),
    }
}

/// The shape from a Hugging Face `config.json` (a multimodal model's
/// `text_config` when there is one).
pub fn shape_from_config(config: &serde_json::Value) -> Result<KvShape, KvSizeError> {
    let c = config.get("text_config").unwrap_or(config);
    let num = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| c.get(*k).and_then(serde_json::Value::as_u64))
    };
    assemble(
        "config.json",
        num(&["num_hidden_layers", "n_layer", "num_layers"]),
        num(&["num_attention_heads", "n_head"]),
        num(&["num_key_value_heads", "n_head_kv", "multi_query_group_num"]),
        num(&["head_dim"]),
        None,
        num(&["hidden_size", "n_embd", "d_model"]),
    )
}

/// The shape from GGUF metadata (`<arch>.block_count`,
/// `<arch>.attention.head_count[_kv]`, `key_length`/`value_length` or
/// `embedding_length` / heads).
pub fn shape_from_gguf(meta: &Metadata) -> Result<KvShape, KvSizeError> {
    let arch = meta.architecture().unwrap_or("llama");
    let num = |key: &str| meta.get(&format!("{arch}.{key}")).and_then(Value::as_u64);
    assemble(
        "the GGUF metadata",
        num("block_count"),
        num("attention.head_count"),
        num("attention.head_count_kv"),
        num("attention.key_length"),
        num("attention.value_length"),
        num("embedding_length"),
    )
}

/// Apply `--layers`, `--kv-heads` and `--head-dim` over a shape from a file.
pub fn with_overrides(
    base: Option<KvShape>,
    layers: Option<u64>,
    kv_heads: Option<u64>,
    head_dim: Option<u64>,
) -> Result<KvShape, KvSizeError> {
    assemble(
        if base.is_some() {
            "the model file"
        } else {
            "the flags"
        },
        layers.or(base.map(|b| b.layers)),
        None,
        kv_heads.or(base.map(|b| b.kv_heads)),
        head_dim.or(base.map(|b| b.head_dim)),
        head_dim.or(base.map(|b| b.value_dim)),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(layers: u64, kv_heads: u64, head_dim: u64) -> KvShape {
        KvShape {
            layers,
            kv_heads,
            head_dim,
            value_dim: head_dim,
        }
    }

    #[test]
    fn known_answers() {
        // SmolLM2-135M: 30 layers, 3 KV heads (GQA, 9 attention heads), head dim 64.
        let s = kv_size(shape(30, 3, 64), KvDtype::F16, 2048, 1).unwrap();
        assert_eq!(s.bytes, 47_185_920);
        assert_eq!(s.bytes_per_token, 23_040);
        // Llama-3-8B: 32 layers, 8 KV heads (GQA, 32 heads), 128: 8192 tokens is exactly 1 GiB.
        assert_eq!(
            kv_size(shape(32, 8, 128), KvDtype::F16, 8192, 1)
                .unwrap()
                .bytes,
            1 << 30
        );
        // Llama-2-7B, no GQA: 32 layers × 32 heads × 128; 4096 tokens, batch 8.
        assert_eq!(
            kv_size(shape(32, 32, 128), KvDtype::F16, 4096, 8)
                .unwrap()
                .bytes,
            16 << 30
        );
        // Llama-3-70B: 80 layers, 8 KV heads, 128, bf16, 8192 tokens.
        assert_eq!(
            kv_size(shape(80, 8, 128), KvDtype::Bf16, 8192, 1)
                .unwrap()
                .bytes,
            2_684_354_560
        );
        // An fp8 cache halves it; f32 doubles the f16 figure.
        assert_eq!(
            kv_size(shape(80, 8, 128), KvDtype::Fp8, 8192, 1)
                .unwrap()
                .bytes,
            1_342_177_280
        );
        assert_eq!(
            kv_size(shape(30, 3, 64), KvDtype::F32, 2048, 1)
                .unwrap()
                .bytes,
            94_371_840
        );
        // Different key and value widths count each once.
        let kv = KvShape {
            layers: 2,
            kv_heads: 1,
            head_dim: 192,
            value_dim: 128,
        };
        assert_eq!(
            kv_size(kv, KvDtype::F16, 10, 1).unwrap().bytes,
            2 * (192 + 128) * 2 * 10
        );
        assert!(matches!(
            kv_size(shape(u64::MAX, 2, 2), KvDtype::F16, 1, 1),
            Err(KvSizeError::Overflow)
        ));
    }

    #[test]
    fn configs_give_kv_heads_not_attention_heads() {
        // SmolLM2-135M-Instruct's config.json, the fields that matter.
        let smol = serde_json::json!({
            "hidden_size": 576, "num_attention_heads": 9, "num_hidden_layers": 30,
            "num_key_value_heads": 3, "model_type": "llama"
        });
        assert_eq!(shape_from_config(&smol).unwrap(), shape(30, 3, 64));
        // Without num_key_value_heads every head is a KV head (no GQA).
        let mha = serde_json::json!({"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32});
        assert_eq!(shape_from_config(&mha).unwrap(), shape(32, 32, 128));
        // An explicit head_dim wins over hidden / heads (Gemma-style).
        let gemma = serde_json::json!({"hidden_size": 3072, "num_attention_heads": 16,
            "num_key_value_heads": 16, "num_hidden_layers": 28, "head_dim": 256});
        assert_eq!(shape_from_config(&gemma).unwrap(), shape(28, 16, 256));
        let nested = serde_json::json!({"text_config": smol});
        assert_eq!(shape_from_config(&nested).unwrap(), shape(30, 3, 64));
        let err = shape_from_config(&serde_json::json!({"hidden_size": 8})).unwrap_err();
        assert!(err.to_string().contains("pass --layers"), "{err}");
        let err = shape_from_config(&serde_json::json!({"hidden_size": 10, "num_attention_heads": 3, "num_hidden_layers": 1}))
            .unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let s = with_overrides(Some(shape(30, 3, 64)), None, Some(9), None).unwrap();
        assert_eq!(s, shape(30, 9, 64));
        let err = with_overrides(None, Some(2), None, Some(64)).unwrap_err();
        assert!(err.to_string().contains("--kv-heads"), "{err}");
        assert!(with_overrides(None, Some(0), Some(1), Some(1)).is_err());
    }
}
