//! ringmx: an inbound SMTP receiver for Linux that takes mail at the rate of the hardware.
//!
//! # The architecture on one page
//!
//! One worker thread per core, pinned, each with its own io_uring and its own `SO_REUSEPORT`
//! listener, so the kernel spreads connections over the cores and no lock sits on the
//! per-message path. A worker's loop:
//!
//! ```text
//! multishot ACCEPT ─▶ connection slot ─▶ multishot RECV into a provided-buffer ring
//! bytes ─▶ Session::feed (sans-I/O) ─▶ replies, batched into one SEND per batch of input
//!                                   └▶ complete message ─▶ store plan (tmp write, fsync,
//!                                      rename into new/) performed through the ring
//! batch of messages renamed ─▶ one fsync of new/ ─▶ every session of the batch gets its 250
//! ```
//!
//! Nothing is acknowledged before it is durable: a `250` after the final `.` means the file was
//! fsync'd, renamed into `new/` and the directory fsync'd. The directory fsync is shared by every
//! message that ended in the same batch on that worker (group commit), so durability costs
//! little throughput.
//!
//! An idle connection holds no receive buffer (buffers are provided to the kernel and handed
//! back per read) and only a small `Session`. Every quantity has a limit resolved once in
//! [`config`]: line length, message size, recipients, errors, connections in total and per
//! client address, idle time.
//!
//! # Modules, each knowing only the ones below it
//!
//! - [`protocol`]: command parser (borrowed slices), DATA scanner (end of data, dot-unstuffing,
//!   the bare CR/LF policy), reply texts and the [`protocol::Session`] state machine: bytes in,
//!   replies and messages out. No I/O, no clocks; every protocol rule is tested there by
//!   feeding bytes in arbitrary chunks. Also the PROXY protocol header a load balancer sends
//!   first (`--proxy-protocol`).
//! - [`store`]: where an accepted message goes: [`store::maildir`] plans durable writes,
//!   [`store::discard`] counts and forgets (benchmarks). Never parses SMTP.
//! - [`ring`]: io_uring set-up, the start-up feature probe, the provided-buffer ring, ops and
//!   their completions with every errno mapped to a named outcome. The only home of `unsafe`.
//! - [`worker`]: one core's loop: listeners, the connection slab, timers, group commit; wires
//!   sessions to the ring and the store and never parses bytes itself.
//! - [`server`] and [`config`]: the command line and config file turned into a validated
//!   [`config::Config`], start-up checks, spawning and pinning workers, signals and shutdown.
//! - [`metrics`]: per-worker counters, merged and logged at exit.
//! - [`date`]: days since the epoch to a civil date, for log timestamps and message dates.
//!
//! The load generator, `ringmx-loadgen`, is its own crate in `loadgen/` and shares no code with
//! this one, so a parser bug cannot cancel itself out in a benchmark.

pub mod config;
pub mod date;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod ring;
pub mod server;
pub mod store;
pub mod worker;
