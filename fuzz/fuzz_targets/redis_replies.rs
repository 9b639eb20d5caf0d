#![no_main]
//! See `modelcache::fuzzing::redis_replies`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::redis_replies(data);
});
