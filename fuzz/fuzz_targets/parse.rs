//! The command parser over one raw line: no panic, borrowed fields, the reference's verb.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmx_fuzz::parse_target(data));
