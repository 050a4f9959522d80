//! End-to-end tests of the generator binary against SMTP servers on 127.0.0.1: a tiny one written
//! here (with misbehaviour knobs) and the real `ringmx serve`. Every run is bounded by
//! --sessions or --duration and stops by itself.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

#[test]
fn closed_run_counts_exactly_the_messages_the_server_accepted() {
    let server = TestServer::start(Behaviour::default());
    let addr = server.addr.to_string();
    let (stdout, j) = run_report(
        &addr,
        &[
            "--connections",
            "8",
            "--threads",
            "2",
            "--sessions",
            "120",
            "--messages-per-session",
            "3",
            "--recipients",
            "2",
            "--size",
            "3000",
        ],
    );
    assert_eq!(j["counts"]["messages_accepted"], 360, "{stdout}");
    assert_eq!(
        server.accepted.load(std::sync::atomic::Ordering::SeqCst),
        360
    );
    assert_eq!(j["counts"]["sessions_ok"], 120);
    assert_eq!(j["errors_total"], 0, "{stdout}");
    assert_eq!(phase(&j, "transaction")["count"], 360);
    assert_eq!(phase(&j, "session")["count"], 120);
    assert_eq!(phase(&j, "connect")["count"], 120);
    assert!(j["throughput"]["messages_per_s"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("closed loop"), "{stdout}");
    assert!(stdout.contains("p99.9"), "{stdout}");
}

#[test]
fn warmup_sessions_run_but_stay_out_of_the_figures() {
    let server = TestServer::start(Behaviour::default());
    let addr = server.addr.to_string();
    let started = Instant::now();
    let (stdout, j) = run_report(
        &addr,
        &["--connections", "4", "--warmup", "0.5", "--duration", "1"],
    );
    let c = &j["counts"];
    let (measured, warm) = (
        c["messages_accepted"].as_u64().unwrap(),
        c["warmup_messages_accepted"].as_u64().unwrap(),
    );
    assert!(warm > 0 && measured > 0, "{stdout}");
    assert_eq!(
        measured + warm,
        server.accepted.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(
        phase(&j, "transaction")["count"].as_u64().unwrap(),
        measured
    );
    let elapsed = j["elapsed_s"].as_f64().unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(
        elapsed >= 0.9 && elapsed <= wall - 0.45,
        "measured time ({elapsed} s) excludes the 0.5 s warmup of a {wall} s run"
    );
    assert!(stdout.contains("warmup (not in the figures)"), "{stdout}");
}

#[test]
fn pipelined_run_uses_pipelining_and_counts_right() {
    let server = TestServer::start(Behaviour::default());
    let addr = server.addr.to_string();
    let (stdout, j) = run_report(
        &addr,
        &[
            "--connections",
            "4",
            "--threads",
            "1",
            "--sessions",
            "40",
            "--messages-per-session",
            "5",
            "--recipients",
            "3",
            "--pipelining",
        ],
    );
    assert_eq!(j["server_offers_pipelining"], true);
    assert_eq!(j["counts"]["messages_accepted"], 200, "{stdout}");
    assert_eq!(
        server.accepted.load(std::sync::atomic::Ordering::SeqCst),
        200
    );
    assert_eq!(j["errors_total"], 0, "{stdout}");
}

#[test]
fn rcpt_451_shows_up_as_errors_not_throughput() {
    let server = TestServer::start(Behaviour {
        rcpt_reply: "451 4.3.0 try again later",
        ..Default::default()
    });
    let addr = server.addr.to_string();
    let (stdout, j) = run_report(&addr, &["--connections", "5", "--sessions", "50"]);
    assert_eq!(j["counts"]["messages_accepted"], 0);
    assert_eq!(j["counts"]["messages_failed"], 50);
    assert_eq!(j["counts"]["sessions_ok"], 0);
    assert_eq!(j["counts"]["sessions_failed"], 50);
    assert_eq!(j["throughput"]["messages_per_s"], 0.0);
    assert_eq!(j["throughput"]["sessions_per_s"], 0.0);
    assert_eq!(phase(&j, "transaction")["count"], 0);
    assert_eq!(j["errors_total"], 50);
    let e = &j["errors"][0];
    assert_eq!(e["kind"], "451 (transient)");
    assert_eq!(e["count"], 50);
    assert!(
        e["examples"][0]
            .as_str()
            .unwrap()
            .contains("RCPT answered \"451 4.3.0 try again later\""),
        "{e}"
    );
    assert!(
        stdout.contains("451 (transient)") && stdout.contains("0.0 messages/s"),
        "{stdout}"
    );
    assert_eq!(server.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn open_loop_p999_shows_a_one_second_stall_and_closed_loop_says_what_it_is() {
    // Open loop: 200 sessions/s for 3 s; the server stalls every reply for 1 s once, after its
    // 150th connection. Sessions due during the stall wait for it, and their latency counts from
    // the schedule, so the tail shows the whole second.
    let server = TestServer::start(Behaviour {
        stall_after_connections: Some((150, Duration::from_secs(1))),
        ..Default::default()
    });
    let addr = server.addr.to_string();
    let (stdout, j) = run_report(
        &addr,
        &["--rate", "200", "--duration", "3", "--threads", "1"],
    );
    assert_eq!(j["mode"], "open");
    assert_eq!(j["errors_total"], 0, "{stdout}");
    let session = phase(&j, "session");
    assert!(session["count"].as_u64().unwrap() >= 590, "{stdout}");
    let p999 = session["p999_us"].as_u64().unwrap();
    assert!(
        p999 >= 900_000,
        "open-loop p99.9 {p999} µs must reflect the 1 s stall\n{stdout}"
    );
    // About a fifth of the sessions were due during the stall: even p90 is far above normal.
    assert!(session["p90_us"].as_u64().unwrap() >= 200_000, "{stdout}");
    assert!(
        stdout.contains("open loop") && stdout.contains("no coordinated omission"),
        "{stdout}"
    );

    // Closed loop against the same kind of server: the report says it is closed-loop and why
    // that matters.
    let server = TestServer::start(Behaviour {
        stall_after_connections: Some((50, Duration::from_secs(1))),
        ..Default::default()
    });
    let addr = server.addr.to_string();
    let (stdout, j) = run_report(&addr, &["--connections", "4", "--duration", "2"]);
    assert_eq!(j["mode"], "closed");
    assert!(j["latency_basis"].as_str().unwrap().contains("closed loop"));
    assert!(
        stdout.contains("closed loop") && stdout.contains("under-represented"),
        "{stdout}"
    );
}

#[test]
fn spinning_open_loop_keeps_the_schedule_and_counts_every_message() {
    // --spin busy-polls instead of sleeping: every session must still start on its schedule
    // (not early, not late) and every reply must still be seen, with both threads spinning.
    let server = TestServer::start(Behaviour::default());
    let addr = server.addr.to_string();
    let started = Instant::now();
    let (stdout, j) = run_report(
        &addr,
        &[
            "--spin",
            "--rate",
            "300",
            "--sessions",
            "450",
            "--threads",
            "2",
            "--messages-per-session",
            "2",
        ],
    );
    let took = started.elapsed();
    assert_eq!(j["mode"], "open");
    assert_eq!(j["spin"], true);
    assert_eq!(
        j["batch_pct"], 0.0,
        "spinning sees completions at once: no batch window"
    );
    assert_eq!(j["errors_total"], 0, "{stdout}");
    assert_eq!(j["counts"]["sessions_ok"], 450, "{stdout}");
    assert_eq!(j["counts"]["messages_accepted"], 900, "{stdout}");
    assert_eq!(
        server.accepted.load(std::sync::atomic::Ordering::SeqCst),
        900
    );
    // 450 sessions at 300/s are due over 1.5 s: a spinning loop that ignored the clock would
    // be done far sooner.
    assert!(
        took >= Duration::from_millis(1400),
        "took {took:?}\n{stdout}"
    );
    assert!(stdout.contains("busy-polled (--spin)"), "{stdout}");
    // The stalls the polling threads saw are reported, consistently: as many as counted, each
    // over 1 ms, none longer than the run.
    let (count, longest, total) = (
        j["stalls_over_1ms"].as_u64().expect("stalls_over_1ms"),
        j["stall_longest_ms"].as_f64().expect("stall_longest_ms"),
        j["stalls_total_ms"].as_f64().expect("stalls_total_ms"),
    );
    if count == 0 {
        assert_eq!((longest, total), (0.0, 0.0), "{stdout}");
    } else {
        assert!(longest > 1.0 && total + 0.1 >= longest, "{stdout}");
        assert!(total + 0.1 >= count as f64, "{stdout}");
        assert!(total < took.as_secs_f64() * 2e3, "{stdout}");
    }
    assert!(
        stdout.contains("stalls: the machine stopped a polling thread"),
        "{stdout}"
    );
}

/// The generator sizes its descriptor table before its threads start: growing it later waits
/// for an RCU grace period inside a socket(2), and in an open loop that stop (7-43 ms, measured)
/// lands in the latency of every session due meanwhile.
#[test]
fn the_descriptor_table_is_sized_before_the_run_starts() {
    let server = TestServer::start(Behaviour::default());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let mut child = Command::new(LOADGEN)
        .args([
            "--target",
            &server.addr.to_string(),
            "--rate",
            "50",
            "--duration",
            "3",
        ])
        .args(["--threads", "1", "--json", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // While it runs, with no more than a few connections open at once.
    std::thread::sleep(Duration::from_millis(1000));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let fd_size: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("FDSize in /proc/PID/status");
    assert!(child.wait().unwrap().success());
    // The open loop's slots (at least 16 per thread, at most the open-file limit) plus 64.
    assert!(fd_size >= 16 + 64, "FDSize {fd_size}");
    assert!(
        fd_size > 256,
        "FDSize {fd_size}: the table was not grown past its default"
    );
}

#[test]
fn a_server_that_closes_or_goes_silent_mid_session_shows_as_errors_by_kind() {
    let server = TestServer::start(Behaviour {
        close_on_mail: true,
        ..Default::default()
    });
    let addr = server.addr.to_string();
    let (stdout, j) = run_report(&addr, &["--connections", "3", "--sessions", "12"]);
    assert_eq!(j["errors"][0]["kind"], "closed by server", "{stdout}");
    assert_eq!(j["errors"][0]["count"], 12);
    assert!(
        j["errors"][0]["examples"][0]
            .as_str()
            .unwrap()
            .contains("waiting for the reply to MAIL"),
        "{stdout}"
    );
    assert_eq!(j["counts"]["messages_failed"], 12);
    assert_eq!(j["counts"]["sessions_failed"], 12);

    // No reply to DATA: each session times out there, its operations are cancelled and the
    // run still ends on its own, soon after the timeout.
    let server = TestServer::start(Behaviour {
        silent_on_data: true,
        ..Default::default()
    });
    let addr = server.addr.to_string();
    let started = Instant::now();
    let (stdout, j) = run_report(
        &addr,
        &["--connections", "4", "--sessions", "8", "--timeout", "0.4"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "bounded by the timeout"
    );
    assert_eq!(j["errors"][0]["kind"], "timeout", "{stdout}");
    assert_eq!(j["errors"][0]["count"], 8);
    assert!(
        j["errors"][0]["examples"][0]
            .as_str()
            .unwrap()
            .contains("timeout waiting for the reply to DATA (400ms)"),
        "{stdout}"
    );
    assert_eq!(j["counts"]["messages_accepted"], 0);
}

#[test]
fn unreachable_target_is_one_clear_line_and_exit_1() {
    let port = free_port();
    let (stdout, stderr) = run_exit(
        &["--target", &format!("127.0.0.1:{port}"), "--sessions", "5"],
        1,
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot connect to 127.0.0.1:") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(stdout.is_empty());
}

#[test]
fn server_that_never_greets_is_a_clear_error() {
    let server = TestServer::start(Behaviour {
        never_greet: true,
        ..Default::default()
    });
    let started = Instant::now();
    let (_, stderr) = run_exit(
        &[
            "--target",
            &server.addr.to_string(),
            "--sessions",
            "5",
            "--timeout",
            "0.5",
        ],
        1,
    );
    assert!(stderr.contains("sent no greeting within 500ms"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn bad_flags_exit_2_with_a_reason() {
    for (args, want) in [
        (
            vec!["--target", "127.0.0.1:25", "--connections", "0"],
            "--connections",
        ),
        (
            vec![
                "--target",
                "127.0.0.1:25",
                "--rate",
                "10",
                "--connections",
                "5",
            ],
            "cannot be used with",
        ),
        (vec!["--target", "127.0.0.1"], "needs a port"),
        (vec!["--connections", "5"], "--target"),
        (
            vec!["--target", "127.0.0.1:25", "--to", "x{q}@y"],
            "placeholder",
        ),
    ] {
        let (_, stderr) = run_exit(&args, 2);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn outputs_hdr_log_plot_and_baseline_regression_exit_3() {
    let server = TestServer::start(Behaviour::default());
    let dir = tempfile::tempdir().unwrap();
    let (json_p, log_p, svg_p) = (
        dir.path().join("r.json"),
        dir.path().join("r.hlog"),
        dir.path().join("r.svg"),
    );
    let addr = server.addr.to_string();
    let o = loadgen(&[
        "--target",
        &addr,
        "--connections",
        "4",
        "--duration",
        "2.2",
        "--json",
        json_p.to_str().unwrap(),
        "--hdr-log",
        log_p.to_str().unwrap(),
        "--plot",
        svg_p.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");

    // The interval log is readable by HdrHistogram's own log reader, tagged per phase.
    let log = std::fs::read(&log_p).unwrap();
    let mut tags = std::collections::BTreeSet::new();
    let mut session_samples = 0;
    for item in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log) {
        if let hdrhistogram::serialization::interval_log::LogEntry::Interval(h) =
            item.expect("valid log entry")
        {
            let tag = h.tag().unwrap().as_str().to_string();
            let decoded = base64_decode(h.encoded_histogram());
            let hist: hdrhistogram::Histogram<u64> =
                hdrhistogram::serialization::Deserializer::new()
                    .deserialize(&mut decoded.as_slice())
                    .unwrap();
            if tag == "session" {
                session_samples += hist.len();
            }
            tags.insert(tag);
        }
    }
    assert_eq!(
        tags.into_iter().collect::<Vec<_>>(),
        ["banner", "connect", "ehlo", "session", "transaction"]
    );
    let j = json(&json_p);
    assert_eq!(
        session_samples,
        phase(&j, "session")["count"].as_u64().unwrap(),
        "log and report agree"
    );

    let svg = std::fs::read_to_string(&svg_p).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 5);

    // Against itself: no regression. Against a baseline 10x faster: exit 3, naming throughput.
    let o = loadgen(&[
        "--target",
        &addr,
        "--connections",
        "4",
        "--duration",
        "1",
        "--baseline",
        json_p.to_str().unwrap(),
        "--max-regression",
        "1000",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let mut fast = j.clone();
    fast["throughput"]["messages_per_s"] =
        serde_json::json!(j["throughput"]["messages_per_s"].as_f64().unwrap() * 10.0);
    let fast_p = dir.path().join("fast.json");
    std::fs::write(&fast_p, fast.to_string()).unwrap();
    let (stdout, _) = run_exit(
        &[
            "--target",
            &addr,
            "--connections",
            "4",
            "--duration",
            "1",
            "--baseline",
            fast_p.to_str().unwrap(),
            "--max-regression",
            "20",
        ],
        3,
    );
    assert!(stdout.contains("REGRESSION: throughput fell"), "{stdout}");
}

/// Standard base64 (the interval log's histogram encoding), decoded without a crate.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(val(c)) << (18 - 6 * i);
        }
        out.push((acc >> 16) as u8);
        if chunk.len() > 2 {
            out.push((acc >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(acc as u8);
        }
    }
    out
}

/// A running `ringmx serve` with a Maildir, killed (by its own PID) on drop.
struct Ringmx {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Ringmx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ringmx() -> Ringmx {
    start_ringmx_with(&[])
}

/// Like `start_ringmx`, with `extra` flags after the usual ones.
fn start_ringmx_with(extra: &[&str]) -> Ringmx {
    let bin = ringmx_binary();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Command::new(&bin)
        .args([
            "serve",
            "--listen",
            &addr,
            "--hostname",
            "mx.loadgen.test",
            "--workers",
            "2",
            "--store",
        ])
        .arg(format!("maildir:{}", dir.path().join("maildir").display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn ringmx");
    let mut server = Ringmx { child, addr, dir };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            let log =
                std::fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default();
            panic!("ringmx exited with {status}: {log}");
        }
        if std::net::TcpStream::connect(&server.addr).is_ok() {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "ringmx did not listen within 15 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_files(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
                .count() as u64
        })
        .unwrap_or(0)
}

#[test]
fn closed_run_against_ringmx_maildir_stores_exactly_what_was_reported_accepted() {
    let server = start_ringmx();
    let (stdout, j) = run_report(
        &server.addr,
        &[
            "--connections",
            "8",
            "--threads",
            "2",
            "--sessions",
            "100",
            "--messages-per-session",
            "2",
        ],
    );
    let accepted = j["counts"]["messages_accepted"].as_u64().unwrap();
    assert_eq!(
        accepted, 200,
        "every message of a healthy run is accepted\n{stdout}"
    );
    let maildir = server.dir.path().join("maildir");
    let stored = count_files(&maildir.join("new")) + count_files(&maildir.join("cur"));
    assert_eq!(
        stored, accepted,
        "messages in the Maildir vs accepted by the generator\n{stdout}"
    );
    assert_eq!(
        count_files(&maildir.join("tmp")),
        0,
        "nothing left half-written"
    );
}

/// Against `ringmx serve --proxy-protocol`, every session starts with the header, as behind a
/// load balancer: all are served and stored, and the server refuses none (it would refuse every
/// one without a header). Without the flag the generator says what to add.
#[test]
fn proxy_protocol_headers_are_sent_first_and_the_server_serves_every_session() {
    let server = start_ringmx_with(&["--proxy-protocol", "--accept-any-recipient"]);
    for version in ["v1", "v2"] {
        let (stdout, j) = run_report(
            &server.addr,
            &[
                "--proxy-protocol",
                version,
                "--connections",
                "4",
                "--threads",
                "1",
                "--sessions",
                "40",
            ],
        );
        assert_eq!(
            j["counts"]["messages_accepted"].as_u64(),
            Some(40),
            "{version}\n{stdout}"
        );
    }
    let maildir = server.dir.path().join("maildir").join("new");
    assert_eq!(count_files(&maildir), 80);

    let (_, stderr) = run_exit(
        &[
            "--target",
            &server.addr,
            "--sessions",
            "1",
            "--timeout",
            "8",
        ],
        1,
    );
    assert!(stderr.contains("add --proxy-protocol v1 or v2"), "{stderr}");
    let log = std::fs::read_to_string(server.dir.path().join("server.log")).unwrap();
    // Only the run without headers was refused (its preflight connection).
    assert_eq!(log.matches("refused: no").count(), 1, "{log}");
}
