#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tvctl_fuzz::sanitize::run(data));
