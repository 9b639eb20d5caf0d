//! `modelcache warm`: fill an inference engine's prefix cache before the pod
//! takes traffic.
//!
//! - [`engine`]: engine mode, a native sidecar that primes an OpenAI-compatible
//!   engine (vLLM, SGLang, llama.cpp's server) and turns ready only once the
//!   shared prefixes are warm, warming again after the engine restarts.
//! - [`prompts`]: the prefixes to warm.

pub mod engine;
pub mod prompts;
