#![no_main]
//! See `modelcache::fuzzing::gguf`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::gguf(data);
});
