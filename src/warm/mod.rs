//! `modelcache warm`: fill an inference engine's prefix cache before the pod
//! takes traffic.
//!
//! - [`engine`]: engine mode, a native sidecar that primes an OpenAI-compatible
//!   engine (vLLM, SGLang, llama.cpp's server) and turns ready only once the
//!   shared prefixes are warm, warming again after the engine restarts.
//! - [`in_process`]: in-process mode, a candle prefill per prefix whose KV is
//!   stored in the prefix cache on the pod's shared volume.
//! - [`prompts`]: the prefixes to warm.

pub mod engine;
pub mod in_process;
pub mod prefix_cache;
pub mod prompts;
