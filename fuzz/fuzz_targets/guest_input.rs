#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tvctl_fuzz::guest_input::run(data));
