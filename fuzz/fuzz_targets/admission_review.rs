#![no_main]
//! See `modelcache::fuzzing::admission_review`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::admission_review(data);
});
