//! ringmx: a thread-per-core io_uring inbound SMTP receiver.
//!
//! (Overview to be written: see ../shared/DESIGN.md for the intended architecture.)

pub mod protocol;
pub mod store;
pub mod ring;
pub mod worker;
pub mod server;
pub mod config;
pub mod metrics;
