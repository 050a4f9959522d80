//! The whole session over raw bytes; whole, chunked and bytewise runs agree.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmx_fuzz::session_raw_target(data));
