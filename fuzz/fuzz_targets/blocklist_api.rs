#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| phantom_fuzz::blocklist_api(data));
