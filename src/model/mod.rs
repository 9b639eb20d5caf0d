//! Facts about a model's files: GGUF metadata and exact KV-cache sizing.

pub mod gguf;
pub mod kv_size;
