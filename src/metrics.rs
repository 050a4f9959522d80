//! Per-worker counters: plain fields, bumped by the one thread that owns them (no atomics, no
//! sharing on the hot path). Workers hand their `Metrics` back when they stop; the server
//! `merge`s them and logs one summary line (`log_summary`). Never does I/O beyond that log line.
use std::time::Duration;

/// What one worker (or, after `merge`, the whole server) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Connections taken from the listener and given a session.
    pub connections_accepted: u64,
    /// Connections turned away at accept (--max-connections, --max-connections-per-ip).
    pub connections_refused: u64,
    /// Sessions that ended (QUIT, error limit, timeout, peer gone, shutdown).
    pub sessions_ended: u64,
    /// Sessions ended by the idle timeout.
    pub sessions_timed_out: u64,
    /// Commands answered.
    pub commands: u64,
    /// Replies that count as client errors (4xx/5xx caused by the client).
    pub client_errors: u64,
    /// Messages made durable (or discarded by the discard store) and answered 250.
    pub messages_accepted: u64,
    /// Messages refused: too big, or the store failed (451/452/552).
    pub messages_rejected: u64,
    /// Message bytes accepted (body after unstuffing, without our header block).
    pub message_bytes: u64,
    /// Bytes received from clients, all of them.
    pub bytes_received: u64,
    /// Bytes sent to clients.
    pub bytes_sent: u64,
    /// fsync operations issued (message files and directories).
    pub fsyncs: u64,
    /// Group commits completed (each ends with one directory fsync).
    pub batches: u64,
    /// The largest batch seen, in messages.
    pub batch_messages_max: u64,
    /// Store operations that failed (each message of such a batch gets 451/452).
    pub store_errors: u64,
    /// Receives that found every provided receive buffer in use (ENOBUFS) and waited for one:
    /// a worker receiving faster than it can work through its input.
    pub recv_starved: u64,
    /// Receives that found no buffer published while recycled ones were held back to keep the
    /// published few in cache (ring/bufs.rs); each costs a re-armed receive, and the worker's
    /// next turn publishes at least twice as many buffers.
    pub recv_short: u64,
    /// Times a large body's next write waited because the worker already had its most bytes
    /// in such writes (`Config::spill_in_flight_max`): the disk slower than the clients.
    pub spill_waits: u64,
    /// The most bytes one worker had in writes of bodies being received.
    pub spill_in_flight_peak: u64,
    /// Times a large body's client paused and what it had sent since the last write was
    /// written then, not held until more came.
    pub spill_idle_writes: u64,
}

impl Metrics {
    /// A batch of `messages` completed.
    pub fn record_batch(&mut self, messages: u64) {
        self.batches += 1;
        self.batch_messages_max = self.batch_messages_max.max(messages);
    }

    /// Adds `other` into `self` (maxima take the larger).
    pub fn merge(&mut self, other: &Metrics) {
        self.connections_accepted += other.connections_accepted;
        self.connections_refused += other.connections_refused;
        self.sessions_ended += other.sessions_ended;
        self.sessions_timed_out += other.sessions_timed_out;
        self.commands += other.commands;
        self.client_errors += other.client_errors;
        self.messages_accepted += other.messages_accepted;
        self.messages_rejected += other.messages_rejected;
        self.message_bytes += other.message_bytes;
        self.bytes_received += other.bytes_received;
        self.bytes_sent += other.bytes_sent;
        self.fsyncs += other.fsyncs;
        self.batches += other.batches;
        self.batch_messages_max = self.batch_messages_max.max(other.batch_messages_max);
        self.store_errors += other.store_errors;
        self.recv_starved += other.recv_starved;
        self.recv_short += other.recv_short;
        self.spill_waits += other.spill_waits;
        self.spill_in_flight_peak = self.spill_in_flight_peak.max(other.spill_in_flight_peak);
        self.spill_idle_writes += other.spill_idle_writes;
    }

    /// Merges a set of per-worker metrics.
    pub fn merged<'a>(all: impl IntoIterator<Item = &'a Metrics>) -> Metrics {
        let mut total = Metrics::default();
        for m in all {
            total.merge(m);
        }
        total
    }

    /// Mean messages per group commit, the figure that says whether batching works.
    pub fn batch_messages_mean(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.messages_accepted as f64 / self.batches as f64
        }
    }

    /// One line for people: what was done over `elapsed`, with the message rate.
    pub fn summary_line(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.messages_accepted as f64 / secs
        } else {
            0.0
        };
        format!(
            "connections {} accepted, {} refused; sessions {} ended ({} timed out); commands {}, \
             client errors {}; messages {} accepted ({} bytes, {rate:.1}/s over {secs:.1}s), {} rejected; \
             store: {} batches (mean {:.1}, max {} messages), {} fsyncs, {} errors; \
             bytes {} in, {} out; receives that waited for a buffer {} (and {} for one held back); \
             large bodies: peak {} bytes in writes, {} waits for the worker's limit, {} writes \
             when the client paused",
            self.connections_accepted,
            self.connections_refused,
            self.sessions_ended,
            self.sessions_timed_out,
            self.commands,
            self.client_errors,
            self.messages_accepted,
            self.message_bytes,
            self.messages_rejected,
            self.batches,
            self.batch_messages_mean(),
            self.batch_messages_max,
            self.fsyncs,
            self.store_errors,
            self.bytes_received,
            self.bytes_sent,
            self.recv_starved,
            self.recv_short,
            self.spill_in_flight_peak,
            self.spill_waits,
            self.spill_idle_writes,
        )
    }

    /// Logs `summary_line` at info level (the worker or server calls it at exit).
    pub fn log_summary(&self, elapsed: Duration) {
        tracing::info!("summary: {}", self.summary_line(elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_keeps_the_largest_batch() {
        let mut a = Metrics {
            connections_accepted: 3,
            messages_accepted: 10,
            message_bytes: 1000,
            fsyncs: 11,
            ..Default::default()
        };
        a.record_batch(4);
        a.record_batch(6);
        let mut b = Metrics {
            connections_accepted: 2,
            messages_accepted: 5,
            connections_refused: 1,
            ..Default::default()
        };
        b.record_batch(5);
        let total = Metrics::merged([&a, &b]);
        assert_eq!(total.connections_accepted, 5);
        assert_eq!(total.connections_refused, 1);
        assert_eq!(total.messages_accepted, 15);
        assert_eq!(total.message_bytes, 1000);
        assert_eq!(total.fsyncs, 11);
        assert_eq!(total.batches, 3);
        assert_eq!(total.batch_messages_max, 6);
        assert_eq!(total.batch_messages_mean(), 5.0);
    }

    #[test]
    fn summary_is_one_line_with_the_rate() {
        let m = Metrics {
            messages_accepted: 500,
            batches: 10,
            ..Default::default()
        };
        let s = m.summary_line(Duration::from_secs(2));
        assert!(!s.contains('\n'), "{s}");
        assert!(s.contains("messages 500 accepted"), "{s}");
        assert!(s.contains("250.0/s"), "{s}");
        assert!(s.contains("mean 50.0"), "{s}");
        // No division by zero when nothing happened.
        assert!(Metrics::default()
            .summary_line(Duration::ZERO)
            .contains("0.0/s"));
    }
}
