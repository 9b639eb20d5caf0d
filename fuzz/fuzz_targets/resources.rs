#![no_main]
//! See `modelcache::fuzzing::resources`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::resources(data);
});
