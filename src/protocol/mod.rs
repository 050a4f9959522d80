//! The SMTP protocol, sans-I/O: parser, DATA scanner, replies and the session state machine.
//! Bytes go in, replies and message events come out. This module never does I/O, reads clocks
//! or spawns threads; timers and shutdown arrive as calls on [`Session`].
//!
//! - [`parse`]: one command line -> a borrowed `Command` or a small `Copy` error.
//! - [`data`]: the DATA scanner (end of data, dot-unstuffing, size, bare CR/LF policy).
//! - [`reply`]: reply codes and prebuilt lines.
//! - [`session`]: the state machine the worker drives.
//! - [`proxy`]: the PROXY protocol header a load balancer in front sends first
//!   (`--proxy-protocol`).
//!
//! Implemented:
//! - RFC 5321 (SMTP) sections 3 and 4: EHLO, HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, HELP;
//!   VRFY answers 252 (4.1.1.6, 7.3); reply codes, command sequencing (503), the 512-octet
//!   command line limit (500 5.5.6), dot-unstuffing, shutdown 421 (3.8).
//! - RFC 1870 SIZE (advertised; `SIZE=` over the limit 552 5.3.4, body over it after the end of
//!   data 552 5.3.4).
//! - RFC 1652 8BITMIME (`BODY=7BIT|8BITMIME`).
//! - RFC 2034 ENHANCEDSTATUSCODES with RFC 3463 codes on every 2xx/4xx/5xx reply.
//! - RFC 2920 PIPELINING: commands that arrive together are answered in order into one output.
//! - RFC 6531 SMTPUTF8: non-ASCII mailboxes only in a transaction whose MAIL carried SMTPUTF8
//!   (otherwise 553 5.6.7).
//!
//! Deliberately not implemented: STARTTLS (RFC 3207) and AUTH (RFC 4954): ringmx is an inbound MX
//! behind whatever terminates TLS; CHUNKING/BDAT (RFC 3030); DSN (RFC 3461: its MAIL/RCPT
//! parameters get 555); real VRFY/EXPN answers (VRFY 252, EXPN 502, as RFC 5321 7.3 allows).
//!
//! Policy on bare CR and bare LF inside DATA (SMTP smuggling, CVE-2023-51764): only
//! `<CRLF>.<CRLF>` ends the data; a message containing any bare CR or bare LF is read to that real
//! end and rejected whole with `550 5.6.11`, never stored, and the session goes on. See [`data`].
//! In *command* lines a bare LF is accepted as a line end (lenient where it cannot smuggle).
#![forbid(unsafe_code)]

pub mod data;
pub mod parse;
pub mod proxy;
pub mod reply;
pub mod session;

pub use session::{
    CommitResult, Envelope, Feed, Message, Phase, Session, SessionConfig, SessionStats,
};
