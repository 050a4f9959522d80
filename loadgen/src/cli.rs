//! Raw flags -> a validated `Config`; every flag's meaning and limit is settled here, once.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::engine::Mode;
use crate::message::Template;
use crate::schedule::Stop;
use crate::session::Script;

/// SMTP load generator: measures connection set-up and session latency of an SMTP receiver.
#[derive(Debug, Parser)]
#[command(name = "ringmx-loadgen", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Server to load, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// Concurrent sessions, closed loop: a new session starts when one ends.
    #[arg(long, value_name = "C", default_value_t = 50, conflicts_with = "rate")]
    pub connections: u64,
    /// Open loop: start R sessions per second on a fixed schedule, whatever the server does;
    /// latency counts from the scheduled start (no coordinated omission).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// Stop after N sessions in total (warmup included).
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    pub sessions: Option<u64>,
    /// Measure for SECS seconds after the warmup [default: 10].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Run for SECS seconds first and leave those sessions out of the figures.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub warmup: f64,
    /// Messages per session.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub messages_per_session: u64,
    /// Recipients per message.
    #[arg(long, value_name = "R", default_value_t = 1)]
    pub recipients: u64,
    /// Message size in bytes (headers and body, end-of-data line excluded); generated content.
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    pub size: u64,
    /// Seed of the generated message content.
    #[arg(long, value_name = "SEED", default_value_t = 1)]
    pub seed: u64,
    /// Send MAIL, the RCPTs and DATA in one write when the server offers PIPELINING.
    #[arg(long)]
    pub pipelining: bool,
    /// Begin every connection with a PROXY protocol header (HAProxy's, version 1 text or 2
    /// binary) naming the connection's own address as the client, as a load balancer in front
    /// of the server would; for a server that expects one (ringmx serve --proxy-protocol).
    #[arg(long, value_name = "VERSION", value_enum)]
    pub proxy_protocol: Option<ProxyVersion>,
    /// EHLO name. Placeholders in braces, as in the defaults below: n = session number.
    #[arg(long, value_name = "NAME", default_value = "loadgen.example")]
    pub helo: String,
    /// Envelope sender. Placeholders in braces: n = session number (as in the default), m = message
    /// number in the session.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "loadgen{n}@loadgen.example"
    )]
    pub from: String,
    /// Envelope recipient. Placeholders in braces: n (session), m (message in the session),
    /// r (recipient in the message).
    #[arg(long, value_name = "ADDR", default_value = "user{n}@example.com")]
    pub to: String,
    /// Threads, each with its own io_uring [default: number of CPUs available].
    #[arg(long, value_name = "T")]
    pub threads: Option<u64>,
    /// Longest wait for a connection or for any one reply, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    /// Let completions gather for up to PCT% of the mean reply time (at most 200 µs) before
    /// handling them: fewer wake-ups of the generator and of the server, so much less generator
    /// CPU under load, while each reply is seen at most that much late (the report gives the
    /// bound in µs). Only with 2+ sessions in flight. 0: handle every completion at once.
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    pub batch: f64,
    /// Busy-poll the ring instead of sleeping until the next completion or scheduled start.
    /// Each sleep and wake-up costs a trip through the kernel's scheduler (on a VM, exits to
    /// the host), which delays the handling of replies and the start of due sessions; spinning
    /// keeps those delays out of the latencies measured, mostly for --rate on a core of its
    /// own. Each thread then keeps its core fully busy, so the generator CPU figure counts the
    /// spinning too. Implies --batch 0.
    #[arg(long)]
    pub spin: bool,
    /// Write every figure as JSON to FILE (usable as a later --baseline).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an HdrHistogram interval log (V2, one tagged histogram per phase per second).
    #[arg(long, value_name = "FILE")]
    pub hdr_log: Option<PathBuf>,
    /// Write a latency-by-percentile plot of every phase (SVG) to FILE.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Compare with an earlier --json report; exit 3 on a regression.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Allowed fall of throughput and rise of any phase's p99, in percent.
    #[arg(
        long,
        value_name = "PCT",
        default_value_t = 10.0,
        requires = "baseline"
    )]
    pub max_regression: f64,
}

const AFTER_HELP: &str = "Exit status: 0 the run completed (errors, if any, are in the report); 1 the target cannot be reached or does not greet; 2 bad flags; 3 a regression against --baseline.";

/// Open-loop connection slots per thread at most (each costs a socket and ~5 KiB once used).
const OPEN_SLOTS_MAX: u64 = 8192;

#[derive(Debug)]
pub struct Config {
    pub target_text: String,
    pub target: SocketAddr,
    pub mode: Mode,
    pub stop: Stop,
    pub warmup: Duration,
    pub threads: u64,
    pub timeout: Duration,
    pub script: Script,
    pub size: u64,
    pub seed: u64,
    pub json: Option<PathBuf>,
    pub hdr_log: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub baseline: Option<(PathBuf, f64)>,
    pub open_slots: usize,
    pub batch_pct: f64,
    pub spin: bool,
    /// Send a PROXY protocol header of this version first on every connection.
    pub proxy: Option<ProxyVersion>,
}

/// The version of the PROXY protocol header sent with `--proxy-protocol` (`v1` or `v2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyVersion {
    V1,
    V2,
}

fn secs(flag: &str, v: f64, allow_zero: bool) -> Result<Duration> {
    if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) || v > 1e7 {
        bail!(
            "{flag} must be a number of seconds{} (got {v})",
            if allow_zero {
                ", 0 or more"
            } else {
                " above 0"
            }
        );
    }
    Ok(Duration::from_secs_f64(v))
}

impl Config {
    /// Validates flags; errors are one line for people (the caller exits 2 on them).
    pub fn from_cli(cli: Cli) -> Result<Config> {
        let warmup = secs("--warmup", cli.warmup, true)?;
        let timeout = secs("--timeout", cli.timeout, false)?;
        let stop = match (cli.sessions, cli.duration) {
            (Some(0), _) => bail!("--sessions must be at least 1"),
            (Some(n), _) => Stop::Sessions(n),
            (None, d) => Stop::Duration(warmup + secs("--duration", d.unwrap_or(10.0), false)?),
        };
        let mode = match cli.rate {
            Some(r) if !(r.is_finite() && r > 0.0) => {
                bail!("--rate must be a number of sessions per second above 0 (got {r})")
            }
            Some(r) => Mode::Open { rate: r },
            None if cli.connections == 0 => bail!("--connections must be at least 1"),
            None if cli.connections > 1_000_000 => {
                bail!("--connections {} is more than 1000000", cli.connections)
            }
            None => Mode::Closed {
                connections: cli.connections,
            },
        };
        if cli.messages_per_session == 0 {
            bail!("--messages-per-session must be at least 1");
        }
        if cli.recipients == 0 || cli.recipients > 10_000 {
            bail!("--recipients must be between 1 and 10000");
        }
        if cli.size > 1 << 30 {
            bail!("--size {} is more than 1 GiB", cli.size);
        }
        if !(cli.batch.is_finite() && (0.0..=50.0).contains(&cli.batch)) {
            bail!(
                "--batch must be a percentage from 0 to 50 (got {})",
                cli.batch
            );
        }
        if !(cli.max_regression.is_finite() && cli.max_regression >= 0.0) {
            bail!("--max-regression must be a percentage, 0 or more");
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let mut threads = match cli.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(t) if t > 1024 => bail!("--threads {t} is more than 1024"),
            Some(t) => t,
            None => cpus,
        };
        if let Mode::Closed { connections } = mode {
            // A thread without a connection would only idle.
            threads = threads.min(connections);
        }
        let target = resolve(&cli.target)?;
        let script = Script {
            helo: Template::parse("--helo", &cli.helo)?,
            from: Template::parse("--from", &cli.from)?,
            to: Template::parse("--to", &cli.to)?,
            messages: cli.messages_per_session,
            recipients: cli.recipients,
            pipelining: cli.pipelining,
        };
        let nofile = crate::uring::raise_nofile_limit();
        let open_slots = (nofile.saturating_sub(64) / threads).clamp(16, OPEN_SLOTS_MAX) as usize;
        let held = match mode {
            Mode::Closed { connections } => {
                if connections + 64 > nofile {
                    bail!("--connections {connections} needs more open files than the limit of {nofile} (raise it with ulimit -n)");
                }
                connections
            }
            _ => open_slots as u64 * threads,
        };
        crate::uring::reserve_fd_table((held + 64).min(nofile));
        Ok(Config {
            target_text: cli.target,
            target,
            mode,
            stop,
            warmup,
            threads,
            timeout,
            script,
            size: cli.size,
            seed: cli.seed,
            json: cli.json,
            hdr_log: cli.hdr_log,
            plot: cli.plot,
            baseline: cli.baseline.map(|b| (b, cli.max_regression)),
            open_slots,
            // A spinning thread sees every completion at once: there is no wait to batch.
            batch_pct: if cli.spin { 0.0 } else { cli.batch },
            spin: cli.spin,
            proxy: cli.proxy_protocol,
        })
    }
}

fn resolve(target: &str) -> Result<SocketAddr> {
    if !target.contains(':') {
        bail!("--target {target:?} needs a port, like {target}:25");
    }
    let mut addrs = target
        .to_socket_addrs()
        .with_context(|| format!("--target {target:?} cannot be resolved"))?;
    addrs
        .next()
        .with_context(|| format!("--target {target:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config> {
        let cli = Cli::try_parse_from(["ringmx-loadgen"].iter().chain(args))?;
        Config::from_cli(cli)
    }

    #[test]
    fn defaults_are_a_ten_second_closed_loop_of_fifty() {
        let c = parse(&["--target", "127.0.0.1:25"]).unwrap();
        assert_eq!(c.mode, Mode::Closed { connections: 50 });
        assert_eq!(c.stop, Stop::Duration(Duration::from_secs(10)));
        assert_eq!(c.script.messages, 1);
        assert_eq!(c.size, 1024);
        assert!(!c.script.pipelining);
    }

    #[test]
    fn warmup_is_added_to_the_duration() {
        let c = parse(&[
            "--target",
            "127.0.0.1:25",
            "--duration",
            "5",
            "--warmup",
            "2",
        ])
        .unwrap();
        assert_eq!(c.stop, Stop::Duration(Duration::from_secs(7)));
    }

    #[test]
    fn open_loop_and_session_count() {
        let c = parse(&[
            "--target",
            "127.0.0.1:25",
            "--rate",
            "250",
            "--sessions",
            "1000",
        ])
        .unwrap();
        assert_eq!(c.mode, Mode::Open { rate: 250.0 });
        assert_eq!(c.stop, Stop::Sessions(1000));
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        let cases: &[(&[&str], &str)] = &[
            (&["--target", "127.0.0.1"], "needs a port"),
            (&["--target", "127.0.0.1:25", "--rate", "0"], "--rate"),
            (
                &["--target", "127.0.0.1:25", "--connections", "0"],
                "--connections",
            ),
            (
                &["--target", "127.0.0.1:25", "--sessions", "0"],
                "--sessions",
            ),
            (&["--target", "127.0.0.1:25", "--timeout", "0"], "--timeout"),
            (&["--target", "127.0.0.1:25", "--duration=-1"], "--duration"),
            (
                &["--target", "127.0.0.1:25", "--to", "u{z}@x"],
                "placeholder",
            ),
            (&["--target", "127.0.0.1:25", "--threads", "0"], "--threads"),
            (
                &["--target", "127.0.0.1:25", "--messages-per-session", "0"],
                "--messages-per-session",
            ),
        ];
        for (args, want) in cases {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        // Clap-level conflicts.
        assert!(parse(&["--target", "x:1", "--sessions", "5", "--duration", "5"]).is_err());
        assert!(parse(&["--target", "x:1", "--rate", "5", "--connections", "5"]).is_err());
        assert!(
            parse(&["--target", "x:1", "--max-regression", "5"]).is_err(),
            "needs --baseline"
        );
    }

    #[test]
    fn threads_never_exceed_connections() {
        let c = parse(&[
            "--target",
            "127.0.0.1:25",
            "--connections",
            "3",
            "--threads",
            "8",
        ])
        .unwrap();
        assert_eq!(c.threads, 3);
    }
}
