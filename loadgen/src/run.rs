//! The edge: flags, a preflight check of the target, the threads, the live line and interval
//! log while running, and the report, JSON, plot and baseline check at the end.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;

use crate::cli::{Cli, Config};
use crate::engine::{run_thread, Mode, RunConfig};
use crate::message::build_message;
use crate::reply::ReplyParser;
use crate::report::{Report, CLOSED_BASIS, OPEN_BASIS};
use crate::stats::{IntervalReport, Phase, PhaseSet, ThreadStats, PHASES};

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    let cfg = match Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringmx-loadgen: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(cfg) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringmx-loadgen: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Checks, before any load, that the target accepts a connection and greets with 2xx, so an
/// unreachable or silent server is one clear line instead of a report full of errors.
fn preflight(cfg: &Config) -> Result<()> {
    let t = &cfg.target_text;
    let mut s = TcpStream::connect_timeout(&cfg.target, cfg.timeout).map_err(|e| {
        anyhow!(
            "cannot connect to {t} ({}): {e}; is an SMTP server listening there?",
            cfg.target
        )
    })?;
    s.set_read_timeout(Some(cfg.timeout))?;
    // A server behind a load balancer greets only after the balancer's header.
    let hint = match cfg.proxy {
        Some(version) => {
            let mut header = Vec::new();
            crate::proxy::header(version, s.local_addr()?, cfg.target, &mut header);
            s.write_all(&header)
                .with_context(|| format!("{t}: sending the PROXY protocol header"))?;
            ""
        }
        None => "; if it expects a PROXY protocol header first, add --proxy-protocol v1 or v2",
    };
    let mut parser = ReplyParser::new();
    let mut buf = [0u8; 1024];
    let reply = loop {
        let n = match s.read(&mut buf) {
            Ok(0) => bail!("{t} closed the connection without sending a greeting{hint}"),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "{t} accepted the connection but sent no greeting within {:?} (--timeout){hint}",
                    cfg.timeout
                )
            }
            Err(e) => bail!("{t}: reading the greeting failed: {e}"),
        };
        match parser.feed(&buf[..n]) {
            (_, None) => continue,
            (_, Some(Ok(r))) => break r,
            (_, Some(Err(e))) => {
                let got: String = String::from_utf8_lossy(&buf[..n])
                    .chars()
                    .take(60)
                    .collect();
                bail!("{t} does not speak SMTP ({e}): {got:?}")
            }
        }
    };
    if reply.code / 100 != 2 {
        bail!(
            "{t} does not accept sessions: it greeted with {:?}",
            parser.text()
        );
    }
    let _ = s.write_all(b"QUIT\r\n");
    let _ = s.read(&mut buf);
    Ok(())
}

/// Interval reports of all threads, merged per second once every thread has moved past it.
struct Intervals {
    pending: BTreeMap<u64, (PhaseSet, u64, u64)>,
    latest: Vec<Option<u64>>,
    errors_total: u64,
}

impl Intervals {
    fn add(&mut self, r: IntervalReport) {
        let e = self
            .pending
            .entry(r.index)
            .or_insert_with(|| (PhaseSet::default(), 0, 0));
        e.0.merge(&r.phases);
        e.1 += r.messages_accepted;
        e.2 += r.errors;
        self.latest[r.thread] = Some(self.latest[r.thread].map_or(r.index, |l| l.max(r.index)));
    }

    /// Intervals complete for every thread still running (`done` threads are complete).
    fn take_ready(&mut self, done: &[bool], all: bool) -> Vec<(u64, (PhaseSet, u64, u64))> {
        let limit = if all {
            u64::MAX
        } else {
            self.latest
                .iter()
                .zip(done)
                .map(|(l, d)| if *d { u64::MAX } else { l.map_or(0, |v| v + 1) })
                .min()
                .unwrap_or(u64::MAX)
        };
        let rest = self.pending.split_off(&limit);
        let ready = std::mem::replace(&mut self.pending, rest);
        ready.into_iter().collect()
    }
}

pub fn run(cfg: Config) -> Result<ExitCode> {
    let cpu_start = crate::uring::process_cpu_time();
    preflight(&cfg)?;
    let from0 = cfg.script.from.render_string(0, 0, 0);
    let to0 = cfg.script.to.render_string(0, 0, 0);
    let message = build_message(cfg.size as usize, cfg.seed, &from0, &to0);
    let message_len = message.len();
    let live = std::io::stdout().is_terminal();
    let intervals_wanted = live || cfg.hdr_log.is_some();
    let rc = Arc::new(RunConfig {
        target: cfg.target,
        mode: cfg.mode,
        stop: cfg.stop,
        warmup: cfg.warmup,
        threads: cfg.threads,
        timeout: cfg.timeout,
        script: cfg.script.clone(),
        message,
        // As sent: the message without its end-of-data line (a size of 1 became 2).
        size: message_len as u64 - 3,
        intervals: intervals_wanted,
        open_slots: cfg.open_slots,
        batch_pct: cfg.batch_pct,
        spin: cfg.spin,
        proxy: cfg.proxy,
    });

    let mut log_out = match &cfg.hdr_log {
        Some(p) => Some((
            BufWriter::new(File::create(p).with_context(|| format!("--hdr-log {}", p.display()))?),
            V2DeflateSerializer::new(),
        )),
        None => None,
    };
    let wall_start = SystemTime::now();
    let mut log = match log_out.as_mut() {
        Some((f, ser)) => Some(
            IntervalLogWriterBuilder::new()
                .add_comment(&format!("ringmx-loadgen {} -> {}; values in microseconds; one tagged histogram per phase per second", env!("CARGO_PKG_VERSION"), cfg.target_text))
                .with_start_time(wall_start)
                .with_base_time(wall_start)
                .begin_log_with(f, ser)?,
        ),
        None => None,
    };

    let bar = live.then(|| {
        let b =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stdout());
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("valid template"),
        );
        b
    });

    let (tx, rx) = mpsc::channel::<IntervalReport>();
    let start = Instant::now() + Duration::from_millis(20);
    let mut handles = Vec::new();
    for t in 0..cfg.threads {
        let rc = Arc::clone(&rc);
        let tx = intervals_wanted.then(|| tx.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || run_thread(t, rc, start, tx))
                .context("cannot start a thread")?,
        );
    }
    drop(tx);

    let mut iv = Intervals {
        pending: BTreeMap::new(),
        latest: vec![None; cfg.threads as usize],
        errors_total: 0,
    };
    let mut emit = |ready: Vec<(u64, (PhaseSet, u64, u64))>, iv_errors: &mut u64| -> Result<()> {
        for (index, (phases, msgs, errs)) in ready {
            *iv_errors += errs;
            if let Some(log) = log.as_mut() {
                for p in PHASES {
                    let h = phases.get(p);
                    if !h.is_empty() {
                        log.write_histogram(
                            h,
                            Duration::from_secs(index),
                            Duration::from_secs(1),
                            Tag::new(p.name()),
                        )
                        .map_err(|e| anyhow!("--hdr-log: {e}"))?;
                    }
                }
            }
            if let Some(b) = &bar {
                let s = phases.get(Phase::Session);
                let p99 = if s.is_empty() {
                    "-".to_string()
                } else {
                    format!("{} µs", s.value_at_quantile(0.99))
                };
                b.set_message(format!(
                    "{:>4} s  {msgs} messages/s  session p99 {p99}  errors {}",
                    index + 1,
                    iv_errors
                ));
                b.tick();
            }
        }
        Ok(())
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => iv.add(r),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let done: Vec<bool> = handles.iter().map(|h| h.is_finished()).collect();
        let ready = iv.take_ready(&done, false);
        emit(ready, &mut iv.errors_total)?;
        if !intervals_wanted && done.iter().all(|d| *d) {
            break;
        }
    }
    let ready = iv.take_ready(&[], true);
    emit(ready, &mut iv.errors_total)?;
    drop(log);
    if let Some((f, _)) = log_out.as_mut() {
        f.flush().context("--hdr-log")?;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    let mut total = ThreadStats::default();
    for h in handles {
        let stats = h
            .join()
            .map_err(|_| anyhow!("a generator thread panicked"))??;
        total.merge(&stats);
    }
    let wall = start.elapsed();
    let cpu = crate::uring::process_cpu_time().saturating_sub(cpu_start);
    let last_end = Duration::from_nanos(total.last_end_ns);
    let elapsed = if last_end > cfg.warmup {
        last_end - cfg.warmup
    } else {
        wall.saturating_sub(cfg.warmup)
    };

    let (mode, basis, connections, rate) = match cfg.mode {
        Mode::Closed { connections } => ("closed", CLOSED_BASIS, Some(connections), None),
        Mode::Open { rate } => ("open", OPEN_BASIS, None, Some(rate)),
    };
    let mut report = Report {
        tool: "ringmx-loadgen".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        target: cfg.target_text.clone(),
        mode: mode.into(),
        latency_basis: basis.into(),
        connections,
        rate_per_s: rate,
        threads: cfg.threads,
        messages_per_session: cfg.script.messages,
        recipients: cfg.script.recipients,
        size_bytes: cfg.size,
        pipelining_requested: cfg.script.pipelining,
        warmup_s: cfg.warmup.as_secs_f64(),
        batch_pct: cfg.batch_pct,
        batch_wait_us_max: total.batch_wait_us_max,
        spin: cfg.spin,
        stalls_over_1ms: total.stalls.count,
        stall_longest_ms: (total.stalls.longest.as_secs_f64() * 1e5).round() / 100.0,
        stalls_total_ms: (total.stalls.total.as_secs_f64() * 1e4).round() / 10.0,
        ..Default::default()
    };
    report.fill_figures(
        &total.phases,
        &total.counts,
        &total.errors,
        elapsed.as_secs_f64(),
    );
    let all_accepted = total.counts.messages_accepted + total.counts.warmup_messages_accepted;
    report.generator_cpu_us_per_message = if all_accepted > 0 {
        (cpu.as_secs_f64() * 1e6 / all_accepted as f64 * 10.0).round() / 10.0
    } else {
        0.0
    };
    print!("{}", report.table());
    std::io::stdout().flush()?;

    if let Some(p) = &cfg.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(p, text + "\n").with_context(|| format!("--json {}", p.display()))?;
    }
    if let Some(p) = &cfg.plot {
        let title = format!(
            "ringmx-loadgen -> {}: {}",
            cfg.target_text,
            if mode == "open" {
                "open loop"
            } else {
                "closed loop"
            }
        );
        std::fs::write(p, crate::plot::svg(&total.phases, &title))
            .with_context(|| format!("--plot {}", p.display()))?;
    }
    if let Some((path, pct)) = &cfg.baseline {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--baseline {}", path.display()))?;
        let base: Report = serde_json::from_str(&text).with_context(|| {
            format!(
                "--baseline {} is not a ringmx-loadgen --json report",
                path.display()
            )
        })?;
        for d in crate::baseline::shape_differences(&base, &report) {
            eprintln!("ringmx-loadgen: warning: {d}");
        }
        let regressions = crate::baseline::compare(&base, &report, *pct);
        if !regressions.is_empty() {
            for r in &regressions {
                println!("REGRESSION: {r}");
            }
            return Ok(ExitCode::from(3));
        }
        println!(
            "baseline: no regression beyond {pct}% against {}",
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
