#![no_main]
//! See `modelcache::fuzzing::manifest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::manifest(data);
});
