//! KV blocks written by the prefix cache are standard safetensors: the
//! reference implementation (PyPI `safetensors`, numpy backend) loads them
//! with the names, dtypes, shapes and values written.

mod support;

use modelcache::warm::prefix_cache::{BLOCK_TOKENS, BlockKv, PrefixCache, Tensor, block_hashes};
use support::run_python;

#[test]
fn blocks_load_in_the_reference_safetensors_reader() {
    let dir = tempfile::tempdir().unwrap();
    let cache = PrefixCache::open(dir.path(), "sha256-of-a-manifest").unwrap();
    let tokens: Vec<u32> = (0..BLOCK_TOKENS as u32).collect();
    // f32 keys counting up, f16 values of 1.0 (0x3c00), two layers.
    let keys: Vec<u8> = (0..2 * BLOCK_TOKENS * 4)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let values: Vec<u8> = std::iter::repeat_n([0x00u8, 0x3c], 2 * BLOCK_TOKENS * 4)
        .flatten()
        .collect();
    let k = Tensor {
        dtype: "F32".into(),
        shape: vec![2, BLOCK_TOKENS, 4],
        data: keys,
    };
    let v = Tensor {
        dtype: "F16".into(),
        shape: vec![2, BLOCK_TOKENS, 4],
        data: values,
    };
    let block = BlockKv {
        layers: vec![(k.clone(), v.clone()), (k, v)],
    };
    cache.put(&tokens, 0, &block).unwrap();
    let name = modelcache::digest::hex(&block_hashes("sha256-of-a-manifest", &tokens)[0]);
    let path = dir.path().join(format!("{name}.safetensors"));
    assert!(path.exists());

    let script = r#"
import json, sys
from safetensors.numpy import load_file
from safetensors import safe_open
t = load_file(sys.argv[1])
with safe_open(sys.argv[1], framework="numpy") as f:
    meta = f.metadata()
print(json.dumps({
    "names": sorted(t),
    "k0": [str(t["k.0"].dtype), list(t["k.0"].shape), float(t["k.0"].sum())],
    "v1": [str(t["v.1"].dtype), list(t["v.1"].shape), float(t["v.1"].sum())],
    "layers": meta["layers"],
}))
"#;
    let out = run_python(
        &["-".as_ref(), path.as_os_str()],
        script.as_bytes(),
        "the safetensors reader (safetensors, numpy)",
    );
    let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        got["names"],
        serde_json::json!(["k.0", "k.1", "v.0", "v.1"])
    );
    let n = 2 * BLOCK_TOKENS * 4;
    assert_eq!(
        got["k0"],
        serde_json::json!(["float32", [2, 16, 4], (n * (n - 1) / 2) as f64])
    );
    assert_eq!(
        got["v1"],
        serde_json::json!(["float16", [2, 16, 4], n as f64])
    );
    assert_eq!(got["layers"], "2");
}
