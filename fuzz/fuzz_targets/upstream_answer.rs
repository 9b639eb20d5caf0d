#![no_main]
//! See `modelcache::fuzzing::upstream_answer`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::upstream_answer(data);
});
