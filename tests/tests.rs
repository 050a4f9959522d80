//! The one integration test binary: drives the real `ringmx` binary over loopback.
//! Modules: `common` (spawning the server), then one module per area.

mod common;
mod smtp;
mod transcripts;
mod fuzz_corpus;
mod prop;
mod hardening;
mod hardening_long;
