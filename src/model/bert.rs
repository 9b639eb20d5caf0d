//! Sentence embeddings with a BERT encoder on candle: the sentence-transformers
//! layout (all-MiniLM-L6-v2 and other BERT models): `config.json`,
//! `model.safetensors`, `tokenizer.json`, mean pooling over the attention
//! mask, then L2 normalization, so that a dot product is the cosine
//! similarity. Batched, padded to the longest text of each batch.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};
use rayon::prelude::*;

use super::llama::brief;

/// Why the sentence embedder could not be loaded or run.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum EmbedError {
    #[error(
        "failed to read {path}; expected a sentence-transformers BERT directory (config.json, model.safetensors, tokenizer.json)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to load the embedding model {path}: {why}; expected a sentence-transformers BERT directory (config.json, model.safetensors, tokenizer.json)"
    )]
    Load { path: PathBuf, why: String },
    #[error("failed to embed: {0}")]
    Run(String),
}

impl From<candle_core::Error> for EmbedError {
    fn from(e: candle_core::Error) -> Self {
        EmbedError::Run(brief(&e))
    }
}

struct Layer {
    /// Query (pre-scaled by 1/√head_dim), key and value in one matrix:
    /// one matmul instead of three.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A sentence-transformers BERT model and its tokenizer.
pub struct SentenceEmbedder {
    words: Tensor,
    positions: Tensor,
    token_types: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    max_tokens: usize,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    fingerprint: String,
}

/// Texts embedded in one forward pass.
const BATCH: usize = 32;

impl SentenceEmbedder {
    /// Loads a sentence-transformers model directory (config.json, model.safetensors, tokenizer.json).
    pub fn load(dir: &Path, device: &Device) -> Result<SentenceEmbedder, EmbedError> {
        let load = |why: String| EmbedError::Load {
            path: dir.into(),
            why,
        };
        let read_json = |name: &str| -> Result<serde_json::Value, EmbedError> {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|source| EmbedError::Read {
                path: path.clone(),
                source,
            })?;
            serde_json::from_slice(&bytes).map_err(|e| load(format!("{name} is not JSON ({e})")))
        };
        let config = read_json("config.json")?;
        let int = |key: &str| {
            config[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| load(format!("config.json lacks the integer {key}")))
        };
        if config["model_type"].as_str() != Some("bert") {
            return Err(load(format!(
                "config.json says model_type {}; expected \"bert\"",
                config["model_type"]
            )));
        }
        match config["hidden_act"].as_str() {
            Some("gelu") | None => {}
            Some(other) => return Err(load(format!("activation {other:?} is not supported"))),
        }
        // sentence-transformers' pooling must be the mean, the only one built.
        if let Ok(pooling) = read_json("1_Pooling/config.json")
            && pooling["pooling_mode_mean_tokens"].as_bool() != Some(true)
        {
            return Err(load(
                "1_Pooling/config.json does not ask for mean pooling, the only one supported"
                    .into(),
            ));
        }
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let layers_n = int("num_hidden_layers")?;
        let eps = config["layer_norm_eps"].as_f64().unwrap_or(1e-12);
        let max_positions = int("max_position_embeddings")?;
        let max_tokens = read_json("sentence_bert_config.json")
            .ok()
            .and_then(|c| c["max_seq_length"].as_u64())
            .map(|v| v as usize)
            .unwrap_or(max_positions)
            .min(max_positions);
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(load(format!(
                "hidden size {hidden} is not a multiple of {heads} heads"
            )));
        }

        let weights_path = dir.join("model.safetensors");
        let fingerprint = fingerprint(dir)?;
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| load(format!("model.safetensors: {}", brief(&e))))?;
        // Some exports prefix every name with `bert.`.
        let prefix = if tensors.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let tensors = std::cell::RefCell::new(tensors);
        let take = |name: &str| -> Result<Tensor, EmbedError> {
            let full = format!("{prefix}{name}");
            tensors
                .borrow_mut()
                .remove(&full)
                .ok_or_else(|| load(format!("model.safetensors has no tensor {full}")))?
                .to_dtype(DType::F32)
                .map_err(EmbedError::from)
        };
        let linear = |name: &str| -> Result<Linear, EmbedError> {
            Ok(Linear::new(
                take(&format!("{name}.weight"))?,
                Some(take(&format!("{name}.bias"))?),
            ))
        };
        let norm = |w: Tensor, b: Tensor| LayerNorm::new(w, b, eps);

        let head_dim = hidden / heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = format!("encoder.layer.{i}");
            let part = |name: &str| -> Result<(Tensor, Tensor), EmbedError> {
                let name = format!("{p}.attention.self.{name}");
                Ok((
                    take(&format!("{name}.weight"))?,
                    take(&format!("{name}.bias"))?,
                ))
            };
            let (qw, qb) = part("query")?;
            let (kw, kb) = part("key")?;
            let (vw, vb) = part("value")?;
            let fused = || -> candle_core::Result<Linear> {
                Ok(Linear::new(
                    Tensor::cat(&[(qw * scale)?, kw, vw], 0)?,
                    Some(Tensor::cat(&[(qb * scale)?, kb, vb], 0)?),
                ))
            };
            let qkv = fused()
                .map_err(|e| load(format!("the attention weights of layer {i}: {}", brief(&e))))?;
            layers.push(Layer {
                qkv,
                attention_out: linear(&format!("{p}.attention.output.dense"))?,
                attention_norm: norm(
                    take(&format!("{p}.attention.output.LayerNorm.weight"))?,
                    take(&format!("{p}.attention.output.LayerNorm.bias"))?,
                ),
                intermediate: linear(&format!("{p}.intermediate.dense"))?,
                output: linear(&format!("{p}.output.dense"))?,
                output_norm: norm(
                    take(&format!("{p}.output.LayerNorm.weight"))?,
                    take(&format!("{p}.output.LayerNorm.bias"))?,
                ),
            });
        }
        let words = take("embeddings.word_embeddings.weight")?;
        let positions = take("embeddings.position_embeddings.weight")?;
        let token_types = take("embeddings.token_type_embeddings.weight")?;
        let embeddings_norm = norm(
            take("embeddings.LayerNorm.weight")?,
            take("embeddings.LayerNorm.bias")?,
        );

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| load(format!("tokenizer.json: {e}")))?;
        // The file may pin a fixed padding (all-MiniLM's says 128): pad each
        // batch to its longest text instead, and cut at the model's limit.
        tokenizer.with_padding(Some(tokenizers::PaddingParams::default()));
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load(format!("tokenizer.json: {e}")))?;
        Ok(SentenceEmbedder {
            words,
            positions,
            token_types,
            embeddings_norm,
            layers,
            heads,
            hidden,
            max_tokens,
            tokenizer,
            device: device.clone(),
            fingerprint,
        })
    }

    /// What names this model's embedding space: a digest of its weights,
    /// configuration and tokenizer. Vectors of two models (or two versions
    /// of one) are not comparable even when their widths agree, so stored
    /// vectors are only ever compared with those of the same fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Width of an embedding.
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// Tokens beyond this are cut off.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Unit-length embeddings of `texts`, in order. Texts are batched by
    /// length, so that a batch is padded to little more than its texts.
    pub fn embed<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].as_ref().len());
        let batches: Vec<&[usize]> = order.chunks(BATCH).collect();
        let run = |batch: &&[usize]| {
            let inputs: Vec<&str> = batch.iter().map(|&i| texts[i].as_ref()).collect();
            self.embed_batch(&inputs)
        };
        // One batch per task on rayon's pool, where candle's gemm runs too:
        // the steps of a forward pass that run on one thread (norms, GELU,
        // copies, small matmuls) take a good share of a batch's time, and a
        // second batch fills the other cores meanwhile; a large matmul's
        // parts are stolen by whichever thread is idle. A single batch (one
        // query) skips the hand-off to the pool.
        let vectors = if batches.len() == 1 {
            batches.iter().map(run).collect::<Result<Vec<_>, _>>()?
        } else {
            batches.par_iter().map(run).collect::<Result<Vec<_>, _>>()?
        };
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for (batch, batch_vectors) in batches.iter().zip(vectors) {
            for (&i, v) in batch.iter().zip(batch_vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Run(format!("tokenizing: {e}")))?;
        let batch = encodings.len();
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(batch * len);
        let mut mask = Vec::with_capacity(batch * len);
        for e in &encodings {
            ids.extend(e.get_ids().iter().copied());
            mask.extend(e.get_attention_mask().iter().map(|&m| m as f32));
            // Padding is to the longest, so rows are already `len` long;
            // an empty batch entry still needs a row.
            ids.resize(ids.len().next_multiple_of(len), 0);
            mask.resize(mask.len().next_multiple_of(len), 0.0);
        }
        let ids = Tensor::from_vec(ids, (batch, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (batch, len), &self.device)?;

        let positions = self.positions.narrow(0, 0, len)?;
        let words = self.words.index_select(&ids.flatten_all()?, 0)?;
        let x = words
            .reshape((batch, len, self.hidden))?
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_types.narrow(0, 0, 1)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;

        // 0 where a key is a real token, a large negative where it is padding.
        let key_bias = ((mask.clone() - 1.0)? * 1e9)?
            .reshape((batch, 1, 1, len))?
            .to_dtype(DType::F32)?;
        let head_dim = self.hidden / self.heads;
        for layer in &self.layers {
            // (batch, len, 3·hidden) → (3, batch, heads, len, head_dim): one
            // copy for the three.
            let qkv = layer
                .qkv
                .forward(&x)?
                .reshape((batch, len, 3, self.heads, head_dim))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            let scores = q.matmul(&k.t()?)?.broadcast_add(&key_bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((batch, len, self.hidden))?;
            x = layer
                .attention_norm
                .forward(&(layer.attention_out.forward(&context)? + &x)?)?;
            let inner = super::gelu::gelu(&layer.intermediate.forward(&x)?)?;
            x = layer
                .output_norm
                .forward(&(layer.output.forward(&inner)? + &x)?)?;
        }

        // Mean over real tokens, then unit length.
        let weights = mask.unsqueeze(2)?;
        let summed = x.broadcast_mul(&weights)?.sum(1)?;
        let counts = weights.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norms)?;
        Ok(unit.to_vec2()?)
    }
}

/// The SHA-256 of the digests of the files that decide the vectors.
fn fingerprint(dir: &Path) -> Result<String, EmbedError> {
    let mut digests = String::new();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let path = dir.join(name);
        let (_, digest) = std::fs::File::open(&path)
            .and_then(crate::digest::hash_reader)
            .map_err(|source| EmbedError::Read { path, source })?;
        digests.push_str(&digest);
        digests.push('\n');
    }
    Ok(crate::digest::sha256_hex(digests.as_bytes()))
}

/// Dot product of two unit vectors: their cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    crate::vector::dot(a, b)
}
