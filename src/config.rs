//! Raw flags and the TOML file -> a validated `Config`; every limit is resolved here, once.
//!
//! CONTRACT (used by `main`/`server`/`worker`; the config author fills in the bodies):
//! `Cli::parse_from_env()` -> `Cli`; `Config::from_cli(cli)` -> `Result<Config, ConfigError>`,
//! where `ConfigError`'s Display is one line for people: what is wrong and what to do.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::SessionConfig;

/// Where accepted messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `maildir:DIR`: durable, group commit.
    Maildir(PathBuf),
    /// `discard`: accept and forget (benchmarks).
    Discard,
}

/// The validated configuration for `ringmx serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub workers: usize,
    pub store: StoreSpec,
    /// Hostname, limits and recipient policy for every session.
    pub session: Arc<SessionConfig>,
    pub idle_timeout: Duration,
    /// Across all workers.
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
    pub shutdown_grace: Duration,
    /// Group commit: a batch closes at this many messages ...
    pub batch_messages_max: usize,
    /// ... or this long after its first message, whichever comes first.
    pub batch_delay_us_max: u64,
    /// Longest command line, CRLF included (RFC 5321 4.5.3.1.4: 512).
    pub line_bytes_max: usize,
}
