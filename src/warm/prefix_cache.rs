//! The on-disk prefix (KV) cache that `modelcache warm` fills: the KV of a
//! token sequence in blocks of 16 tokens, each block a safetensors file named
//! by a chained hash, so that a block's name identifies the whole prefix that
//! led to it.
//!
//! ```text
//! h(0) = sha256(salt ‖ tokens[0..16])        salt = the model version's manifest digest
//! h(i) = sha256(h(i-1) ‖ tokens[16i..16i+16])  tokens as u32 little-endian
//! <dir>/<hex h(i)>.safetensors               per layer `k.<l>` and `v.<l>`
//! ```
//!
//! Salting with the manifest digest means KV computed by another version of
//! the model (other weights) can never match. Each file carries the sha256 of
//! its tensor bytes in the safetensors metadata; a block whose bytes do not
//! match, or that cannot be parsed, is ignored (a miss) and removed. Files are
//! written through a temporary name and a rename, so readers never see half a
//! block. Only safetensors, plain data, is read: never a pickle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::digest::{hex, sha256_hex};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// Largest safetensors header accepted.
const MAX_HEADER: u64 = 16 << 20;

/// Why the on-disk prefix cache could not be read or written.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum PrefixCacheError {
    #[error("failed to {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to store a KV block: {why}")]
    Block { why: String },
}

/// One tensor of a block: element type (`F32`, `F16`, `BF16`), shape, bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// safetensors dtype name.
    pub dtype: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

/// The element types a block may hold, by their safetensors names.
const DTYPES: [(&str, safetensors::Dtype); 3] = [
    ("F32", safetensors::Dtype::F32),
    ("F16", safetensors::Dtype::F16),
    ("BF16", safetensors::Dtype::BF16),
];

impl Tensor {
    /// Its safetensors dtype, once the dtype and the byte count fit the shape.
    fn check(&self, name: &str) -> Result<safetensors::Dtype, String> {
        let dtype = DTYPES
            .iter()
            .find(|(n, _)| *n == self.dtype)
            .map(|(_, d)| *d);
        let dtype = dtype.ok_or_else(|| {
            format!(
                "{name} has dtype {:?}; expected F32, F16 or BF16",
                self.dtype
            )
        })?;
        // Whole-byte element types only (the three above). A shape read
        // from a file may not fit in usize: that is a mismatch, not a panic.
        let want = self
            .shape
            .iter()
            .try_fold(dtype.bitsize() / 8, |n, d| n.checked_mul(*d));
        if want != Some(self.data.len()) {
            let want = want.map_or("more than memory holds".to_string(), |w| w.to_string());
            return Err(format!(
                "{name} has {} bytes, its shape {:?} needs {want}",
                self.data.len(),
                self.shape
            ));
        }
        Ok(dtype)
    }
}

/// The KV of one block: per layer, keys and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockKv {
    /// Per layer, K and V of the block's tokens.
    pub layers: Vec<(Tensor, Tensor)>,
}

/// The chained hashes of every whole block of `tokens`.
pub fn block_hashes(salt: &str, tokens: &[u32]) -> Vec<[u8; 32]> {
    let mut out = Vec::with_capacity(tokens.len() / BLOCK_TOKENS);
    let mut previous: Vec<u8> = salt.as_bytes().to_vec();
    for block in tokens.chunks_exact(BLOCK_TOKENS) {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(&previous);
        for t in block {
            ctx.update(&t.to_le_bytes());
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(ctx.finish().as_ref());
        previous = h.to_vec();
        out.push(h);
    }
    out
}

/// A prefix cache directory for one model version.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    dir: PathBuf,
    salt: String,
}

impl PrefixCache {
    /// `salt` is the model version's manifest digest.
    pub fn open(dir: &Path, salt: &str) -> Result<PrefixCache, PrefixCacheError> {
        std::fs::create_dir_all(dir).map_err(|source| PrefixCacheError::Io {
            what: "create",
            path: dir.into(),
            source,
        })?;
        Ok(PrefixCache {
            dir: dir.into(),
            salt: salt.into(),
        })
    }

    fn path(&self, hash: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.safetensors", hex(hash)))
    }

    /// Store the KV of block `index` of `tokens` (the tokens before it decide
    /// its name).
    pub fn put(&self, tokens: &[u32], index: usize, kv: &BlockKv) -> Result<(), PrefixCacheError> {
        let hashes = block_hashes(&self.salt, tokens);
        let hash = hashes.get(index).ok_or_else(|| PrefixCacheError::Block {
            why: format!("block {index} is not whole in {} tokens", tokens.len()),
        })?;
        let bytes = encode(kv).map_err(|why| PrefixCacheError::Block { why })?;
        let path = self.path(hash);
        crate::artifact::disk::write_atomic(&path, &bytes).map_err(|source| PrefixCacheError::Io {
            what: "write",
            path,
            source,
        })
    }

    /// The longest cached prefix of `tokens`: the KV of its first blocks, as
    /// many as are stored in a row and intact. Its length in tokens is
    /// `blocks.len() * BLOCK_TOKENS`.
    pub fn longest_prefix(&self, tokens: &[u32]) -> Vec<BlockKv> {
        let mut found = Vec::new();
        for hash in block_hashes(&self.salt, tokens) {
            let path = self.path(&hash);
            let Ok(bytes) = std::fs::read(&path) else {
                break;
            };
            match decode(&bytes) {
                Some(kv) => found.push(kv),
                None => {
                    tracing::warn!(path = %path.display(), "ignoring a corrupt KV block");
                    let _ = std::fs::remove_file(&path);
                    break;
                }
            }
        }
        found
    }
}

/// A checked [`Tensor`] as the safetensors crate writes it.
struct Checked<'a>(&'a Tensor, safetensors::Dtype);

impl safetensors::View for Checked<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.1
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// The data section of a safetensors file: what follows its header.
fn data_section(bytes: &[u8]) -> Option<&[u8]> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    if n > MAX_HEADER {
        return None;
    }
    bytes.get(8usize.checked_add(n as usize)?..)
}

/// safetensors bytes with the sha256 of the data section in the metadata.
fn encode(kv: &BlockKv) -> Result<Vec<u8>, String> {
    encode_counted(kv, kv.layers.len().to_string())
}

/// [`encode`] with `layers` as the metadata's layer count.
fn encode_counted(kv: &BlockKv, layers: String) -> Result<Vec<u8>, String> {
    let mut tensors = Vec::with_capacity(kv.layers.len() * 2);
    for (l, (k, v)) in kv.layers.iter().enumerate() {
        for (name, t) in [(format!("k.{l}"), k), (format!("v.{l}"), v)] {
            let dtype = t.check(&name)?;
            tensors.push((name, Checked(t, dtype)));
        }
    }
    let serialize = |tensors: Vec<(String, Checked<'_>)>, meta| {
        safetensors::serialize(tensors, Some(meta)).map_err(|e| format!("safetensors: {e}"))
    };
    // The crate decides the data's order, and the digest goes in the header
    // before it: a first pass lays the data out, the second writes the file.
    let unsigned = serialize(
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), Checked(t.0, t.1)))
            .collect(),
        HashMap::from([("layers".to_string(), layers.clone())]),
    )?;
    let digest = sha256_hex(data_section(&unsigned).ok_or("safetensors: header too large")?);
    serialize(
        tensors,
        HashMap::from([
            ("layers".to_string(), layers),
            ("sha256".to_string(), digest),
        ]),
    )
}

/// The block in `bytes`, or `None` when anything about it is wrong.
pub(crate) fn decode(bytes: &[u8]) -> Option<BlockKv> {
    let data = data_section(bytes)?;
    // One parse of the header; the crate checks the offsets against the file.
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let meta = header.metadata().as_ref()?;
    if meta.get("sha256")? != &sha256_hex(data) {
        return None;
    }
    let layers: usize = meta.get("layers")?.parse().ok()?;
    // A key and a value per layer: the header bounds what the count may say.
    if layers.checked_mul(2)? != header.tensors().len() {
        return None;
    }
    let tensor = |name: String| -> Option<Tensor> {
        let info = header.info(&name)?;
        let (dtype, _) = DTYPES.iter().find(|(_, d)| *d == info.dtype)?;
        let t = Tensor {
            dtype: (*dtype).into(),
            shape: info.shape.clone(),
            data: data.get(info.data_offsets.0..info.data_offsets.1)?.to_vec(),
        };
        t.check(&name).ok()?;
        Some(t)
    };
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        out.push((tensor(format!("k.{l}"))?, tensor(format!("v.{l}"))?));
    }
    Some(BlockKv { layers: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block whose values say which block and layer they belong to.
    fn block(tag: u8, layers: usize) -> BlockKv {
        let t = |x: u8| Tensor {
            dtype: "F32".into(),
            shape: vec![3, BLOCK_TOKENS, 4],
            data: vec![x; 3 * BLOCK_TOKENS * 4 * 4],
        };
        BlockKv {
            layers: (0..layers)
                .map(|l| (t(tag + l as u8), t(tag + 100 + l as u8)))
                .collect(),
        }
    }

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(2654435761).wrapping_add(seed) % 49152)
            .collect()
    }

    #[test]
    fn a_layer_count_the_header_cannot_back_is_refused_without_allocating() {
        let kv = block(1, 2);
        assert_eq!(decode(&encode(&kv).unwrap()), Some(kv.clone()));
        // Sized a Vec::with_capacity before: a capacity overflow panic.
        for layers in [usize::MAX.to_string(), "3".into(), "1".into()] {
            let bytes = encode_counted(&kv, layers.clone()).unwrap();
            assert_eq!(decode(&bytes), None, "layers = {layers}");
        }
    }

    #[test]
    fn a_shape_whose_product_overflows_is_a_mismatch() {
        let t = Tensor {
            dtype: "F32".into(),
            shape: vec![usize::MAX, 2],
            data: vec![0; 8],
        };
        assert!(
            t.check("k.0")
                .unwrap_err()
                .contains("more than memory holds")
        );
    }

    #[test]
    fn hashes_chain_so_a_block_names_its_whole_prefix() {
        let a = tokens(48, 1);
        let mut b = a.clone();
        b[3] += 1; // differs in block 0 only
        let (ha, hb) = (block_hashes("m", &a), block_hashes("m", &b));
        assert_eq!(ha.len(), 3);
        assert!(
            ha.iter().zip(&hb).all(|(x, y)| x != y),
            "a change early changes every later block"
        );
        assert_eq!(block_hashes("m", &a[..40]).len(), 2, "only whole blocks");
        assert_ne!(
            block_hashes("other", &a)[0],
            ha[0],
            "the salt is in every hash"
        );
    }

    #[test]
    fn the_longest_cached_prefix_spans_block_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PrefixCache::open(dir.path(), "digest-v1").unwrap();
        let prompt = tokens(50, 7); // three whole blocks and two tokens
        for i in 0..3 {
            cache.put(&prompt, i, &block(i as u8 * 10, 2)).unwrap();
        }
        assert_eq!(cache.longest_prefix(&prompt).len(), 3);
        // A request sharing 40 tokens: two whole blocks match.
        let mut request = prompt[..40].to_vec();
        request.extend(tokens(30, 99));
        let found = cache.longest_prefix(&request);
        assert_eq!(found, vec![block(0, 2), block(10, 2)]);
        // Diverging inside block 1: only block 0.
        let mut request = prompt.clone();
        request[20] ^= 1;
        assert_eq!(cache.longest_prefix(&request).len(), 1);
        // Fewer than 16 tokens: nothing to match.
        assert!(cache.longest_prefix(&prompt[..15]).is_empty());
    }

    #[test]
    fn another_manifest_digest_never_hits() {
        let dir = tempfile::tempdir().unwrap();
        let prompt = tokens(32, 3);
        let v1 = PrefixCache::open(dir.path(), "digest-v1").unwrap();
        v1.put(&prompt, 0, &block(1, 1)).unwrap();
        v1.put(&prompt, 1, &block(2, 1)).unwrap();
        let v2 = PrefixCache::open(dir.path(), "digest-v2").unwrap();
        assert!(v2.longest_prefix(&prompt).is_empty());
        assert_eq!(v1.longest_prefix(&prompt).len(), 2);
    }

    #[test]
    fn corrupt_blocks_are_detected_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PrefixCache::open(dir.path(), "d").unwrap();
        let prompt = tokens(48, 5);
        for i in 0..3 {
            cache.put(&prompt, i, &block(i as u8, 2)).unwrap();
        }
        let hashes = block_hashes("d", &prompt);
        // Flip one byte of block 1's tensor data.
        let p1 = cache.path(&hashes[1]);
        let mut bytes = std::fs::read(&p1).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&p1, &bytes).unwrap();
        assert_eq!(
            cache.longest_prefix(&prompt),
            vec![block(0, 2)],
            "stops before the corrupt block"
        );
        assert!(!p1.exists(), "the corrupt block is removed");
        // A truncated block and garbage are misses too.
        let p0 = cache.path(&hashes[0]);
        let bytes = std::fs::read(&p0).unwrap();
        std::fs::write(&p0, &bytes[..bytes.len() / 2]).unwrap();
        assert!(cache.longest_prefix(&prompt).is_empty());
        std::fs::write(
            cache.path(&hashes[0]),
            b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage",
        )
        .unwrap();
        assert!(cache.longest_prefix(&prompt).is_empty());
    }

    #[test]
    fn blocks_are_standard_safetensors_and_bad_tensors_are_refused() {
        let bytes = encode(&block(9, 1)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["k.0"]["dtype"], "F32");
        assert_eq!(header["k.0"]["shape"], serde_json::json!([3, 16, 4]));
        let mut bad = block(1, 1);
        bad.layers[0].0.data.pop();
        assert!(encode(&bad).unwrap_err().contains("k.0 has"));
    }
}
