//! A Llama-family decoder (Llama, SmolLM, Mistral without sliding windows)
//! on candle, written so that the KV is ours: a prefill takes the KV of a
//! cached prefix and returns the KV of the whole sequence, which
//! [`crate::warm::prefix_cache`] stores in blocks. candle's own models keep their KV
//! cache private, which is why this is not `candle_transformers`.
//!
//! Weights come from a GGUF file, kept quantized (`QMatMul` on the quantized
//! blocks) or dequantized to f32 at load, or from a safetensors directory in
//! Hugging Face layout with its `config.json`. Only plain data formats are
//! read: never a pickle.
//!
//! Batch 1, causal attention over `[cached prefix ‖ new tokens]`; the logits
//! of the last token only, which is all a prefill needs for the first token.

use std::path::{Path, PathBuf};

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

/// How GGUF matmul weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    /// The file's own quantized blocks (Q4_1, Q8_0, ...): least memory.
    Quantized,
    /// Dequantized to f32 at load: exact arithmetic, four times the memory of f16.
    Dequantized,
}

/// Why a Llama model could not be loaded or run.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum LlamaError {
    #[error("failed to open the model {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to load the model {path}: {why}")]
    Load { path: PathBuf, why: String },
    #[error("failed to run the model: {0}")]
    Run(String),
    #[error("failed to use cached KV: {0}")]
    Kv(String),
}

impl From<candle_core::Error> for LlamaError {
    fn from(e: candle_core::Error) -> Self {
        LlamaError::Run(brief(&e))
    }
}

/// candle's message without the backtrace it appends when RUST_BACKTRACE is
/// set.
pub fn brief(e: &candle_core::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default().trim_end();
    first.trim_end_matches('(').trim_end().to_string()
}

/// The shape of the network.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LlamaConfig {
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Hidden size.
    pub hidden: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency.
    pub rope_base: f64,
    /// Longest sequence.
    pub max_positions: usize,
    /// GGUF stores Q and K rows permuted for interleaved (GPT-J style) RoPE;
    /// Hugging Face checkpoints use rotate-half (NeoX style).
    pub rope_interleaved: bool,
}

/// The KV of a sequence: per layer, keys (after RoPE) and values, each
/// `(1, kv_heads, tokens, head_dim)` in f32.
#[derive(Debug, Clone)]
pub struct Kv {
    /// Per layer, K and V of the tokens so far.
    pub layers: Vec<(Tensor, Tensor)>,
}

impl Kv {
    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// A Llama-family model on candle whose KV cache we own.
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Bytes the weights take in memory, for the GPU fit check.
    weight_bytes: u64,
}

/// Largest context a prefill is prepared for when the model does not say.
const DEFAULT_MAX_POSITIONS: usize = 8192;

impl Llama {
    /// The model's dimensions.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Where it runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of its weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Load a GGUF file of architecture `llama`.
    pub fn from_gguf(path: &Path, weights: Weights, device: &Device) -> Result<Llama, LlamaError> {
        let load = |why: String| LlamaError::Load {
            path: path.into(),
            why,
        };
        // Our reader first: it refuses what would make candle's panic (an
        // alignment of zero) or allocate without bound.
        if let Err(e) = super::gguf::read(path) {
            return Err(match e {
                super::gguf::GgufError::Io { source, .. } => LlamaError::Open {
                    path: path.into(),
                    source,
                },
                other => load(format!(
                    "it is not a readable GGUF file ({other}); expected a .gguf file, or a \
                     directory with config.json and *.safetensors"
                )),
            });
        }
        let mut file = std::fs::File::open(path).map_err(|source| LlamaError::Open {
            path: path.into(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| load(format!("it is not a readable GGUF file ({}); expected a .gguf file, or a directory with config.json and *.safetensors", brief(&e))))?;
        let meta = |key: &str| {
            content
                .metadata
                .get(key)
                .ok_or_else(|| load(format!("its metadata lacks {key}")))
        };
        let arch = meta("general.architecture")?
            .to_string()
            .map_err(|e| load(brief(&e)))?
            .clone();
        if arch != "llama" {
            return Err(load(format!(
                "its architecture is {arch:?}; expected \"llama\" (Llama, SmolLM, Mistral)"
            )));
        }
        let int = |key: &str| -> Result<usize, LlamaError> {
            meta(key)?
                .to_u32()
                .map(|v| v as usize)
                .map_err(|e| load(format!("{key}: {}", brief(&e))))
        };
        let float = |key: &str, default: f64| -> Result<f64, LlamaError> {
            match content.metadata.get(key) {
                None => Ok(default),
                Some(v) => v
                    .to_f32()
                    .map(f64::from)
                    .map_err(|e| load(format!("{key}: {}", brief(&e)))),
            }
        };
        let heads = int("llama.attention.head_count")?;
        let hidden = int("llama.embedding_length")?;
        let config = LlamaConfig {
            layers: int("llama.block_count")?,
            heads,
            kv_heads: int("llama.attention.head_count_kv").unwrap_or(heads),
            head_dim: int("llama.rope.dimension_count").unwrap_or(hidden / heads.max(1)),
            hidden,
            rms_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_base: float("llama.rope.freq_base", 10_000.0)?,
            max_positions: int("llama.context_length").unwrap_or(DEFAULT_MAX_POSITIONS),
            rope_interleaved: true,
        };
        check_config(&config).map_err(load)?;

        let mut weight_bytes = 0u64;
        let mut tensor = |name: &str| -> Result<QTensor, LlamaError> {
            let t = content
                .tensor(&mut file, name, device)
                .map_err(|e| load(format!("tensor {name}: {}", brief(&e))))?;
            weight_bytes += t.storage_size_in_bytes() as u64;
            Ok(t)
        };
        let matmul = |t: QTensor| -> Result<QMatMul, LlamaError> {
            Ok(match weights {
                Weights::Quantized => QMatMul::from_qtensor(t)?,
                Weights::Dequantized => QMatMul::Tensor(t.dequantize(device)?),
            })
        };
        let vector = |t: QTensor| -> Result<Tensor, LlamaError> { Ok(t.dequantize(device)?) };

        let embed_q = tensor("token_embd.weight")?;
        let embed = embed_q.dequantize(device)?;
        let norm = vector(tensor("output_norm.weight")?)?;
        // Tied embeddings (SmolLM2) have no output.weight.
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => matmul(tensor("output.weight")?)?,
            false => matmul(embed_q)?,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut t = |suffix: &str| tensor(&format!("blk.{i}.{suffix}.weight"));
            layers.push(Layer {
                attn_norm: vector(t("attn_norm")?)?,
                wq: matmul(t("attn_q")?)?,
                wk: matmul(t("attn_k")?)?,
                wv: matmul(t("attn_v")?)?,
                wo: matmul(t("attn_output")?)?,
                ffn_norm: vector(t("ffn_norm")?)?,
                gate: matmul(t("ffn_gate")?)?,
                up: matmul(t("ffn_up")?)?,
                down: matmul(t("ffn_down")?)?,
            });
        }
        if weights == Weights::Dequantized {
            weight_bytes = f32_bytes(&embed) + layers_f32_bytes(&layers, &norm, &output);
        }
        Llama::assemble(config, embed, layers, norm, output, device, weight_bytes)
    }

    /// Load a Hugging Face checkpoint: `config.json` and `*.safetensors` in
    /// `dir`, weights converted to f32.
    pub fn from_safetensors(dir: &Path, device: &Device) -> Result<Llama, LlamaError> {
        let load = |why: String| LlamaError::Load {
            path: dir.into(),
            why,
        };
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| LlamaError::Open {
            path: config_path.clone(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| load(format!("config.json is not JSON ({e})")))?;
        let int = |key: &str| {
            json.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| load(format!("config.json lacks the integer {key}")))
        };
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let config = LlamaConfig {
            layers: int("num_hidden_layers")?,
            heads,
            kv_heads: int("num_key_value_heads").unwrap_or(heads),
            head_dim: int("head_dim").unwrap_or(hidden / heads.max(1)),
            hidden,
            rms_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-5),
            rope_base: json["rope_theta"].as_f64().unwrap_or(10_000.0),
            max_positions: int("max_position_embeddings").unwrap_or(DEFAULT_MAX_POSITIONS),
            rope_interleaved: false,
        };
        check_config(&config).map_err(load)?;

        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| LlamaError::Open {
                path: dir.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(load("it holds no *.safetensors file".into()));
        }
        let mut tensors = std::collections::HashMap::new();
        for file in &files {
            let loaded = candle_core::safetensors::load(file, device)
                .map_err(|e| load(format!("{}: {}", file.display(), brief(&e))))?;
            tensors.extend(loaded);
        }
        let mut take = |name: &str| -> Result<Tensor, LlamaError> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| load(format!("no tensor {name}")))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let embed = take("model.embed_tokens.weight")?;
        let norm = take("model.norm.weight")?;
        let output = match take("lm_head.weight") {
            Ok(t) => QMatMul::Tensor(t),
            Err(_) => QMatMul::Tensor(embed.clone()),
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut t = |suffix: &str| take(&format!("model.layers.{i}.{suffix}.weight"));
            layers.push(Layer {
                attn_norm: t("input_layernorm")?,
                wq: QMatMul::Tensor(t("self_attn.q_proj")?),
                wk: QMatMul::Tensor(t("self_attn.k_proj")?),
                wv: QMatMul::Tensor(t("self_attn.v_proj")?),
                wo: QMatMul::Tensor(t("self_attn.o_proj")?),
                ffn_norm: t("post_attention_layernorm")?,
                gate: QMatMul::Tensor(t("mlp.gate_proj")?),
                up: QMatMul::Tensor(t("mlp.up_proj")?),
                down: QMatMul::Tensor(t("mlp.down_proj")?),
            });
        }
        let weight_bytes = f32_bytes(&embed) + layers_f32_bytes(&layers, &norm, &output);
        Llama::assemble(config, embed, layers, norm, output, device, weight_bytes)
    }

    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: QMatMul,
        device: &Device,
        weight_bytes: u64,
    ) -> Result<Llama, LlamaError> {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_base
                    .powf(2.0 * i as f64 / config.head_dim as f64) as f32
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, config.max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((config.max_positions, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Llama {
            cos: angles.cos()?,
            sin: angles.sin()?,
            config,
            embed,
            layers,
            norm,
            output,
            device: device.clone(),
            weight_bytes,
        })
    }

    /// Run `tokens` after the KV of `past` (the cached prefix, or none).
    /// Returns the logits of the last token (`vocab` f32) and the KV of the
    /// whole sequence `past ‖ tokens`.
    pub fn forward(&self, tokens: &[u32], past: Option<&Kv>) -> Result<(Tensor, Kv), LlamaError> {
        let c = &self.config;
        let seq = tokens.len();
        if seq == 0 {
            return Err(LlamaError::Kv(
                "a prefill needs at least one new token".into(),
            ));
        }
        let offset = past.map(Kv::len).unwrap_or(0);
        if let Some(past) = past {
            self.check_kv(past)?;
        }
        if offset + seq > c.max_positions {
            return Err(LlamaError::Kv(format!(
                "{} tokens exceed the model's {} positions",
                offset + seq,
                c.max_positions
            )));
        }
        let ids = Tensor::from_slice(tokens, seq, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let mask = causal_mask(seq, offset, &self.device)?;
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut kv = Vec::with_capacity(c.layers);
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps as f32)?;
            let heads = |m: &QMatMul, n: usize| -> candle_core::Result<Tensor> {
                m.forward(&h)?
                    .reshape((1, seq, n, c.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = self.rope(&heads(&layer.wq, c.heads)?, &cos, &sin)?;
            let k = self.rope(&heads(&layer.wk, c.kv_heads)?, &cos, &sin)?;
            let v = heads(&layer.wv, c.kv_heads)?;
            let (k, v) = match past {
                Some(past) => {
                    let (pk, pv) = &past.layers[i];
                    (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)
                }
                None => (k, v),
            };
            let total = offset + seq;
            // Grouped-query attention without copying K and V per head: the
            // query heads that share a KV head are stacked along the rows.
            let q = q.reshape((1, c.kv_heads, group * seq, c.head_dim))?;
            let scores = (q.matmul(&k.t()?)? * scale)?
                .reshape((1, c.heads, seq, total))?
                .broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((
                1,
                c.kv_heads,
                group * seq,
                total,
            ))?;
            let attended = probs
                .matmul(&v)?
                .reshape((1, c.heads, seq, c.head_dim))?
                .transpose(1, 2)?
                .reshape((1, seq, c.heads * c.head_dim))?;
            x = (x + layer.wo.forward(&attended)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps as f32)?;
            let gated =
                (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
            kv.push((k, v));
        }
        let last = x.narrow(1, seq - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps as f32)?;
        let logits = self.output.forward(&last)?.flatten_all()?;
        Ok((logits, Kv { layers: kv }))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if self.config.rope_interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    }

    /// KV from elsewhere (the prefix cache) must fit this network exactly.
    pub fn check_kv(&self, kv: &Kv) -> Result<(), LlamaError> {
        let c = &self.config;
        if kv.layers.len() != c.layers {
            return Err(LlamaError::Kv(format!(
                "it has {} layers; the model has {}",
                kv.layers.len(),
                c.layers
            )));
        }
        for (k, v) in &kv.layers {
            for t in [k, v] {
                let dims = t.dims();
                if dims.len() != 4
                    || dims[0] != 1
                    || dims[1] != c.kv_heads
                    || dims[3] != c.head_dim
                    || t.dtype() != DType::F32
                {
                    return Err(LlamaError::Kv(format!(
                        "a tensor has shape {dims:?} {:?}; expected [1, {}, tokens, {}] F32",
                        t.dtype(),
                        c.kv_heads,
                        c.head_dim
                    )));
                }
            }
        }
        Ok(())
    }
}

fn check_config(c: &LlamaConfig) -> Result<(), String> {
    if c.layers == 0 || c.heads == 0 || c.kv_heads == 0 || c.head_dim == 0 {
        return Err(format!("its shape is empty: {c:?}"));
    }
    if !c.heads.is_multiple_of(c.kv_heads) {
        return Err(format!(
            "{} attention heads are not a multiple of {} KV heads",
            c.heads, c.kv_heads
        ));
    }
    if !c.head_dim.is_multiple_of(2) {
        return Err(format!("head dimension {} is odd", c.head_dim));
    }
    Ok(())
}

/// `(seq, offset + seq)`: 0 where query `i` (at position `offset + i`) may
/// attend, -inf after it.
fn causal_mask(seq: usize, offset: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = offset + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq, total), device)
}

fn f32_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn layers_f32_bytes(layers: &[Layer], norm: &Tensor, output: &QMatMul) -> u64 {
    let m = |q: &QMatMul| match q {
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => f32_bytes(t),
        QMatMul::QTensor(t) => t.storage_size_in_bytes() as u64,
    };
    let per_layer: u64 = layers
        .iter()
        .map(|l| {
            f32_bytes(&l.attn_norm)
                + f32_bytes(&l.ffn_norm)
                + [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .map(m)
                    .sum::<u64>()
        })
        .sum();
    per_layer + f32_bytes(norm) + m(output)
}

/// The `n` largest entries of `logits` as `(token, logit)`, largest first.
pub fn top_k(logits: &Tensor, n: usize) -> Result<Vec<(u32, f32)>, LlamaError> {
    let values: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    let mut indexed: Vec<(u32, f32)> = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as u32, v))
        .collect();
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed.truncate(n);
    Ok(indexed)
}

/// Largest absolute difference between two logit vectors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, LlamaError> {
    Ok((a - b)?
        .abs()?
        .max(D::Minus1)?
        .to_dtype(DType::F32)?
        .to_scalar()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_lets_each_query_see_the_prefix_and_itself() {
        let m: Vec<Vec<f32>> = causal_mask(2, 3, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(m[0][..4], [0.0; 4]);
        assert_eq!(m[0][4], f32::NEG_INFINITY);
        assert_eq!(m[1], vec![0.0; 5]);
    }

    #[test]
    fn configs_with_uneven_heads_are_refused() {
        let mut c = LlamaConfig {
            layers: 2,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            hidden: 576,
            rms_eps: 1e-5,
            rope_base: 1e5,
            max_positions: 2048,
            rope_interleaved: true,
        };
        assert!(check_config(&c).is_ok());
        c.kv_heads = 4;
        assert!(check_config(&c).unwrap_err().contains("not a multiple"));
    }
}
