#![no_main]
//! See `modelcache::fuzzing::prefix_block`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::prefix_block(data);
});
