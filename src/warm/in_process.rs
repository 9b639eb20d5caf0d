//! In-process warm-up with candle: prefill each shared prefix with our own
//! Llama ([`crate::model::llama`]) and store its KV in the prefix cache on the
//! pod's shared volume, so that serving code in the same pod resumes from the
//! longest cached prefix instead of running it again.
//!
//! The cache is salted with the model version's manifest digest: KV written
//! for one version never matches a request served by another.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::model::llama::{Kv, Llama, LlamaError, Weights, brief};
use crate::model::tokenizer::{Tokenizer, TokenizerError};
use crate::warm::prefix_cache::{self, BLOCK_TOKENS, BlockKv, PrefixCache, PrefixCacheError};

/// Why an in-process warm-up failed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum InProcessError {
    #[error(transparent)]
    Model(#[from] LlamaError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Cache(#[from] PrefixCacheError),
    #[error(
        "failed to find the model version's manifest digest: {path} is missing or unreadable; pass --manifest-digest, or fetch the model with `modelcache fetch`, which writes it"
    )]
    Digest { path: PathBuf },
    #[error("failed to tokenize prompt {index}: it has no tokens")]
    EmptyPrompt { index: usize },
    #[error("failed to choose the device: {0}")]
    Device(String),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

impl InProcessError {
    /// 2 bad input (model, tokenizer, prompts, digest, device); 3 the GPU
    /// lacks the memory; 1 anything else (I/O, the computation).
    pub fn exit_code(&self) -> u8 {
        match self {
            InProcessError::Model(LlamaError::Open { .. } | LlamaError::Load { .. })
            | InProcessError::Tokenizer(_)
            | InProcessError::Digest { .. }
            | InProcessError::EmptyPrompt { .. }
            | InProcessError::Device(_) => 2,
            InProcessError::Gpu(crate::gpu::GpuError::DoesNotFit { .. }) => 3,
            _ => 1,
        }
    }
}

/// What `modelcache warm --weights` does.
#[derive(Debug, Clone)]
pub struct InProcessOptions {
    /// A `.gguf` file, or a directory with config.json and safetensors.
    pub weights_path: PathBuf,
    /// Quantized or dequantized GGUF weights.
    pub weights: Weights,
    /// A tokenizer.json; by default the one beside the weights.
    pub tokenizer: Option<PathBuf>,
    /// Where the KV blocks go.
    pub prefix_cache: PathBuf,
    /// The version's manifest digest; read from the fetch marker beside the
    /// weights when `None`.
    pub manifest_digest: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

/// Warm every prompt into the prefix cache and report what was done.
pub fn run(opts: &InProcessOptions, prompts: &[String]) -> Result<InProcessReport, InProcessError> {
    let started = Instant::now();
    let digest = match &opts.manifest_digest {
        Some(d) => d.clone(),
        None => {
            let dir = if opts.weights_path.is_dir() {
                opts.weights_path.clone()
            } else {
                opts.weights_path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            };
            manifest_digest_of(&dir)?
        }
    };
    let device = device(&opts.device).map_err(InProcessError::Device)?;
    if let Some(ordinal) = cuda_ordinal(&opts.device).map_err(InProcessError::Device)? {
        check_gpu_fits(ordinal, opts, prompts)?;
    }
    let (model, tokenizer) = load(
        &opts.weights_path,
        opts.weights,
        opts.tokenizer.as_deref(),
        &device,
    )?;
    let warmer = InProcess {
        model,
        tokenizer,
        cache: PrefixCache::open(&opts.prefix_cache, &digest)?,
    };
    let prefixes = warmer.warm(prompts)?;
    Ok(InProcessReport {
        mode: "in-process",
        weights: (!opts.weights_path.is_dir()).then_some(opts.weights),
        device: opts.device.clone(),
        manifest_digest: digest,
        block_tokens: BLOCK_TOKENS,
        prefixes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Refuse a GPU warm-up whose weights plus the KV of the longest prompt do
/// not fit the device's free memory, before anything is loaded onto it.
fn check_gpu_fits(
    ordinal: usize,
    opts: &InProcessOptions,
    prompts: &[String],
) -> Result<(), InProcessError> {
    let report = crate::gpu::probe()?;
    let gpu = report
        .devices
        .iter()
        .find(|d| d.ordinal == ordinal)
        .ok_or_else(|| {
            InProcessError::Device(format!(
                "GPU {ordinal} is not present: {}",
                report.describe()
            ))
        })?;
    let (weights, shape) = planned_weights(&opts.weights_path, opts.weights)?;
    // Tokens are at most bytes + specials; the byte count bounds the plan
    // without loading the tokenizer first.
    let tokens = prompts
        .iter()
        .map(|p| p.len() as u64 + 1)
        .max()
        .unwrap_or(1);
    let kv = crate::model::kv_size::kv_size(shape, crate::model::kv_size::KvDtype::F32, tokens, 1)
        .map_err(|e| InProcessError::Device(e.to_string()))?;
    crate::gpu::check_fits(gpu, weights, &kv)?;
    Ok(())
}

/// Elements in a safetensors file, from its JSON header alone.
fn safetensors_elements(path: &Path) -> Result<u64, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(format!("its header claims {len} bytes"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    Ok(header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(_, t)| t.get("shape")?.as_array().cloned())
        .map(|shape| shape.iter().filter_map(|d| d.as_u64()).product::<u64>())
        .sum())
}

/// Bytes the weights will take once loaded, and the KV shape, read from the
/// files' headers only.
pub fn planned_weights(
    path: &Path,
    weights: Weights,
) -> Result<(u64, crate::model::kv_size::KvShape), InProcessError> {
    use crate::model::kv_size;
    let load = |why: String| {
        InProcessError::Model(LlamaError::Load {
            path: path.into(),
            why,
        })
    };
    if path.is_dir() {
        let config: serde_json::Value = std::fs::read(path.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| load("config.json is missing or not JSON".into()))?;
        let shape = kv_size::shape_from_config(&config).map_err(|e| load(e.to_string()))?;
        let mut elements = 0u64;
        for entry in std::fs::read_dir(path).map_err(|e| load(e.to_string()))? {
            let file = entry.map_err(|e| load(e.to_string()))?.path();
            if file.extension().is_some_and(|x| x == "safetensors") {
                elements += safetensors_elements(&file)
                    .map_err(|why| load(format!("{}: {why}", file.display())))?;
            }
        }
        return Ok((elements * 4, shape));
    }
    let meta = crate::model::gguf::read(path).map_err(|e| load(e.to_string()))?;
    let shape = kv_size::shape_from_gguf(&meta).map_err(|e| load(e.to_string()))?;
    let mut file = std::fs::File::open(path).map_err(|source| {
        InProcessError::Model(LlamaError::Open {
            path: path.into(),
            source,
        })
    })?;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| load(brief(&e)))?;
    let bytes = content
        .tensor_infos
        .values()
        .map(|info| {
            let elements = info.shape.elem_count();
            match weights {
                Weights::Dequantized => elements as u64 * 4,
                Weights::Quantized => {
                    (elements / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
                }
            }
        })
        .sum();
    Ok((bytes, shape))
}

/// The model, its tokenizer and the prefix cache of its version.
pub struct InProcess {
    /// The model.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The prefix cache, salted by the version's manifest digest.
    pub cache: PrefixCache,
}

/// Appended to each prompt to time a request that shares it (as engine mode
/// does).
const PROBE_SUFFIX: &str = " ?";

/// The outcome of one prefill.
pub struct Prefill {
    /// Logits of the last token.
    pub logits: Tensor,
    /// KV of the whole sequence.
    pub kv: Kv,
    /// Tokens taken from the prefix cache instead of computed.
    pub reused_tokens: usize,
    /// Blocks written to the prefix cache.
    pub stored_blocks: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// What warming one prefix did.
pub struct PrefixWarm {
    /// The prefix's position in the prompts file.
    pub index: usize,
    /// Its tokens.
    pub tokens: usize,
    /// Tokens already in the prefix cache (0 on a cold cache).
    pub reused_tokens: usize,
    /// Blocks stored.
    pub stored_blocks: usize,
    /// The prefill that filled the cache: the cold time to first token when
    /// nothing was reused.
    pub prefill_seconds: f64,
    /// Time to first token of the prompt plus a short suffix, resuming from
    /// the cache, as a request sharing the prefix will.
    pub warmed_seconds: f64,
    /// Tokens the warmed request reused from the cache.
    pub warmed_reused_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// The JSON printed at the end.
pub struct InProcessReport {
    /// `in-process`.
    pub mode: &'static str,
    /// How GGUF weights were loaded.
    pub weights: Option<Weights>,
    /// Where it ran.
    pub device: String,
    /// The salt of every block.
    pub manifest_digest: String,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Each prefix's figures.
    pub prefixes: Vec<PrefixWarm>,
    /// Wall time.
    pub seconds: f64,
}

/// The manifest digest of the version `modelcache fetch` placed in
/// `model_dir` (from its `.modelcache/complete` marker).
pub fn manifest_digest_of(model_dir: &Path) -> Result<String, InProcessError> {
    crate::artifact::fetch::complete_marker(model_dir)
        .map(|m| m.manifest_digest)
        .ok_or_else(|| InProcessError::Digest {
            path: model_dir.join(".modelcache").join("complete"),
        })
}

impl InProcess {
    /// The KV of the longest cached prefix of `tokens` that still leaves at
    /// least one token to run (a prefill must compute the last token's
    /// logits). `None` when nothing usable is cached.
    pub fn resume(&self, tokens: &[u32]) -> Result<Option<Kv>, InProcessError> {
        let usable = tokens.len().saturating_sub(1) / BLOCK_TOKENS * BLOCK_TOKENS;
        let blocks = self.cache.longest_prefix(&tokens[..usable]);
        if blocks.is_empty() {
            return Ok(None);
        }
        match blocks_to_kv(&blocks, &self.model) {
            Ok(kv) => Ok(Some(kv)),
            Err(why) => {
                // Same salt but another shape: a different network was
                // stored under this digest. A miss, not a failure.
                tracing::warn!(%why, "ignoring cached KV that does not fit the model");
                Ok(None)
            }
        }
    }

    /// Prefill `tokens`, resuming from the longest cached prefix and storing
    /// the whole blocks that were not cached yet.
    pub fn prefill(&self, tokens: &[u32]) -> Result<Prefill, InProcessError> {
        let past = self.resume(tokens)?;
        let reused = past.as_ref().map(Kv::len).unwrap_or(0);
        let (logits, kv) = self.model.forward(&tokens[reused..], past.as_ref())?;
        let mut stored = 0;
        for index in reused / BLOCK_TOKENS..tokens.len() / BLOCK_TOKENS {
            self.cache.put(tokens, index, &kv_block(&kv, index)?)?;
            stored += 1;
        }
        Ok(Prefill {
            logits,
            kv,
            reused_tokens: reused,
            stored_blocks: stored,
        })
    }

    /// Prefill every prompt in order; the prefix cache then holds them all.
    pub fn warm(&self, prompts: &[String]) -> Result<Vec<PrefixWarm>, InProcessError> {
        let mut out = Vec::with_capacity(prompts.len());
        for (index, prompt) in prompts.iter().enumerate() {
            let tokens = self.tokenizer.encode(prompt)?;
            if tokens.is_empty() {
                return Err(InProcessError::EmptyPrompt { index });
            }
            if tokens.len() < BLOCK_TOKENS {
                tracing::warn!(
                    index,
                    tokens = tokens.len(),
                    "prompt is shorter than one {BLOCK_TOKENS}-token block: nothing to cache"
                );
            }
            let started = Instant::now();
            let prefill = self.prefill(&tokens)?;
            let prefill_seconds = started.elapsed().as_secs_f64();

            let probe = self.tokenizer.encode(&format!("{prompt}{PROBE_SUFFIX}"))?;
            let started = Instant::now();
            let past = self.resume(&probe)?;
            let warmed_reused = past.as_ref().map(Kv::len).unwrap_or(0);
            self.model.forward(&probe[warmed_reused..], past.as_ref())?;
            let warmed_seconds = started.elapsed().as_secs_f64();
            tracing::info!(
                index,
                tokens = tokens.len(),
                reused = prefill.reused_tokens,
                stored = prefill.stored_blocks,
                prefill_seconds,
                warmed_seconds,
                "warmed a prefix in process"
            );
            out.push(PrefixWarm {
                index,
                tokens: tokens.len(),
                reused_tokens: prefill.reused_tokens,
                stored_blocks: prefill.stored_blocks,
                prefill_seconds,
                warmed_seconds,
                warmed_reused_tokens: warmed_reused,
            });
        }
        Ok(out)
    }
}

/// Block `index` of `kv` as prefix-cache tensors, `(kv_heads, 16, head_dim)`.
pub fn kv_block(kv: &Kv, index: usize) -> Result<BlockKv, InProcessError> {
    let tensor = |t: &Tensor| -> Result<prefix_cache::Tensor, LlamaError> {
        let block = t
            .narrow(2, index * BLOCK_TOKENS, BLOCK_TOKENS)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let shape = block.dims().to_vec();
        let values: Vec<f32> = block.flatten_all()?.to_vec1()?;
        Ok(prefix_cache::Tensor {
            dtype: "F32".into(),
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    };
    let layers = kv
        .layers
        .iter()
        .map(|(k, v)| Ok((tensor(k)?, tensor(v)?)))
        .collect::<Result<Vec<_>, LlamaError>>()?;
    Ok(BlockKv { layers })
}

/// Consecutive blocks as the KV of their tokens, checked against the model.
/// Each layer's keys and values are laid out once, `(kv_heads, tokens,
/// head_dim)`, straight from the blocks' bytes: no tensor per block.
pub fn blocks_to_kv(blocks: &[BlockKv], model: &Llama) -> Result<Kv, String> {
    let c = model.config();
    let want = [c.kv_heads, BLOCK_TOKENS, c.head_dim];
    let total = blocks.len() * BLOCK_TOKENS;
    // Bytes of one head's rows within a block.
    let run = BLOCK_TOKENS * c.head_dim * 4;
    let mut layers = Vec::with_capacity(c.layers);
    for layer in 0..c.layers {
        let mut keys = vec![0f32; c.kv_heads * total * c.head_dim];
        let mut values = vec![0f32; keys.len()];
        for (b, block) in blocks.iter().enumerate() {
            if block.layers.len() != c.layers {
                return Err(format!(
                    "a block has {} layers; the model has {}",
                    block.layers.len(),
                    c.layers
                ));
            }
            let (k, v) = &block.layers[layer];
            for (t, out) in [(k, &mut keys), (v, &mut values)] {
                if t.dtype != "F32" || t.shape != want {
                    return Err(format!(
                        "a block tensor is {} {:?}; expected F32 {want:?}",
                        t.dtype, t.shape
                    ));
                }
                for head in 0..c.kv_heads {
                    let from = &t.data[head * run..(head + 1) * run];
                    let at = (head * total + b * BLOCK_TOKENS) * c.head_dim;
                    for (dst, src) in out[at..at + run / 4].iter_mut().zip(from.chunks_exact(4)) {
                        *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
                    }
                }
            }
        }
        let shape = (1, c.kv_heads, total, c.head_dim);
        let tensor =
            |data: Vec<f32>| Tensor::from_vec(data, shape, model.device()).map_err(|e| brief(&e));
        layers.push((tensor(keys)?, tensor(values)?));
    }
    Ok(Kv { layers })
}

/// `cpu`, or `cuda:N` in a build with the `cuda` feature.
pub fn device(spec: &str) -> Result<Device, String> {
    match cuda_ordinal(spec)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => cuda_device(ordinal),
    }
}

/// `None` for `cpu`, the ordinal for `cuda` (0) or `cuda:N`.
fn cuda_ordinal(spec: &str) -> Result<Option<usize>, String> {
    if spec == "cpu" {
        return Ok(None);
    }
    let ordinal = spec
        .strip_prefix("cuda")
        .map(|rest| rest.strip_prefix(':').unwrap_or(rest))
        .map(|n| {
            if n.is_empty() {
                Ok(0)
            } else {
                n.parse::<usize>()
            }
        });
    match ordinal {
        Some(Ok(ordinal)) => Ok(Some(ordinal)),
        _ => Err(format!(
            "device {spec:?} is not understood; expected `cpu`, `cuda` or `cuda:N`"
        )),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, String> {
    Device::new_cuda(ordinal)
        .map_err(|e| format!("failed to open CUDA device {ordinal}: {}", brief(&e)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device, String> {
    Err("this build has no candle CUDA support: build with `--no-default-features --features cuda` (needs the CUDA toolkit), or use `--device cpu`".into())
}

/// Load the weights: a `.gguf` file, or a directory with config.json and
/// safetensors. The tokenizer is `tokenizer` when given, else the model
/// directory's tokenizer.json, else (GGUF only) rebuilt from the GGUF.
pub fn load(
    weights_path: &Path,
    weights: Weights,
    tokenizer: Option<&Path>,
    device: &Device,
) -> Result<(Llama, Tokenizer), InProcessError> {
    let is_dir = weights_path.is_dir();
    let model = if is_dir {
        Llama::from_safetensors(weights_path, device)?
    } else {
        Llama::from_gguf(weights_path, weights, device)?
    };
    let beside = if is_dir {
        Some(weights_path.join("tokenizer.json"))
    } else {
        weights_path.parent().map(|p| p.join("tokenizer.json"))
    };
    let tokenizer = match (tokenizer, beside) {
        (Some(path), _) => Tokenizer::from_json(path)?,
        (None, Some(path)) if path.is_file() => Tokenizer::from_json(&path)?,
        _ if is_dir => {
            return Err(TokenizerError::Json {
                path: weights_path.join("tokenizer.json"),
                why: "it is missing; pass --tokenizer".into(),
            }
            .into());
        }
        _ => Tokenizer::from_gguf_file(weights_path)?,
    };
    Ok((model, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_parsed() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        let err = device("gpu0").unwrap_err();
        assert!(err.contains("expected `cpu`"), "{err}");
        #[cfg(not(feature = "cuda"))]
        assert!(
            device("cuda:0")
                .unwrap_err()
                .contains("no candle CUDA support")
        );
    }

    #[test]
    fn a_model_dir_without_a_fetch_marker_names_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let err = manifest_digest_of(dir.path()).unwrap_err().to_string();
        assert!(err.contains(".modelcache/complete"), "{err}");
        assert!(err.contains("--manifest-digest"), "{err}");
    }
}
