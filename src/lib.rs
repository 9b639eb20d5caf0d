//! modelcache: caches for ML serving on Kubernetes. The layers, from the
//! bottom: helpers; the API, a model's Redis and the key space on it; the
//! serving caches, model artifacts, models and the GPU probe; warm-up and
//! the node agent; and
//! the controller on top. Nothing below uses the controller, and no modules
//! use each other in a circle (`tests/layers.rs`).
//!
//! The `modelcache` binary is a thin command line over this library.

/// Versioned model artifacts: manifest, sources (S3, HTTP/CDN), fetch, the node cache, publish.
pub mod admin;

pub mod artifact;
/// The serving library: result, feature and semantic caches on a model's Redis.
pub mod cache;
/// `modelcache controller`: one Redis per ModelCache, rollouts, pod injection.
pub mod controller;
/// The `ModelCache` and `CachePolicy` API, its CRDs and offline validation.
pub mod crd;
/// SHA-256 through aws-lc-rs.
pub mod digest;
/// Error helpers shared by every layer.
pub mod error;
/// Entry points for the fuzz targets in `fuzz/` and their regression tests.
#[doc(hidden)]
pub mod fuzzing;
/// `modelcache gateway`: the OpenAI-compatible caching gateway.
pub mod gateway;
/// The GPU probe: the CUDA driver loaded at run time.
pub mod gpu;
/// The key schema, the version registry and the sweeper.
pub mod keyspace;
/// GGUF metadata, KV-cache sizing, tokenizers, a Llama and a BERT on candle.
pub mod model;
/// `modelcache node`: the node cache agent that serves verified blobs to the pods of its node.
pub mod node;
/// Exact bytes from Kubernetes quantities.
pub mod quantity;
/// SIGTERM and SIGINT, which end every long-running command.
pub mod signal;
/// A model's Redis: settings from the policy, live config, INFO health.
pub mod store;
/// Vector arithmetic shared by the embedding model and the semantic index.
pub mod vector;
/// `modelcache warm`: engine and in-process warm-up, the prefix (KV) cache.
pub mod warm;

/// One line naming this build and the API it serves.
pub fn version_line() -> String {
    format!(
        "modelcache {} (API {})",
        env!("CARGO_PKG_VERSION"),
        crd::API_VERSION
    )
}
