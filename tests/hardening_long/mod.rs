//! The full-size abuse runs: minutes, thousands of sockets, so `#[ignore]`d in the normal
//! `cargo test`. Run them with (see HARDENING.md):
//! `cargo test --release --test tests hardening_long -- --ignored --nocapture --test-threads 1`

use std::time::Duration;

use crate::common::Server;
use crate::hardening::{idle_and_slow_abuse, pipelined_transactions};

/// Issue 5 at full size: 5,000 idle connections and 1,000 sending a byte a second while a
/// normal client runs 300 transactions; RSS per idle connection and its p99 reported.
#[test]
#[ignore = "long: 5,000 idle + 1,000 slow connections; run by hand, see HARDENING.md"]
fn abuse_5000_idle_and_1000_slow_connections() {
    let r = idle_and_slow_abuse(5000, 1000, 300, Duration::from_millis(100));
    assert!(
        r.rss_per_conn_bytes < 64 * 1024,
        "{} bytes of RSS per idle connection",
        r.rss_per_conn_bytes
    );
    assert!(
        r.p99 < Duration::from_secs(1),
        "normal client's p99 {:?} under abuse",
        r.p99
    );
}

/// Pipelining at 5x the CI size, for a throughput figure on one connection.
#[test]
#[ignore = "long: 50,000 pipelined transactions; run by hand, see HARDENING.md"]
fn pipelining_50000_transactions_in_order() {
    let server = Server::start(&[]);
    let n = 50_000;
    let elapsed = pipelined_transactions(&server, n);
    println!(
        "FIGURE pipelining: {n} transactions on one connection in {elapsed:?} ({:.0}/s)",
        n as f64 / elapsed.as_secs_f64()
    );
}
