//! Raw flags and the TOML file -> a validated `Config`; every limit is resolved here, once.
//!
//! CONTRACT (used by `main`/`server`/`worker`):
//! `Cli::parse_from_env()` -> `Cli`; `Config::from_cli(cli)` -> `Result<Config, ConfigError>`,
//! where `ConfigError`'s Display is one line for people: what is wrong and what to do.
//!
//! Precedence, highest first: a flag on the command line, the same key in the `--config` file,
//! the built-in default. Keys in the file are the flag names without the leading dashes
//! (`max-message-size = 1000`, `listen = ["127.0.0.1:2525"]`); an unknown key is an error, so a
//! typo never silently leaves a limit at its default.
//!
//! Nothing here touches a socket or a file other than the config file: binding and creating the
//! store happen in `server`, after validation.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::protocol::SessionConfig;

/// Where accepted messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `maildir:DIR`: durable, group commit.
    Maildir(PathBuf),
    /// `discard`: accept and forget (benchmarks).
    Discard,
}

impl FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<StoreSpec, String> {
        if s == "discard" {
            return Ok(StoreSpec::Discard);
        }
        match s.strip_prefix("maildir:") {
            Some("") => Err("maildir: needs a directory, e.g. maildir:/var/spool/ringmx".into()),
            Some(dir) => Ok(StoreSpec::Maildir(PathBuf::from(dir))),
            None => Err(format!("unknown store {s:?}: use maildir:DIR or discard")),
        }
    }
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
    /// Longest any session may last, however active.
    pub session_time_max: Duration,
    /// Across all workers: --max-connections, or less when the limit on open files leaves
    /// room for fewer (set at start-up, see `server::run`).
    pub connections_max: usize,
    /// `connections_max` was lowered to fit the limit on open files.
    pub connections_max_by_fd_limit: bool,
    /// Per client network: IPv4 clients are counted by their first `per_ip_prefix_v4` bits,
    /// IPv6 clients by their first `per_ip_prefix_v6` bits (one host commonly holds a whole
    /// /64, so counting single IPv6 addresses would not limit it at all).
    pub connections_per_ip_max: usize,
    pub per_ip_prefix_v4: u8,
    pub per_ip_prefix_v6: u8,
    pub shutdown_grace: Duration,
    /// Group commit: a batch closes at this many messages ...
    pub batch_messages_max: usize,
    /// ... or this long after its first message, whichever comes first.
    pub batch_delay_us_max: u64,
    /// Group commit: one syncfs of the Maildir's file system per batch instead of one fsync
    /// per message file (see `--batch-syncfs`).
    pub batch_syncfs: bool,
    /// Every connection begins with a PROXY protocol header naming the client
    /// (`--proxy-protocol`).
    pub proxy_protocol: bool,
    /// Longest a busy worker holds its log lines before writing them (0: every loop turn).
    pub log_flush: Duration,
    /// Longest command line, CRLF included (RFC 5321 4.5.3.1.4: 512).
    pub line_bytes_max: usize,
    /// Most bytes one worker has in writes of bodies being received (`--store maildir`, bodies
    /// over 128 KiB); past it their next writes wait.
    pub spill_in_flight_max: usize,
    /// A tracing-subscriber filter (`info`, `debug`, `ringmx=trace`); `None`: use RUST_LOG,
    /// else `info`. See `Config::log_filter`.
    pub log_level: Option<String>,
}

impl Config {
    /// The log filter `main` should install: `--log-level` (or the file's `log-level`) wins,
    /// then the RUST_LOG environment variable, then `info`.
    pub fn log_filter(&self) -> String {
        log_filter(
            self.log_level.as_deref(),
            std::env::var("RUST_LOG").ok().as_deref(),
        )
    }
}

fn log_filter(configured: Option<&str>, env: Option<&str>) -> String {
    configured
        .or(env)
        .filter(|s| !s.trim().is_empty())
        .unwrap_or("info")
        .to_string()
}

/// Why the configuration cannot be used. Display is one line: what is wrong, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> ConfigError {
        ConfigError(msg.into())
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

const ABOUT: &str = "Thread-per-core io_uring inbound SMTP receiver with a durable Maildir store";

const LONG_ABOUT: &str = "\
ringmx receives mail over SMTP (RFC 5321) on every core at once: one pinned worker thread and one
io_uring per core, each with its own SO_REUSEPORT listener. A message is acknowledged with 250 only
once it is on disk (written to tmp/, fsync'd, renamed into new/, directory fsync'd).

Flags of `ringmx serve` (details: `ringmx serve --help`):
  --config FILE               TOML file with the same keys as the flags; flags win
  --listen ADDR               IP:PORT, repeatable; default 127.0.0.1:2525; IPv6 as [::1]:2525
  --workers N                 worker threads, one per core; default: number of CPUs
  --hostname NAME             greeting, EHLO reply, Received: header; default: system host name
  --store SPEC                maildir:DIR | discard; default maildir:./ringmx-data/maildir
  --accept-domain DOMAIN      repeatable; RCPT to any other domain gets 550 5.7.1
  --accept-any-recipient      accept every domain when a listen address is not loopback
  --max-message-size BYTES    default 26214400; advertised as SIZE; over it 552 5.3.4
  --max-recipients N          default 100; beyond it 452 4.5.3
  --idle-timeout SECS         default 300; then 421 4.4.2 and close
  --max-session-time SECS     default 3600; a longer session gets 421 4.4.2 and close
  --max-connections N         default 10000; over it 421 and close
  --max-connections-per-ip N  default 50; over it 421 and close
  --ipv4-client-prefix BITS   default 32; IPv4 clients are counted per /BITS network
  --ipv6-client-prefix BITS   default 64; IPv6 clients are counted per /BITS network
  --max-errors N              default 10; then 421 and close
  --shutdown-grace SECS       default 30; time for messages in progress at SIGTERM/SIGINT
  --batch-syncfs              one syncfs per commit batch instead of one fsync per message
                              (fewer disk writes; give the Maildir its own file system)
  --proxy-protocol            connections begin with a PROXY header (v1/v2) from a load
                              balancer, which names the client; only behind one
  --log-flush-ms MS           default 20; longest a busy worker holds log lines (0: every turn)
  --log-level FILTER          e.g. info, debug, ringmx=trace; default: RUST_LOG, else info";

const EXAMPLES: &str = "\
Examples:
  # Local testing: accept anything on 127.0.0.1:2525, store under ./ringmx-data/maildir
  ringmx serve

  # Production-style: port 25 on all addresses, only for two domains
  ringmx serve --listen 0.0.0.0:25 --listen [::]:25 --hostname mx.example.com \\
      --accept-domain example.com --accept-domain example.org --store maildir:/var/spool/ringmx

  # Settings from a file (keys are the flag names); flags on the command line win
  ringmx serve --config /etc/ringmx.toml --workers 4

Example /etc/ringmx.toml:
  listen = [\"0.0.0.0:25\"]
  hostname = \"mx.example.com\"
  store = \"maildir:/var/spool/ringmx\"
  accept-domain = [\"example.com\"]
  max-message-size = 52428800";

/// The command line.
#[derive(Debug, Clone, Parser)]
#[command(name = "ringmx", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments; prints help or an error and exits on bad usage.
    pub fn parse_from_env() -> Cli {
        Cli::parse()
    }
}

/// What to do.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the SMTP receiver until SIGTERM or SIGINT.
    #[command(after_help = EXAMPLES)]
    Serve(ServeArgs),
}

/// Flags of `ringmx serve`. Every value is optional here so that the config file can fill in
/// what the command line leaves out; defaults are applied in `Config::from_cli`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Read settings from this TOML file. Keys are the flag names without dashes, e.g.
    /// `max-message-size = 1000` or `listen = ["127.0.0.1:2525"]`. Flags given on the command
    /// line win over the file; an unknown key is an error.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on, IP:PORT. Repeat for several, e.g. --listen 0.0.0.0:25
    /// --listen [::]:25. Default: 127.0.0.1:2525.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,

    /// Worker threads, one io_uring each, pinned one per core. Default: the number of CPUs.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Our name in the 220 greeting, the EHLO reply and the Received: header.
    /// Default: the system host name.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,

    /// Where accepted mail goes: maildir:DIR (durable; creates DIR/tmp, DIR/new, DIR/cur) or
    /// discard (accept and drop, for benchmarks). Default: maildir:./ringmx-data/maildir.
    #[arg(long, value_name = "SPEC")]
    pub store: Option<StoreSpec>,

    /// Accept mail for this recipient domain; RCPT to any other domain gets 550 5.7.1.
    /// Repeatable. Without it every domain is accepted, which is allowed only when every
    /// --listen address is loopback (or with --accept-any-recipient).
    #[arg(long, value_name = "DOMAIN")]
    pub accept_domain: Vec<String>,

    /// Accept every recipient domain even on a non-loopback listen address (an open relay is
    /// not possible: ringmx only stores, never forwards).
    #[arg(long)]
    pub accept_any_recipient: bool,

    /// Largest message in bytes, advertised as SIZE in the EHLO reply; a bigger one gets
    /// 552 5.3.4. Default: 26214400 (25 MiB).
    #[arg(long, value_name = "BYTES")]
    pub max_message_size: Option<u64>,

    /// Recipients per message; beyond it 452 4.5.3. Default: 100.
    #[arg(long, value_name = "N")]
    pub max_recipients: Option<usize>,

    /// Seconds a client may stay silent before 421 4.4.2 and close. Default: 300.
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// Seconds any one session may last, however active: then 421 4.4.2 and close. Bounds how
    /// long a client trickling bytes or sending NOOPs can hold a connection. Default: 3600.
    #[arg(long, value_name = "SECS")]
    pub max_session_time: Option<u64>,

    /// Open connections across all workers; one more gets 421 and is closed. Lowered at start-up,
    /// with a warning, when the limit on open files (ulimit -Hn) has room for fewer. Default: 10000.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Open connections from one client IP address (for IPv6 by default one /64 network, see
    /// --ipv6-client-prefix); one more gets 421 and is closed. Default: 50.
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// --max-connections-per-ip counts IPv4 clients per network of this prefix length, e.g.
    /// 24 to count a /24 as one client. Default: 32 (each address).
    #[arg(long, value_name = "BITS")]
    pub ipv4_client_prefix: Option<u8>,

    /// --max-connections-per-ip counts IPv6 clients per network of this prefix length. A site
    /// gets at least a /64 and any host in it can use every address of it, so counting single
    /// addresses would not limit one client at all. Default: 64.
    #[arg(long, value_name = "BITS")]
    pub ipv6_client_prefix: Option<u8>,

    /// Client errors (4xx/5xx replies) per session before 421 and close. Default: 10.
    #[arg(long, value_name = "N")]
    pub max_errors: Option<u32>,

    /// On SIGTERM/SIGINT, seconds sessions in the middle of DATA get to finish before they are
    /// sent 421. Default: 30.
    #[arg(long, value_name = "SECS")]
    pub shutdown_grace: Option<u64>,

    /// Log filter, e.g. info, debug, ringmx=trace. Default: the RUST_LOG variable, else info.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Group commit: most messages per batch of fsyncs (benchmark tuning). Default: 64.
    #[arg(long, value_name = "N", hide = true)]
    pub batch_messages_max: Option<usize>,

    /// Group commit: most microseconds a batch waits for more messages. Default: 2000.
    #[arg(long, value_name = "US", hide = true)]
    pub batch_delay_us_max: Option<u64>,

    /// Longest command line in bytes, CRLF included (at least 512). Default: 512.
    #[arg(long, value_name = "BYTES", hide = true)]
    pub line_bytes_max: Option<usize>,

    /// Most bytes one worker keeps in writes of large bodies while they arrive; past it their
    /// next writes wait, and so does their input. Default: 33554432 (32 MiB).
    #[arg(long, value_name = "BYTES", hide = true)]
    pub spill_in_flight_max: Option<usize>,

    /// Group commit for --store maildir: make a batch durable with one syncfs of the Maildir's
    /// file system instead of one fsync per message file. Far fewer disk writes per message,
    /// but syncfs writes back every dirty file of that file system, so give the Maildir a file
    /// system of its own. Default: off.
    #[arg(long)]
    pub batch_syncfs: bool,

    /// Every connection begins with a PROXY protocol header (HAProxy's, version 1 or 2) from a
    /// load balancer in front of ringmx: the client it names is the one greeted, logged, written
    /// into Received: and counted against --max-connections-per-ip. A connection without a
    /// valid header within 5 s is closed without a reply. Only for listen addresses that nothing
    /// but the load balancer can reach: whoever connects can claim any address. Needs
    /// --accept-domain or --accept-any-recipient, even on a loopback address. Default: off.
    #[arg(long)]
    pub proxy_protocol: bool,

    /// Longest a busy worker holds its log lines before writing them, in milliseconds; 0 writes
    /// them at the end of every loop turn. Default: 20.
    #[arg(long, value_name = "MS")]
    pub log_flush_ms: Option<u64>,
}

/// The `--config` file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<Vec<String>>,
    workers: Option<usize>,
    hostname: Option<String>,
    store: Option<String>,
    accept_domain: Option<Vec<String>>,
    accept_any_recipient: Option<bool>,
    max_message_size: Option<u64>,
    max_recipients: Option<usize>,
    idle_timeout: Option<u64>,
    max_session_time: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    ipv4_client_prefix: Option<u8>,
    ipv6_client_prefix: Option<u8>,
    max_errors: Option<u32>,
    shutdown_grace: Option<u64>,
    log_level: Option<String>,
    batch_messages_max: Option<usize>,
    batch_delay_us_max: Option<u64>,
    line_bytes_max: Option<usize>,
    spill_in_flight_max: Option<usize>,
    batch_syncfs: Option<bool>,
    proxy_protocol: Option<bool>,
    log_flush_ms: Option<u64>,
}

impl FileConfig {
    fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(format!(
                "cannot read config file {}: {e}; check the --config path",
                path.display()
            ))
        })?;
        FileConfig::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's Display draws the offending line over several lines; people get one
            // line with the position instead.
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            let mut msg = e.message().replace('\n', " ");
            // serde lists every accepted field after an unknown one; name the key and the
            // closest known one instead.
            if let Some(key) = msg
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                msg = match closest_key(key) {
                    Some(k) => format!("unknown key `{key}` (did you mean `{k}`?)"),
                    None => format!(
                        "unknown key `{key}`: keys are the flag names of `ringmx serve --help` \
                         without the dashes"
                    ),
                };
            }
            match line {
                Some(n) => {
                    ConfigError::new(format!("config file {} line {n}: {msg}", path.display()))
                }
                None => ConfigError::new(format!("config file {}: {msg}", path.display())),
            }
        })
    }
}

/// Every key the config file accepts, for suggestions.
const FILE_KEYS: [&str; 24] = [
    "listen",
    "workers",
    "hostname",
    "store",
    "accept-domain",
    "accept-any-recipient",
    "max-message-size",
    "max-recipients",
    "idle-timeout",
    "max-session-time",
    "max-connections",
    "max-connections-per-ip",
    "ipv4-client-prefix",
    "ipv6-client-prefix",
    "max-errors",
    "shutdown-grace",
    "log-level",
    "batch-messages-max",
    "batch-delay-us-max",
    "line-bytes-max",
    "spill-in-flight-max",
    "batch-syncfs",
    "proxy-protocol",
    "log-flush-ms",
];

/// The known key nearest to a mistyped one (edit distance at most 3), if any.
fn closest_key(key: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    // Snake case is the usual slip; bound the work on absurd input.
    let key: String = key.chars().take(64).collect::<String>().replace('_', "-");
    FILE_KEYS
        .iter()
        .map(|k| (distance(&key, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2525";
pub const DEFAULT_STORE_DIR: &str = "./ringmx-data/maildir";
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 26_214_400;
pub const DEFAULT_MAX_RECIPIENTS: usize = 100;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_MAX_SESSION_TIME_SECS: u64 = 3600;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 50;
pub const DEFAULT_IPV4_CLIENT_PREFIX: u8 = 32;
pub const DEFAULT_IPV6_CLIENT_PREFIX: u8 = 64;
pub const DEFAULT_SPILL_IN_FLIGHT_MAX: usize = 32 * 1024 * 1024;
pub const DEFAULT_MAX_ERRORS: u32 = 10;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// See `logging`: a busy worker writes its log lines at most this often.
pub const DEFAULT_LOG_FLUSH_MS: u64 = 20;
pub const DEFAULT_BATCH_MESSAGES_MAX: usize = 64;
pub const DEFAULT_BATCH_DELAY_US_MAX: u64 = 2_000;
pub const DEFAULT_LINE_BYTES_MAX: usize = 512;

/// Checks `value` against an inclusive range; the error names the flag and the range.
fn in_range<T>(flag: &str, value: T, min: T, max: T, hint: &str) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(ConfigError::new(format!(
            "--{flag} {value} is out of range: use a value from {min} to {max}{hint}"
        )));
    }
    Ok(value)
}

/// A host name fit for the greeting and the Received: header: LDH labels separated by dots
/// (underscores tolerated, as some internal names have them), at most 253 characters.
fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A recipient domain as given to --accept-domain, lower-cased, without a trailing dot.
fn normalize_domain(raw: &str) -> Result<String, ConfigError> {
    let d = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    if !valid_hostname(&d) {
        return Err(ConfigError::new(format!(
            "--accept-domain {raw:?} is not a domain name: give just the domain, e.g. \
             --accept-domain example.com"
        )));
    }
    Ok(d)
}

fn system_hostname() -> Result<String, ConfigError> {
    let name = nix::unistd::gethostname().map_err(|e| {
        ConfigError::new(format!(
            "cannot read the system host name ({e}): pass --hostname NAME"
        ))
    })?;
    name.into_string()
        .map_err(|_| ConfigError::new("the system host name is not UTF-8: pass --hostname NAME"))
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl Config {
    /// Merges the command line, the config file and the defaults, then checks every value.
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let Command::Serve(args) = cli.command;
        Config::from_serve_args(args)
    }

    /// As `from_cli`, for callers (and tests) that already hold the `serve` flags.
    pub fn from_serve_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Config::merge(args, file)
    }

    fn merge(args: ServeArgs, file: FileConfig) -> Result<Config, ConfigError> {
        let listen = if !args.listen.is_empty() {
            args.listen
        } else if let Some(list) = file.listen {
            list.iter()
                .map(|s| {
                    s.parse::<SocketAddr>().map_err(|_| {
                        ConfigError::new(format!(
                            "listen address {s:?} in the config file is not IP:PORT: write e.g. \
                             \"127.0.0.1:2525\" or \"[::1]:2525\""
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![DEFAULT_LISTEN
                .parse()
                .expect("default listen address parses")]
        };
        if listen.is_empty() {
            return Err(ConfigError::new(
                "no listen address: give at least one --listen IP:PORT",
            ));
        }
        if let Some(a) = listen.iter().find(|a| a.port() == 0) {
            return Err(ConfigError::new(format!(
                "--listen {a} has port 0: give the port to listen on, e.g. --listen {}:2525",
                match a {
                    SocketAddr::V4(v) => v.ip().to_string(),
                    SocketAddr::V6(v) => format!("[{}]", v.ip()),
                }
            )));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = listen.iter().find(|a| !seen.insert(**a)) {
            return Err(ConfigError::new(format!(
                "--listen {dup} is given twice: give each address once"
            )));
        }

        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let workers = in_range(
            "workers",
            args.workers.or(file.workers).unwrap_or(cpus),
            1,
            1024,
            "",
        )?;

        let hostname = match args.hostname.or(file.hostname) {
            Some(h) => h,
            None => system_hostname()?,
        };
        if !valid_hostname(&hostname) {
            return Err(ConfigError::new(format!(
                "host name {hostname:?} is not a valid domain name (letters, digits, '-' and '.'): \
                 pass --hostname NAME, e.g. --hostname mx.example.com"
            )));
        }

        let store = match args.store {
            Some(s) => s,
            None => match file.store {
                Some(s) => s
                    .parse::<StoreSpec>()
                    .map_err(|e| ConfigError::new(format!("--store in the config file: {e}")))?,
                None => StoreSpec::Maildir(PathBuf::from(DEFAULT_STORE_DIR)),
            },
        };

        let proxy_protocol = args.proxy_protocol || file.proxy_protocol.unwrap_or(false);
        // The recipient policy is one setting spread over two keys, so "flags win" applies to
        // the pair: a policy given on the command line replaces the file's whole policy.
        let (raw_domains, accept_any) =
            if !args.accept_domain.is_empty() || args.accept_any_recipient {
                (args.accept_domain, args.accept_any_recipient)
            } else {
                (
                    file.accept_domain.unwrap_or_default(),
                    file.accept_any_recipient.unwrap_or(false),
                )
            };
        let mut domains = Vec::with_capacity(raw_domains.len());
        for d in &raw_domains {
            let d = normalize_domain(d)?;
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        let accept_domains = if !domains.is_empty() {
            if accept_any {
                return Err(ConfigError::new(
                    "--accept-domain and --accept-any-recipient contradict each other: give the \
                     domains to accept, or --accept-any-recipient to accept all, not both",
                ));
            }
            Some(domains)
        } else if accept_any {
            None
        } else if proxy_protocol {
            // Behind a load balancer even a loopback address takes mail from anywhere.
            return Err(ConfigError::new(
                "--proxy-protocol passes on clients from anywhere the load balancer takes them \
                 from, and no --accept-domain is given: name the domains you receive mail for \
                 with --accept-domain DOMAIN, or pass --accept-any-recipient to accept every \
                 domain",
            ));
        } else if let Some(open) = listen.iter().find(|a| !is_loopback(a)) {
            return Err(ConfigError::new(format!(
                "listen address {open} is not loopback and no --accept-domain is given: name the \
                 domains you receive mail for with --accept-domain DOMAIN, or pass \
                 --accept-any-recipient to accept every domain"
            )));
        } else {
            None
        };

        let max_message_size = in_range(
            "max-message-size",
            args.max_message_size
                .or(file.max_message_size)
                .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE),
            1,
            1 << 30,
            " (a message is held in memory until it is stored)",
        )?;
        let max_recipients = in_range(
            "max-recipients",
            args.max_recipients
                .or(file.max_recipients)
                .unwrap_or(DEFAULT_MAX_RECIPIENTS),
            1,
            100_000,
            "",
        )?;
        let idle_timeout = in_range(
            "idle-timeout",
            args.idle_timeout
                .or(file.idle_timeout)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
            1,
            86_400,
            " seconds",
        )?;
        let session_time_max = in_range(
            "max-session-time",
            args.max_session_time
                .or(file.max_session_time)
                .unwrap_or(DEFAULT_MAX_SESSION_TIME_SECS),
            1,
            7 * 86_400,
            " seconds",
        )?;
        let connections_max = in_range(
            "max-connections",
            args.max_connections
                .or(file.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            1,
            1_000_000,
            "",
        )?;
        // A per-IP limit above the total limit can never be reached; it is not worth an error
        // (lowering --max-connections alone should just work), so it is capped instead.
        let connections_per_ip_max = in_range(
            "max-connections-per-ip",
            args.max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
            1,
            1_000_000,
            "",
        )?
        .min(connections_max);
        let per_ip_prefix_v4 = in_range(
            "ipv4-client-prefix",
            args.ipv4_client_prefix
                .or(file.ipv4_client_prefix)
                .unwrap_or(DEFAULT_IPV4_CLIENT_PREFIX),
            8,
            32,
            " (prefix length in bits)",
        )?;
        let per_ip_prefix_v6 = in_range(
            "ipv6-client-prefix",
            args.ipv6_client_prefix
                .or(file.ipv6_client_prefix)
                .unwrap_or(DEFAULT_IPV6_CLIENT_PREFIX),
            32,
            128,
            " (prefix length in bits)",
        )?;
        let max_errors = in_range(
            "max-errors",
            args.max_errors
                .or(file.max_errors)
                .unwrap_or(DEFAULT_MAX_ERRORS),
            1,
            10_000,
            "",
        )?;
        let shutdown_grace = in_range(
            "shutdown-grace",
            args.shutdown_grace
                .or(file.shutdown_grace)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
            0,
            3_600,
            " seconds",
        )?;
        let log_flush_ms = in_range(
            "log-flush-ms",
            args.log_flush_ms
                .or(file.log_flush_ms)
                .unwrap_or(DEFAULT_LOG_FLUSH_MS),
            0,
            10_000,
            " ms",
        )?;
        let batch_messages_max = in_range(
            "batch-messages-max",
            args.batch_messages_max
                .or(file.batch_messages_max)
                .unwrap_or(DEFAULT_BATCH_MESSAGES_MAX),
            1,
            4_096,
            "",
        )?;
        let batch_delay_us_max = in_range(
            "batch-delay-us-max",
            args.batch_delay_us_max
                .or(file.batch_delay_us_max)
                .unwrap_or(DEFAULT_BATCH_DELAY_US_MAX),
            0,
            1_000_000,
            " microseconds",
        )?;
        let line_bytes_max = in_range(
            "line-bytes-max",
            args.line_bytes_max
                .or(file.line_bytes_max)
                .unwrap_or(DEFAULT_LINE_BYTES_MAX),
            512,
            65_536,
            " (RFC 5321 requires at least 512)",
        )?;
        let spill_in_flight_max = in_range(
            "spill-in-flight-max",
            args.spill_in_flight_max
                .or(file.spill_in_flight_max)
                .unwrap_or(DEFAULT_SPILL_IN_FLIGHT_MAX),
            64 * 1024,
            1 << 32,
            " bytes",
        )?;
        let log_level = args.log_level.or(file.log_level);
        if let Some(l) = &log_level {
            if tracing_subscriber::EnvFilter::try_new(l).is_err() {
                return Err(ConfigError::new(format!(
                    "--log-level {l:?} is not a log filter: use e.g. info, debug or ringmx=trace"
                )));
            }
        }

        Ok(Config {
            listen,
            workers,
            store,
            session: Arc::new(SessionConfig {
                hostname,
                max_message_size,
                max_recipients,
                max_errors,
                accept_domains,
            }),
            idle_timeout: Duration::from_secs(idle_timeout),
            session_time_max: Duration::from_secs(session_time_max),
            connections_max,
            connections_max_by_fd_limit: false,
            connections_per_ip_max,
            per_ip_prefix_v4,
            per_ip_prefix_v6,
            shutdown_grace: Duration::from_secs(shutdown_grace),
            batch_messages_max,
            batch_delay_us_max,
            batch_syncfs: args.batch_syncfs || file.batch_syncfs.unwrap_or(false),
            proxy_protocol,
            log_flush: Duration::from_millis(log_flush_ms),
            line_bytes_max,
            spill_in_flight_max,
            log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["ringmx", "serve"];
        argv.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(argv).expect("flags parse"))
    }

    fn err(args: &[&str]) -> String {
        let e = parse(args)
            .expect_err("config should be refused")
            .to_string();
        assert!(!e.contains('\n'), "error must be one line: {e}");
        e
    }

    fn with_file(text: &str, args: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringmx.toml");
        std::fs::write(&path, text).unwrap();
        let mut all = vec!["--config", path.to_str().unwrap()];
        all.extend_from_slice(args);
        parse(&all)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = parse(&["--hostname", "mx.example.com"]).unwrap();
        assert_eq!(
            c.listen,
            vec!["127.0.0.1:2525".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            c.workers,
            std::thread::available_parallelism().unwrap().get()
        );
        assert_eq!(
            c.store,
            StoreSpec::Maildir(PathBuf::from("./ringmx-data/maildir"))
        );
        assert_eq!(c.session.hostname, "mx.example.com");
        assert_eq!(c.session.max_message_size, 26_214_400);
        assert_eq!(c.session.max_recipients, 100);
        assert_eq!(c.session.max_errors, 10);
        assert_eq!(c.session.accept_domains, None);
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.session_time_max, Duration::from_secs(3600));
        assert_eq!(c.connections_max, 10_000);
        assert_eq!(c.connections_per_ip_max, 50);
        assert_eq!((c.per_ip_prefix_v4, c.per_ip_prefix_v6), (32, 64));
        assert_eq!(c.spill_in_flight_max, 32 << 20);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.log_flush, Duration::from_millis(20));
        assert_eq!(
            (c.batch_messages_max, c.batch_delay_us_max, c.line_bytes_max),
            (64, 2_000, 512)
        );
        assert_eq!(c.log_level, None);
    }

    #[test]
    fn default_hostname_is_the_system_one() {
        let sys = nix::unistd::gethostname().unwrap().into_string().unwrap();
        match parse(&[]) {
            Ok(c) => assert_eq!(c.session.hostname, sys),
            // A host whose name is not a domain name must be told to pass --hostname.
            Err(e) => assert!(
                !valid_hostname(&sys) && e.to_string().contains("--hostname"),
                "{e}"
            ),
        }
    }

    #[test]
    fn every_flag_is_read() {
        let c = parse(&[
            "--listen",
            "127.0.0.1:25",
            "--listen",
            "[::1]:2525",
            "--workers",
            "3",
            "--hostname",
            "mx.a.example",
            "--store",
            "discard",
            "--accept-domain",
            "Example.COM.",
            "--accept-domain",
            "b.example",
            "--max-message-size",
            "1000",
            "--max-recipients",
            "7",
            "--idle-timeout",
            "9",
            "--max-connections",
            "20",
            "--max-connections-per-ip",
            "4",
            "--ipv4-client-prefix",
            "24",
            "--ipv6-client-prefix",
            "56",
            "--max-errors",
            "3",
            "--shutdown-grace",
            "0",
            "--log-level",
            "debug",
            "--batch-messages-max",
            "8",
            "--batch-delay-us-max",
            "0",
            "--line-bytes-max",
            "1024",
        ])
        .unwrap();
        assert_eq!(
            c.listen,
            vec![
                "127.0.0.1:25".parse().unwrap(),
                "[::1]:2525".parse::<SocketAddr>().unwrap()
            ]
        );
        assert_eq!(c.workers, 3);
        assert_eq!(c.store, StoreSpec::Discard);
        assert_eq!((c.per_ip_prefix_v4, c.per_ip_prefix_v6), (24, 56));
        assert_eq!(c.session.hostname, "mx.a.example");
        assert_eq!(
            c.session.accept_domains,
            Some(vec!["example.com".to_string(), "b.example".to_string()])
        );
        assert_eq!(c.session.max_message_size, 1000);
        assert_eq!(c.session.max_recipients, 7);
        assert_eq!(c.idle_timeout, Duration::from_secs(9));
        assert_eq!((c.connections_max, c.connections_per_ip_max), (20, 4));
        assert_eq!(c.session.max_errors, 3);
        assert_eq!(c.shutdown_grace, Duration::ZERO);
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert_eq!(
            (c.batch_messages_max, c.batch_delay_us_max, c.line_bytes_max),
            (8, 0, 1024)
        );
    }

    #[test]
    fn store_spec_parses_maildir_and_discard_only() {
        assert_eq!(
            "maildir:/x/y".parse::<StoreSpec>(),
            Ok(StoreSpec::Maildir("/x/y".into()))
        );
        assert_eq!("discard".parse::<StoreSpec>(), Ok(StoreSpec::Discard));
        assert!("maildir:".parse::<StoreSpec>().is_err());
        assert!("mbox:/x"
            .parse::<StoreSpec>()
            .unwrap_err()
            .contains("maildir:DIR or discard"));
        let e = Cli::try_parse_from(["ringmx", "serve", "--store", "/var/mail"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("maildir:DIR or discard"), "{e}");
    }

    #[test]
    fn proxy_protocol_needs_a_recipient_policy_even_on_loopback() {
        let e = err(&["--hostname", "mx", "--proxy-protocol"]);
        assert!(
            e.contains("--proxy-protocol")
                && e.contains("--accept-domain")
                && e.contains("--accept-any-recipient"),
            "{e}"
        );
        for policy in [
            &["--accept-domain", "example.com"][..],
            &["--accept-any-recipient"],
        ] {
            let mut args = vec!["--hostname", "mx", "--proxy-protocol"];
            args.extend_from_slice(policy);
            assert!(parse(&args).unwrap().proxy_protocol, "{args:?}");
        }
    }

    #[test]
    fn open_listen_address_needs_a_recipient_policy() {
        let e = err(&["--hostname", "mx", "--listen", "0.0.0.0:25"]);
        assert!(
            e.contains("--accept-domain") && e.contains("--accept-any-recipient"),
            "{e}"
        );
        assert!(e.contains("0.0.0.0:25"), "{e}");
        // One open address among loopback ones is enough to require it.
        let e = err(&[
            "--hostname",
            "mx",
            "--listen",
            "127.0.0.1:25",
            "--listen",
            "[2001:db8::1]:25",
        ]);
        assert!(
            e.contains("--accept-domain") && e.contains("--accept-any-recipient"),
            "{e}"
        );

        let c = parse(&[
            "--hostname",
            "mx",
            "--listen",
            "0.0.0.0:25",
            "--accept-any-recipient",
        ])
        .unwrap();
        assert_eq!(c.session.accept_domains, None);
        let c = parse(&[
            "--hostname",
            "mx",
            "--listen",
            "0.0.0.0:25",
            "--accept-domain",
            "a.example",
        ])
        .unwrap();
        assert_eq!(
            c.session.accept_domains,
            Some(vec!["a.example".to_string()])
        );
        // All loopback (v4, v6, v4-mapped v6): every recipient accepted without flags.
        for l in [
            "127.0.0.1:25",
            "127.8.9.10:25",
            "[::1]:25",
            "[::ffff:127.0.0.1]:25",
        ] {
            assert_eq!(
                parse(&["--hostname", "mx", "--listen", l])
                    .unwrap()
                    .session
                    .accept_domains,
                None,
                "{l}"
            );
        }
        let e = err(&[
            "--hostname",
            "mx",
            "--accept-domain",
            "a.example",
            "--accept-any-recipient",
        ]);
        assert!(e.contains("contradict"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_flag() {
        for (flag, bad) in [
            ("--workers", "0"),
            ("--workers", "100000"),
            ("--max-message-size", "0"),
            ("--max-message-size", "99999999999"),
            ("--max-recipients", "0"),
            ("--idle-timeout", "0"),
            ("--idle-timeout", "1000000"),
            ("--max-session-time", "0"),
            ("--max-connections", "0"),
            ("--max-connections-per-ip", "0"),
            ("--ipv4-client-prefix", "7"),
            ("--ipv4-client-prefix", "33"),
            ("--ipv6-client-prefix", "31"),
            ("--ipv6-client-prefix", "129"),
            ("--max-errors", "0"),
            ("--shutdown-grace", "86400"),
            ("--log-flush-ms", "10001"),
            ("--batch-messages-max", "0"),
            ("--batch-delay-us-max", "5000000"),
            ("--line-bytes-max", "100"),
            ("--spill-in-flight-max", "65535"),
        ] {
            let e = err(&["--hostname", "mx", flag, bad]);
            assert!(
                e.starts_with(&format!("{flag} {bad} is out of range: use a value from ")),
                "{flag}: {e}"
            );
        }
        // Negative and non-numeric values are refused by the flag parser itself.
        assert!(Cli::try_parse_from(["ringmx", "serve", "--workers", "-1"]).is_err());
        assert!(Cli::try_parse_from(["ringmx", "serve", "--idle-timeout", "5m"]).is_err());
    }

    #[test]
    fn per_ip_limit_is_capped_by_the_total() {
        let c = parse(&["--hostname", "mx", "--max-connections", "10"]).unwrap();
        assert_eq!(c.connections_per_ip_max, 10);
    }

    #[test]
    fn bad_names_and_addresses_are_refused() {
        let e = err(&["--hostname", "bad host\r\nX: y"]);
        assert!(e.contains("--hostname"), "{e}");
        let e = err(&["--hostname", ""]);
        assert!(e.contains("--hostname"), "{e}");
        let e = err(&["--hostname", "mx", "--accept-domain", "user@example.com"]);
        assert!(
            e.contains("--accept-domain") && e.contains("example.com"),
            "{e}"
        );
        let e = err(&["--hostname", "mx", "--listen", "127.0.0.1:0"]);
        assert!(e.contains("port 0"), "{e}");
        let e = err(&[
            "--hostname",
            "mx",
            "--listen",
            "127.0.0.1:25",
            "--listen",
            "127.0.0.1:25",
        ]);
        assert!(e.contains("twice"), "{e}");
        let e = err(&["--hostname", "mx", "--log-level", "ringmx=nonsense=2"]);
        assert!(e.contains("--log-level"), "{e}");
        assert!(Cli::try_parse_from(["ringmx", "serve", "--listen", "localhost"]).is_err());
    }

    #[test]
    fn file_sets_keys_and_flags_win() {
        let file = r#"
            listen = ["127.0.0.1:2600", "[::1]:2600"]
            workers = 3
            hostname = "file.example"
            store = "discard"
            max-message-size = 1000
            max-recipients = 5
            idle-timeout = 7
            max-session-time = 60
            max-connections = 99
            max-connections-per-ip = 9
            ipv4-client-prefix = 16
            ipv6-client-prefix = 48
            max-errors = 4
            shutdown-grace = 2
            accept-domain = ["a.example"]
            log-level = "warn"
            batch-messages-max = 16
            batch-delay-us-max = 100
            line-bytes-max = 1000
            spill-in-flight-max = 1048576
        "#;
        let c = with_file(file, &[]).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.workers, 3);
        assert_eq!(c.session.hostname, "file.example");
        assert_eq!(c.store, StoreSpec::Discard);
        assert_eq!(c.session.max_message_size, 1000);
        assert_eq!(c.session.max_recipients, 5);
        assert_eq!(c.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.session_time_max, Duration::from_secs(60));
        assert_eq!((c.connections_max, c.connections_per_ip_max), (99, 9));
        assert_eq!((c.per_ip_prefix_v4, c.per_ip_prefix_v6), (16, 48));
        assert_eq!(c.session.max_errors, 4);
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(
            c.session.accept_domains,
            Some(vec!["a.example".to_string()])
        );
        assert_eq!(c.log_level.as_deref(), Some("warn"));
        assert_eq!(
            (c.batch_messages_max, c.batch_delay_us_max, c.line_bytes_max),
            (16, 100, 1000)
        );
        assert_eq!(c.spill_in_flight_max, 1 << 20);

        let c = with_file(
            file,
            &[
                "--workers",
                "5",
                "--listen",
                "127.0.0.1:2700",
                "--accept-domain",
                "b.example",
                "--store",
                "maildir:/m",
            ],
        )
        .unwrap();
        assert_eq!(c.workers, 5);
        assert_eq!(
            c.listen,
            vec!["127.0.0.1:2700".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            c.session.accept_domains,
            Some(vec!["b.example".to_string()])
        );
        assert_eq!(c.store, StoreSpec::Maildir("/m".into()));
        assert_eq!(
            c.session.max_message_size, 1000,
            "keys without a flag still come from the file"
        );
    }

    #[test]
    fn file_values_are_validated_like_flags() {
        let e = with_file("max-errors = 0\nhostname = \"mx\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-errors 0 is out of range"), "{e}");
        let e = with_file("listen = [\"nowhere\"]\nhostname = \"mx\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nowhere\"") && e.contains("IP:PORT"), "{e}");
        let e = with_file("store = \"mbox\"\nhostname = \"mx\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("maildir:DIR or discard"), "{e}");
        let e = with_file("listen = [\"0.0.0.0:25\"]\nhostname = \"mx\"", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--accept-domain") && e.contains("--accept-any-recipient"),
            "{e}"
        );
        let c = with_file(
            "listen = [\"0.0.0.0:25\"]\naccept-any-recipient = true",
            &["--hostname", "mx"],
        )
        .unwrap();
        assert_eq!(c.session.accept_domains, None);
        // The policy on the command line replaces the file's, in either direction.
        let c = with_file(
            "listen = [\"0.0.0.0:25\"]\naccept-any-recipient = true",
            &["--hostname", "mx", "--accept-domain", "a.example"],
        )
        .unwrap();
        assert_eq!(
            c.session.accept_domains,
            Some(vec!["a.example".to_string()])
        );
        let c = with_file(
            "listen = [\"0.0.0.0:25\"]\naccept-domain = [\"a.example\"]",
            &["--hostname", "mx", "--accept-any-recipient"],
        )
        .unwrap();
        assert_eq!(c.session.accept_domains, None);
        // Both in the file is as contradictory as both on the command line.
        let e = with_file(
            "accept-domain = [\"a.example\"]\naccept-any-recipient = true",
            &["--hostname", "mx"],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("contradict"), "{e}");
    }

    #[test]
    fn unknown_or_mistyped_file_keys_are_errors_naming_the_key_and_line() {
        let e = with_file("hostname = \"mx\"\nmax-mesage-size = 10\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max-mesage-size") && e.contains("line 2"), "{e}");
        assert!(e.contains("did you mean `max-message-size`?"), "{e}");
        let e = with_file("max_errors = 3", &[]).unwrap_err().to_string();
        assert!(
            e.contains("`max_errors` (did you mean `max-errors`?)"),
            "{e}"
        );
        let e = with_file("frobnicate = 1", &[]).unwrap_err().to_string();
        assert!(
            e.contains("unknown key `frobnicate`: keys are the flag names"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = with_file("workers = \"four\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = with_file("this is not toml", &[]).unwrap_err().to_string();
        assert!(e.starts_with("config file "), "{e}");
        let e = parse(&["--config", "/nonexistent/ringmx.toml"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/ringmx.toml") && e.contains("--config"),
            "{e}"
        );
    }

    #[test]
    fn every_suggested_key_is_a_real_key() {
        for key in FILE_KEYS {
            // Any value: a wrong type is a different error, never "unknown key".
            let e = FileConfig::parse(&format!("{key} = 1"), Path::new("f")).err();
            assert!(
                !e.is_some_and(|e| e.to_string().contains("unknown key")),
                "{key}"
            );
        }
    }

    #[test]
    fn help_explains_every_flag_with_an_example() {
        let mut cmd = Cli::command();
        let top = cmd.render_long_help().to_string();
        assert!(top.contains("serve") && top.contains("Examples:"), "{top}");
        for flag in [
            "--config FILE",
            "--listen ADDR",
            "--max-connections-per-ip N",
            "--shutdown-grace SECS",
        ] {
            assert!(top.contains(flag), "ringmx --help lacks {flag}");
        }
        let serve = cmd
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        for flag in [
            "--config <FILE>",
            "--listen <ADDR>",
            "--workers <N>",
            "--hostname <NAME>",
            "--store <SPEC>",
            "--accept-domain <DOMAIN>",
            "--accept-any-recipient",
            "--max-message-size <BYTES>",
            "--max-recipients <N>",
            "--idle-timeout <SECS>",
            "--max-session-time <SECS>",
            "--max-connections <N>",
            "--max-connections-per-ip <N>",
            "--max-errors <N>",
            "--shutdown-grace <SECS>",
        ] {
            assert!(serve.contains(flag), "serve --help lacks {flag}:\n{serve}");
        }
        for default in [
            "127.0.0.1:2525",
            "maildir:./ringmx-data/maildir",
            "26214400",
            "300",
            "10000",
            "50",
        ] {
            assert!(
                serve.contains(default),
                "serve --help lacks default {default}"
            );
        }
        assert!(
            serve.contains("ringmx serve --listen 0.0.0.0:25"),
            "{serve}"
        );
        assert!(
            !serve.contains("--batch-messages-max"),
            "tuning flags stay hidden"
        );
    }

    #[test]
    fn log_filter_prefers_the_flag_then_rust_log_then_info() {
        assert_eq!(log_filter(Some("debug"), Some("warn")), "debug");
        assert_eq!(log_filter(None, Some("warn")), "warn");
        assert_eq!(log_filter(None, None), "info");
        assert_eq!(log_filter(None, Some("")), "info");
    }
}
