#![no_main]
//! See `modelcache::fuzzing::scan_keys`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    modelcache::fuzzing::scan_keys(data);
});
