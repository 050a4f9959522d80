//! The run's figures: built once from the merged statistics, printed as a table, written as
//! JSON (`--json`) and read back as a baseline. Every latency is from HdrHistogram with three
//! significant figures; nothing is computed from averages.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::errors::ErrorTable;
use crate::stats::{Counts, PhaseSet, PHASES};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PhaseSummary {
    pub name: String,
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl PhaseSummary {
    pub fn from_histogram(name: &str, h: &Histogram<u64>) -> PhaseSummary {
        if h.is_empty() {
            return PhaseSummary {
                name: name.into(),
                ..Default::default()
            };
        }
        PhaseSummary {
            name: name.into(),
            count: h.len(),
            min_us: h.min(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Throughput {
    pub sessions_per_s: f64,
    pub messages_per_s: f64,
    pub mb_per_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorSummary {
    pub kind: String,
    pub count: u64,
    pub examples: Vec<String>,
}

/// Everything a run measured; the `--json` file and the `--baseline` input.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub target: String,
    /// "closed" or "open".
    pub mode: String,
    /// How latencies are timed in this mode, in words.
    pub latency_basis: String,
    pub connections: Option<u64>,
    pub rate_per_s: Option<f64>,
    pub threads: u64,
    pub messages_per_session: u64,
    pub recipients: u64,
    pub size_bytes: u64,
    pub pipelining_requested: bool,
    pub server_offers_pipelining: bool,
    pub warmup_s: f64,
    /// --batch: completions may be held for up to this percentage of the recent reply time.
    pub batch_pct: f64,
    /// The longest batch window actually used: no timestamp is later than this.
    pub batch_wait_us_max: u64,
    /// --spin: the generator busy-polled instead of sleeping (its CPU figure counts that).
    pub spin: bool,
    /// --spin: gaps of more than 1 ms between two polls of a generator thread (the machine
    /// stopped it), their number, the longest and their sum; zero without --spin. The whole
    /// run, warmup included.
    pub stalls_over_1ms: u64,
    pub stall_longest_ms: f64,
    pub stalls_total_ms: f64,
    /// Measured time: from the end of the warmup to the end of the last measured session.
    pub elapsed_s: f64,
    pub throughput: Throughput,
    pub counts: Counts,
    pub phases: Vec<PhaseSummary>,
    pub errors_total: u64,
    pub errors: Vec<ErrorSummary>,
    /// CPU (user + system) the generator itself used per accepted message, whole run.
    pub generator_cpu_us_per_message: f64,
}

pub const CLOSED_BASIS: &str = "closed loop: each session is timed from its own start, so a stalled server also slows the generator and stalls are under-represented; use --rate for an open loop";
pub const OPEN_BASIS: &str = "open loop: sessions start on a fixed schedule and connect/session latency counts from the scheduled start, so stalls are fully represented (no coordinated omission)";

impl Report {
    pub fn fill_figures(
        &mut self,
        phases: &PhaseSet,
        counts: &Counts,
        errors: &ErrorTable,
        elapsed_s: f64,
    ) {
        self.elapsed_s = (elapsed_s * 1000.0).round() / 1000.0;
        let per_s = |v: f64| {
            if elapsed_s > 0.0 {
                (v / elapsed_s * 10.0).round() / 10.0
            } else {
                0.0
            }
        };
        self.throughput = Throughput {
            sessions_per_s: per_s(counts.sessions_ok as f64),
            messages_per_s: per_s(counts.messages_accepted as f64),
            mb_per_s: if elapsed_s > 0.0 {
                (counts.bytes_accepted as f64 / 1e6 / elapsed_s * 1000.0).round() / 1000.0
            } else {
                0.0
            },
        };
        self.counts = counts.clone();
        self.server_offers_pipelining = counts.server_pipelining;
        self.phases = PHASES
            .iter()
            .map(|p| PhaseSummary::from_histogram(p.name(), phases.get(*p)))
            .collect();
        self.errors_total = errors.total();
        self.errors = errors
            .sorted()
            .into_iter()
            .map(|e| ErrorSummary {
                kind: e.kind.to_string(),
                count: e.count,
                examples: e.examples,
            })
            .collect();
    }

    pub fn phase(&self, name: &str) -> Option<&PhaseSummary> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// The human-readable report.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let load = match (self.connections, self.rate_per_s) {
            (_, Some(r)) => format!("open loop at {r} sessions/s"),
            (Some(c), None) => format!("closed loop, {c} connections"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "ringmx-loadgen {} -> {}: {load}, {} threads",
            self.version, self.target, self.threads
        );
        let _ = writeln!(
            s,
            "shape: {} message(s) x {} recipient(s) x {} bytes per session, pipelining {} (server offers it: {})",
            self.messages_per_session,
            self.recipients,
            self.size_bytes,
            if self.pipelining_requested { "requested" } else { "off" },
            if self.server_offers_pipelining { "yes" } else { "no" }
        );
        let _ = writeln!(s, "latency: {}", self.latency_basis);
        if self.spin {
            let _ = writeln!(
                s,
                "timestamps: busy-polled (--spin): every completion seen at once; the generator kept its cores fully busy"
            );
            let _ = writeln!(
                s,
                "stalls: the machine stopped a polling thread {} time(s) for more than 1 ms (longest {:.2} ms, {:.1} ms in all); every session in flight waited as long",
                self.stalls_over_1ms, self.stall_longest_ms, self.stalls_total_ms
            );
        }
        if self.batch_pct > 0.0 {
            let _ = writeln!(
                s,
                "timestamps: completions batched (--batch {}%): each seen late by at most {} µs in this run",
                self.batch_pct, self.batch_wait_us_max
            );
        }
        let _ = writeln!(
            s,
            "measured {:.2} s (warmup {} s left out)",
            self.elapsed_s, self.warmup_s
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "phase (µs)", "count", "min", "mean", "p50", "p90", "p99", "p99.9", "max"
        );
        for p in &self.phases {
            let _ = writeln!(
                s,
                "{:<12} {:>9} {:>10} {:>10.1} {:>10} {:>10} {:>10} {:>10} {:>10}",
                p.name,
                p.count,
                p.min_us,
                p.mean_us,
                p.p50_us,
                p.p90_us,
                p.p99_us,
                p.p999_us,
                p.max_us
            );
        }
        let _ = writeln!(s);
        let t = &self.throughput;
        let _ = writeln!(
            s,
            "throughput: {:.1} sessions/s, {:.1} messages/s, {:.3} MB/s",
            t.sessions_per_s, t.messages_per_s, t.mb_per_s
        );
        let c = &self.counts;
        let _ = writeln!(
            s,
            "sessions: {} ok, {} failed, {} unfinished; messages: {} accepted, {} failed",
            c.sessions_ok,
            c.sessions_failed,
            c.sessions_unfinished,
            c.messages_accepted,
            c.messages_failed
        );
        if c.warmup_sessions > 0 {
            let _ = writeln!(
                s,
                "warmup (not in the figures): {} sessions, {} messages accepted, {} errors",
                c.warmup_sessions, c.warmup_messages_accepted, c.warmup_errors
            );
        }
        let _ = writeln!(
            s,
            "generator CPU: {:.1} µs per accepted message",
            self.generator_cpu_us_per_message
        );
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let _ = writeln!(s, "errors: {} in total", self.errors_total);
            for e in &self.errors {
                let _ = writeln!(s, "  {:<20} {:>9}", e.kind, e.count);
                for ex in &e.examples {
                    let _ = writeln!(s, "      e.g. {ex}");
                }
            }
        }
        s
    }
}
