#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| phantom_fuzz::admin_frame(data));
