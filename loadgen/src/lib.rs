//! ringmx-loadgen: an SMTP load generator that measures how fast and how evenly a receiver takes
//! mail: TCP connect, banner, EHLO, each transaction and each whole session, as HdrHistograms.
//!
//! Layout, from the bytes up. `reply` parses server replies (sans-I/O, no allocation);
//! `session` is one scripted client session as a state machine (replies in, commands out);
//! `message` builds the message and address templates once; `schedule` decides when sessions
//! start (closed loop, or an open loop timed from the schedule so stalls are not hidden);
//! `uring` is the one module with `unsafe` code, owning each thread's io_uring and the buffers
//! the kernel uses; `engine` is a thread's event loop over many connections; `stats`, `errors`
//! and `report` collect, merge and present the figures; `baseline`, `plot` and `run` (the
//! orchestration: preflight, threads, live line, interval log) sit at the edge.
//!
//! It shares no code with the `ringmx` server: a parser bug must not cancel itself out.
#![deny(unsafe_code)]

pub mod baseline;
pub mod cli;
pub mod engine;
pub mod errors;
pub mod message;
pub mod plot;
pub mod proxy;
pub mod reply;
pub mod report;
pub mod run;
pub mod schedule;
pub mod session;
pub mod stats;
pub mod uring;
