//! Figures one thread collects, merged across threads at the end: a histogram per phase,
//! counters and errors by kind. Each thread owns its own; nothing here is shared while running.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::errors::ErrorTable;

/// Latency phases, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Session start (the due time in an open loop) to TCP connect done.
    Connect = 0,
    /// TCP connect done to the 220 banner.
    Banner = 1,
    /// EHLO sent to its final reply line.
    Ehlo = 2,
    /// MAIL sent to the 250 after the final '.'; accepted messages only.
    Transaction = 3,
    /// Session start (the due time in an open loop) to 221 and close; clean sessions only.
    Session = 4,
}

pub const PHASES: [Phase; 5] = [
    Phase::Connect,
    Phase::Banner,
    Phase::Ehlo,
    Phase::Transaction,
    Phase::Session,
];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Banner => "banner",
            Phase::Ehlo => "ehlo",
            Phase::Transaction => "transaction",
            Phase::Session => "session",
        }
    }
}

/// Largest latency recorded exactly: one hour. Larger values are clamped (saturating record).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // 3 significant figures, as every figure in a report.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone)]
pub struct PhaseSet {
    pub h: [Histogram<u64>; 5],
}

impl Default for PhaseSet {
    fn default() -> Self {
        PhaseSet {
            h: std::array::from_fn(|_| new_histogram()),
        }
    }
}

impl PhaseSet {
    pub fn record(&mut self, phase: Phase, us: u64) {
        self.h[phase as usize].saturating_record(us.clamp(1, LATENCY_US_MAX));
    }
    pub fn merge(&mut self, other: &PhaseSet) {
        for (a, b) in self.h.iter_mut().zip(&other.h) {
            a.add(b).expect("same bounds");
        }
    }
    pub fn reset(&mut self) {
        for h in &mut self.h {
            h.reset();
        }
    }
    pub fn get(&self, phase: Phase) -> &Histogram<u64> {
        &self.h[phase as usize]
    }
}

/// Counters of a thread or of the whole run. Sessions and messages that started during the
/// warmup are counted only in the `warmup_*` fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Counts {
    pub sessions_ok: u64,
    pub sessions_failed: u64,
    /// Still running when the run had to end (drain deadline passed).
    pub sessions_unfinished: u64,
    pub messages_accepted: u64,
    pub messages_failed: u64,
    /// Message bytes (as sent, end-of-data excluded) of accepted messages.
    pub bytes_accepted: u64,
    pub warmup_sessions: u64,
    pub warmup_messages_accepted: u64,
    pub warmup_errors: u64,
    /// The server offered PIPELINING in some session.
    pub server_pipelining: bool,
}

impl Counts {
    pub fn merge(&mut self, o: &Counts) {
        self.sessions_ok += o.sessions_ok;
        self.sessions_failed += o.sessions_failed;
        self.sessions_unfinished += o.sessions_unfinished;
        self.messages_accepted += o.messages_accepted;
        self.messages_failed += o.messages_failed;
        self.bytes_accepted += o.bytes_accepted;
        self.warmup_sessions += o.warmup_sessions;
        self.warmup_messages_accepted += o.warmup_messages_accepted;
        self.warmup_errors += o.warmup_errors;
        self.server_pipelining |= o.server_pipelining;
    }
}

/// Everything one thread measured.
#[derive(Debug, Clone, Default)]
pub struct ThreadStats {
    pub phases: PhaseSet,
    pub counts: Counts,
    pub errors: ErrorTable,
    /// Nanoseconds from the run's start to the end of this thread's last measured session.
    pub last_end_ns: u64,
    /// Longest the kernel was allowed to hold completions for a batch (--batch), µs: no
    /// timestamp of the run is later than this.
    pub batch_wait_us_max: u64,
    /// --spin: how often, and how long, the machine stopped this busy-polling thread.
    pub stalls: Stalls,
}

impl ThreadStats {
    pub fn merge(&mut self, o: &ThreadStats) {
        self.phases.merge(&o.phases);
        self.counts.merge(&o.counts);
        self.errors.merge(&o.errors);
        self.last_end_ns = self.last_end_ns.max(o.last_end_ns);
        self.batch_wait_us_max = self.batch_wait_us_max.max(o.batch_wait_us_max);
        self.stalls.merge(&o.stalls);
    }
}

/// Gaps between two consecutive polls of a busy-polling thread (--spin) longer than
/// `Stalls::MIN`: time the thread was runnable but did not run (the hypervisor took the core,
/// another task or an interrupt had it). Every session in flight, and every one due meanwhile,
/// is late by as much, whatever the server does; so these bound how low the measured tail can
/// be on this machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stalls {
    last: Option<Instant>,
    /// Gaps longer than `MIN`.
    pub count: u64,
    pub longest: Duration,
    pub total: Duration,
}

impl Stalls {
    /// Shorter gaps are a poll's own work (a system call, the completions it reaped).
    pub const MIN: Duration = Duration::from_millis(1);

    /// A poll at `now`, right after the previous one (if `resume` was not called since).
    pub fn poll(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last);
            if gap > Self::MIN {
                self.count += 1;
                self.longest = self.longest.max(gap);
                self.total += gap;
            }
        }
        self.last = Some(now);
    }

    /// The thread did its own work since the last poll: the next gap is not a stall.
    pub fn resume(&mut self) {
        self.last = None;
    }

    pub fn merge(&mut self, o: &Stalls) {
        self.count += o.count;
        self.longest = self.longest.max(o.longest);
        self.total += o.total;
    }
}

/// One thread's figures for one interval of the live line and the interval log.
#[derive(Debug, Clone)]
pub struct IntervalReport {
    pub thread: usize,
    /// Interval number: it covers [index, index + 1) seconds after the run's start.
    pub index: u64,
    pub phases: PhaseSet,
    pub messages_accepted: u64,
    pub sessions_ok: u64,
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_count_only_long_gaps_between_consecutive_polls() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut s = Stalls::default();
        for us in [0, 50, 100, 3_100, 3_150] {
            s.poll(at(us));
        }
        assert_eq!(
            (s.count, s.longest, s.total),
            (
                1,
                Duration::from_micros(3_000),
                Duration::from_micros(3_000)
            )
        );
        // Work between two polls (handling completions) is not a stall, however long.
        s.resume();
        s.poll(at(20_000));
        s.poll(at(20_900)); // 0.9 ms: under the threshold
        s.poll(at(22_000)); // 1.1 ms
        assert_eq!(s.count, 2);
        assert_eq!(s.total, Duration::from_micros(4_100));
        let mut other = Stalls::default();
        other.poll(at(0));
        other.poll(at(8_000));
        s.merge(&other);
        assert_eq!((s.count, s.longest), (3, Duration::from_millis(8)));
        assert_eq!(s.total, Duration::from_micros(12_100));
    }

    #[test]
    fn merged_percentiles_equal_those_of_one_histogram() {
        let mut a = PhaseSet::default();
        let mut b = PhaseSet::default();
        let mut all = PhaseSet::default();
        for v in 1..=1000u64 {
            let target = if v % 3 == 0 { &mut a } else { &mut b };
            target.record(Phase::Session, v * 10);
            all.record(Phase::Session, v * 10);
        }
        a.merge(&b);
        let (m, o) = (a.get(Phase::Session), all.get(Phase::Session));
        assert_eq!(m.len(), 1000);
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_eq!(m.value_at_quantile(q), o.value_at_quantile(q));
        }
        assert_eq!(m.max(), o.max());
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_lost() {
        let mut p = PhaseSet::default();
        p.record(Phase::Connect, 0);
        p.record(Phase::Connect, u64::MAX);
        assert_eq!(p.get(Phase::Connect).len(), 2);
        assert!(p.get(Phase::Connect).max() >= LATENCY_US_MAX);
    }
}
