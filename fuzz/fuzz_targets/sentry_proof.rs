#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| phantom_fuzz::sentry_proof(data));
