//! Facts about a model's files: GGUF metadata, exact KV-cache sizing, and a
//! byte-level BPE tokenizer rebuilt from GGUF metadata.

pub mod gguf;
pub mod kv_size;
pub mod tokenizer;
