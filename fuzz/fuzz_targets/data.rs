//! The DATA scanner: whole, chunked and bytewise scans agree with the reference reader.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmx_fuzz::data_target(data));
