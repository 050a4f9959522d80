//! The whole session, input mapped onto SMTP's alphabet; whole, chunked and bytewise runs agree.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmx_fuzz::session_target(data));
