#![no_main]
//! See `modelcache::fuzzing::prompts`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::prompts(data);
});
