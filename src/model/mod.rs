//! Facts about a model's files: GGUF metadata, exact KV-cache sizing, a
//! byte-level BPE tokenizer rebuilt from GGUF metadata, and a Llama-family
//! prefill on candle whose KV we own.

pub mod bert;
pub mod gelu;
pub mod gguf;
pub mod kv_size;
pub mod llama;
pub mod tokenizer;

/// The CPU thread settings that candle reads from the environment, set to
/// what this project's models run best with where the user has not set them:
///
/// - `RAYON_NUM_THREADS`, the threads of a matmul, to the cores this process
///   may use. Unset, candle counts physical cores by reading `/proc/cpuinfo`
///   on every matmul (about 35 µs each here, over a millisecond per embedded
///   query).
/// - With `batches_side_by_side` (a program that embeds many sentences at
///   once), `CANDLE_NUM_THREADS`, the threads of an element-wise op, to 1:
///   its batches already run one per core, and candle's element-wise pool
///   spins while it waits for its helpers, taking the time of the other
///   batch (1,500 sentences: 160 → 197 sentences/s on 2 cores). Not
///   otherwise: candle's quantized matmuls run on that pool too (a Q4_1
///   prefill took 2.2× as long with it at 1).
///
/// # Safety
/// It writes the process's environment: call it before any other thread
/// starts (first thing in `main`).
#[allow(unsafe_code)] // std::env::set_var: candle has no other way to be told
pub unsafe fn set_thread_defaults(batches_side_by_side: bool) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the caller guarantees that no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cores.to_string()) };
    }
    if batches_side_by_side && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
