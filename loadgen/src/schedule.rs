//! When sessions start and which thread runs them. Pure arithmetic, so it is tested exactly.
//!
//! Open loop: session `i` (numbered across all threads) is due at `i / rate` seconds after the
//! run's start, whatever the server is doing. Thread `t` of `T` owns the sessions with
//! `i % T == t`. Each due time is computed from `i`, never by adding intervals, so there is no
//! drift over long runs. Latency is measured from the due time, so a session the generator could
//! only start late (the server is stalled and every connection slot is busy) still counts its
//! whole wait: no coordinated omission.

use std::time::Duration;

/// How a run decides to stop starting sessions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this many sessions in total (warmup included).
    Sessions(u64),
    /// When this much time has passed since the start (warmup included).
    Duration(Duration),
}

/// Due time of session `i` at `rate` sessions per second, from the run's start.
pub fn due_offset(i: u64, rate: f64) -> Duration {
    Duration::from_nanos((i as f64 * 1e9 / rate).round() as u64)
}

/// Part `t` of `total` split over `parts` as evenly as possible (the first ones get one more).
pub fn share(total: u64, parts: u64, t: u64) -> u64 {
    total / parts + u64::from(t < total % parts)
}

/// The sessions thread `t` of `threads` runs in an open loop: numbers `t, t+T, t+2T, ...`.
#[derive(Debug, Clone)]
pub struct OpenSchedule {
    rate: f64,
    threads: u64,
    /// Next session number this thread will start.
    next: u64,
    stop: Stop,
}

impl OpenSchedule {
    pub fn new(rate: f64, threads: u64, t: u64, stop: Stop) -> OpenSchedule {
        OpenSchedule {
            rate,
            threads,
            next: t,
            stop,
        }
    }

    /// The next session's number and due offset, if the run is still starting sessions.
    pub fn peek(&self) -> Option<(u64, Duration)> {
        let due = due_offset(self.next, self.rate);
        let more = match self.stop {
            Stop::Sessions(n) => self.next < n,
            Stop::Duration(d) => due < d,
        };
        more.then_some((self.next, due))
    }

    pub fn advance(&mut self) {
        self.next += self.threads;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_follow_the_rate_without_drift() {
        assert_eq!(due_offset(0, 100.0), Duration::ZERO);
        assert_eq!(due_offset(1, 100.0), Duration::from_millis(10));
        assert_eq!(due_offset(250, 1000.0), Duration::from_millis(250));
        // One million sessions at 3/s: computed, not accumulated, so exact to the nanosecond.
        assert_eq!(due_offset(3_000_000, 3.0), Duration::from_secs(1_000_000));
        // Fractional rates.
        assert_eq!(due_offset(1, 0.5), Duration::from_secs(2));
    }

    #[test]
    fn threads_interleave_and_together_run_every_session_once() {
        let threads = 3;
        let mut all = Vec::new();
        for t in 0..threads {
            let mut s = OpenSchedule::new(10.0, threads, t, Stop::Sessions(10));
            let mut last = None;
            while let Some((i, due)) = s.peek() {
                assert!(
                    last.is_none_or(|l| due > l),
                    "due times increase per thread"
                );
                last = Some(due);
                all.push(i);
                s.advance();
            }
        }
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn duration_stop_starts_exactly_rate_times_duration_sessions() {
        let threads = 2;
        let mut count = 0;
        for t in 0..threads {
            let mut s =
                OpenSchedule::new(200.0, threads, t, Stop::Duration(Duration::from_secs(3)));
            while let Some((_, due)) = s.peek() {
                assert!(due < Duration::from_secs(3));
                count += 1;
                s.advance();
            }
        }
        assert_eq!(count, 600);
    }

    #[test]
    fn shares_add_up() {
        for total in 0..50 {
            for parts in 1..7 {
                let sum: u64 = (0..parts).map(|t| share(total, parts, t)).sum();
                assert_eq!(sum, total);
                let max = (0..parts).map(|t| share(total, parts, t)).max().unwrap();
                let min = (0..parts).map(|t| share(total, parts, t)).min().unwrap();
                assert!(max - min <= 1);
            }
        }
    }
}
