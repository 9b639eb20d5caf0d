//! Facts about a model's files: GGUF metadata, exact KV-cache sizing, a
//! byte-level BPE tokenizer rebuilt from GGUF metadata, and a Llama-family
//! prefill on candle whose KV we own.

pub mod bert;
pub mod gelu;
pub mod gguf;
pub mod kv_size;
pub mod llama;
pub mod tokenizer;
