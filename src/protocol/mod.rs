//! The SMTP protocol, sans-I/O: parser, DATA scanner, replies and the session state machine.
//! Never does I/O, reads clocks or spawns threads.
#![forbid(unsafe_code)]

pub mod data;
pub mod parse;
pub mod reply;
pub mod session;

pub use session::{CommitResult, Envelope, Feed, Message, Phase, Session, SessionConfig};
