//! The one integration test binary: drives the real `ringmx` binary over loopback.
//! Modules: `common` (spawning the server), then one module per area.

mod common;
mod fuzz_corpus;
mod hardening;
mod hardening_long;
mod interop;
mod prop;
mod proxy;
mod smtp;
mod transcripts;
