//! One thread's event loop: many connections over one io_uring, no shared state while running.
//!
//! Each loop turn starts the sessions that are due, checks reply deadlines, submits everything
//! queued and waits (with the kernel's timeout argument) for completions, then handles them
//! outside the reap. A connection's lifecycle is socket (a plain syscall), connect, then one
//! receive always outstanding while a reply is due and a send per command group, and finally a
//! cancel of whatever is still in flight and a close through the ring. The slot is reused only
//! after the close completes, so no stale completion can reach a new session.

use std::os::fd::{IntoRawFd, RawFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::errors::ErrorKind;
use crate::reply::ReplyParser;
use crate::schedule::{share, OpenSchedule, Stop};
use crate::session::{ev, Action, Outcome, Script, Session, Step};
use crate::stats::{IntervalReport, Phase, PhaseSet, ThreadStats};
use crate::uring::{Completion, OpKind, Ring};

/// How sessions are started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Keep this many sessions running; a new one starts when one ends.
    Closed { connections: u64 },
    /// Start this many sessions per second on a fixed schedule.
    Open { rate: f64 },
}

/// Everything a thread needs to know about the run; read-only and shared.
#[derive(Debug)]
pub struct RunConfig {
    pub target: std::net::SocketAddr,
    pub mode: Mode,
    /// Warmup included.
    pub stop: Stop,
    pub warmup: Duration,
    pub threads: u64,
    pub timeout: Duration,
    pub script: Script,
    /// The DATA payload with its end-of-data line.
    pub message: Vec<u8>,
    /// Message size as counted in MB/s (end-of-data line excluded).
    pub size: u64,
    /// Send an `IntervalReport` every second.
    pub intervals: bool,
    /// Connection slots per thread in an open loop.
    pub open_slots: usize,
    /// Completions may wait for a batch up to this percentage of the recent reply time.
    pub batch_pct: f64,
    /// Busy-poll the ring instead of sleeping (`--spin`).
    pub spin: bool,
    /// Send a PROXY protocol header of this version first on every connection.
    pub proxy: Option<crate::cli::ProxyVersion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Connecting,
    Live,
    Closing,
}

struct Conn {
    gen: u16,
    fd: RawFd,
    state: State,
    session: Session,
    parser: ReplyParser,
    /// Session start: the due time in an open loop.
    start: Instant,
    connected: Instant,
    ehlo_sent: Instant,
    mail_sent: Instant,
    deadline: Instant,
    /// When we last asked for a reply (connect done, or a send queued).
    asked: Instant,
    measured: bool,
    cmd_len: usize,
    cmd_done: usize,
    msg_done: usize,
    /// A command waits for the message send to finish (sends on one socket stay in order).
    cmd_waiting: bool,
    cancel_pushed: bool,
    close_pushed: bool,
    ok: bool,
    unfinished: bool,
}

impl Conn {
    fn new(now: Instant) -> Conn {
        Conn {
            gen: 0,
            fd: -1,
            state: State::Free,
            session: Session::new(0),
            parser: ReplyParser::new(),
            start: now,
            connected: now,
            ehlo_sent: now,
            mail_sent: now,
            deadline: now,
            asked: now,
            measured: false,
            cmd_len: 0,
            cmd_done: 0,
            msg_done: 0,
            cmd_waiting: false,
            cancel_pushed: false,
            close_pushed: false,
            ok: true,
            unfinished: false,
        }
    }
}

struct Interval {
    index: u64,
    phases: PhaseSet,
    messages_accepted: u64,
    sessions_ok: u64,
    errors: u64,
    tx: Sender<IntervalReport>,
}

struct Engine {
    cfg: Arc<RunConfig>,
    t: u64,
    ring: Ring,
    conns: Vec<Conn>,
    free: Vec<u32>,
    active: usize,
    stats: ThreadStats,
    interval: Option<Interval>,
    start: Instant,
    warmup_end: Instant,
    /// Closed loop: sessions this thread may still start (`None`: until the end time).
    quota: Option<u64>,
    /// Closed loop: this thread's next session number is `t + k * threads`.
    k: u64,
    end_at: Option<Instant>,
    schedule: Option<OpenSchedule>,
    drain_deadline: Option<Instant>,
    domain: socket2::Domain,
    /// Low estimate of the time from asking to receiving a reply, nanoseconds.
    reply_ns_low: u64,
}

/// Longest the kernel may hold completions for a batch, whatever the reply times.
const BATCH_WAIT_US_MAX: f64 = 200.0;

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Runs thread `t`'s share of the run to the end and returns what it measured.
pub fn run_thread(
    t: u64,
    cfg: Arc<RunConfig>,
    start: Instant,
    tx: Option<Sender<IntervalReport>>,
) -> Result<ThreadStats> {
    let slots = match cfg.mode {
        Mode::Closed { connections } => share(connections, cfg.threads, t) as usize,
        Mode::Open { .. } => cfg.open_slots,
    };
    let addr = socket2::SockAddr::from(cfg.target);
    let ring = Ring::new(slots.max(1), addr, cfg.message.clone())
        .context("cannot set up io_uring (kernel too old, or io_uring disabled by sysctl kernel.io_uring_disabled or a seccomp profile)")?;
    // The slots are made before the start, not after it: for 8,192 open-loop slots that took
    // 1.6 ms, and the sessions due meanwhile would have started late.
    let conns: Vec<Conn> = (0..slots).map(|_| Conn::new(start)).collect();
    let free: Vec<u32> = (0..slots as u32).rev().collect();
    // Every thread starts at the same instant, so schedules and intervals line up.
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let quota = match (cfg.mode, cfg.stop) {
        (Mode::Closed { .. }, Stop::Sessions(n)) => Some(share(n, cfg.threads, t)),
        _ => None,
    };
    let end_at = match cfg.stop {
        Stop::Duration(d) => Some(start + d),
        Stop::Sessions(_) => None,
    };
    let schedule = match cfg.mode {
        Mode::Open { rate } => Some(OpenSchedule::new(rate, cfg.threads, t, cfg.stop)),
        Mode::Closed { .. } => None,
    };
    let interval = tx.map(|tx| Interval {
        index: 0,
        phases: PhaseSet::default(),
        messages_accepted: 0,
        sessions_ok: 0,
        errors: 0,
        tx,
    });
    let mut e = Engine {
        t,
        ring,
        conns,
        free,
        active: 0,
        stats: ThreadStats::default(),
        interval,
        start,
        warmup_end: start + cfg.warmup,
        quota,
        k: 0,
        end_at,
        schedule,
        drain_deadline: None,
        reply_ns_low: 0,
        domain: socket2::Domain::for_address(cfg.target),
        cfg,
    };
    e.run()?;
    Ok(e.stats)
}

impl Engine {
    fn run(&mut self) -> Result<()> {
        let mut cqes: Vec<Completion> = Vec::with_capacity(1024);
        let tick =
            (self.cfg.timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let mut next_check = Instant::now() + tick;
        loop {
            let now = Instant::now();
            let more = self.start_due(now);
            if now >= next_check {
                self.check_deadlines(now);
                next_check = now + tick;
            }
            if !more {
                // A timed run ends soon after its time: sessions still running one --timeout
                // later are abandoned (counted as unfinished). A counted run (--sessions) lets
                // every session finish; each is bounded by its per-reply timeouts anyway.
                if matches!(self.cfg.stop, Stop::Duration(_)) {
                    let drain = *self.drain_deadline.get_or_insert(now + self.cfg.timeout);
                    if now >= drain {
                        self.abandon_all(now)?;
                    }
                }
                if self.active == 0 && self.ring.in_flight() == 0 {
                    break;
                }
            }
            self.tick_interval(now, false);
            let mut wake = next_check;
            if let Some(s) = &self.schedule {
                // With every slot busy, a due session waits for a close, not for the clock.
                if let Some((_, due)) = s.peek().filter(|_| !self.free.is_empty()) {
                    wake = wake.min(self.start + due);
                }
            }
            if let Some(iv) = &self.interval {
                wake = wake.min(self.start + Duration::from_secs(iv.index + 1));
            }
            if let Some(d) = self.drain_deadline {
                wake = wake.min(d);
            }
            let wait = wake.saturating_duration_since(now);
            let batch_us = self.batch_wait_us();
            self.stats.batch_wait_us_max = self.stats.batch_wait_us_max.max(u64::from(batch_us));
            if self.cfg.spin {
                // Submit and collect without sleeping, until something completes or the next
                // timed event is due.
                loop {
                    self.ring.poll().context("io_uring poll failed")?;
                    self.ring.reap(&mut cqes);
                    let polled = Instant::now();
                    self.stats.stalls.poll(polled);
                    if !cqes.is_empty() || polled >= wake {
                        break;
                    }
                    std::hint::spin_loop();
                }
                // Handling what the poll found is work, not a stall.
                self.stats.stalls.resume();
            } else {
                self.ring
                    .submit_and_wait(Some(wait), self.active, batch_us)
                    .context("io_uring wait failed")?;
                self.ring.reap(&mut cqes);
            }
            let now = Instant::now();
            for c in cqes.drain(..) {
                self.complete(c, now)?;
            }
        }
        self.tick_interval(Instant::now(), true);
        Ok(())
    }

    /// How long the kernel may hold completions to hand them over in a batch: `batch_pct` of
    /// a low estimate of the recent reply time, so a reply is seen late by at most about that
    /// fraction of what it measures. Under load (replies take milliseconds) this saves many
    /// wake-ups, and so much of the generator's CPU; with one session in flight it is zero.
    fn batch_wait_us(&self) -> u32 {
        if self.cfg.batch_pct <= 0.0 || self.active < 2 {
            return 0;
        }
        let us = self.reply_ns_low as f64 * self.cfg.batch_pct / 100.0 / 1000.0;
        us.min(BATCH_WAIT_US_MAX) as u32
    }

    /// Starts every session that is due; returns whether more will be started later.
    fn start_due(&mut self, now: Instant) -> bool {
        if let Some(mut sched) = self.schedule.take() {
            while let Some((n, due)) = sched.peek() {
                let due_at = self.start + due;
                if due_at > now {
                    break;
                }
                // No free slot: the session waits, and its latency still counts from `due_at`.
                let Some(slot) = self.free.pop() else { break };
                self.start_session(slot, n, due_at, now);
                sched.advance();
            }
            let more = sched.peek().is_some();
            self.schedule = Some(sched);
            return more;
        }
        loop {
            let can = match (self.quota, self.end_at) {
                (Some(q), _) => self.k < q,
                (None, Some(end)) => now < end,
                (None, None) => false,
            };
            if !can {
                return false;
            }
            let Some(slot) = self.free.pop() else {
                return true;
            };
            let n = self.t + self.k * self.cfg.threads;
            self.k += 1;
            self.start_session(slot, n, now, now);
        }
    }

    fn start_session(&mut self, slot: u32, n: u64, start: Instant, now: Instant) {
        let measured = start >= self.warmup_end;
        let c = &mut self.conns[slot as usize];
        c.state = State::Connecting;
        c.session = Session::new(n);
        c.parser.reset();
        c.start = start;
        c.deadline = now + self.cfg.timeout;
        c.measured = measured;
        c.cmd_len = 0;
        c.cmd_done = 0;
        c.msg_done = 0;
        c.cmd_waiting = false;
        c.cancel_pushed = false;
        c.close_pushed = false;
        c.ok = true;
        c.unfinished = false;
        self.active += 1;
        let sock = socket2::Socket::new(self.domain, socket2::Type::STREAM, None)
            .and_then(|s| s.set_nodelay(true).map(|_| s));
        match sock {
            Ok(s) => {
                let fd = s.into_raw_fd();
                c.fd = fd;
                let gen = c.gen;
                if let Err(e) = self.ring.connect(slot, gen, fd) {
                    self.broken(
                        slot,
                        ErrorKind::from_errno(e.raw_os_error().unwrap_or(0)),
                        now,
                    );
                }
            }
            Err(e) => {
                c.fd = -1;
                self.broken(
                    slot,
                    ErrorKind::from_errno(e.raw_os_error().unwrap_or(0)),
                    now,
                );
            }
        }
    }

    fn complete(&mut self, c: Completion, now: Instant) -> Result<()> {
        if c.kind == OpKind::Cancel {
            return Ok(());
        }
        let slot = c.slot;
        let conn = &mut self.conns[slot as usize];
        debug_assert_eq!(
            conn.gen, c.gen,
            "a slot is reused only after its close completed"
        );
        if c.kind == OpKind::Close {
            self.finish_session(slot, now);
            return Ok(());
        }
        if conn.state == State::Closing {
            return self.maybe_close(slot);
        }
        let (fd, gen) = (conn.fd, conn.gen);
        if c.result < 0 {
            self.broken(slot, ErrorKind::from_errno(-c.result), now);
            return Ok(());
        }
        let res = c.result as usize;
        if res == 0 && matches!(c.kind, OpKind::SendCmd | OpKind::SendMessage) {
            // A stream socket that takes no bytes of a non-empty send is gone.
            self.broken(slot, ErrorKind::Reset, now);
            return Ok(());
        }
        match c.kind {
            OpKind::Connect => {
                conn.connected = now;
                conn.asked = now;
                conn.state = State::Live;
                conn.deadline = now + self.cfg.timeout;
                if conn.measured {
                    self.stats
                        .phases
                        .record(Phase::Connect, us(now - conn.start));
                    if let Some(iv) = &mut self.interval {
                        iv.phases.record(Phase::Connect, us(now - conn.start));
                    }
                }
                if let Some(version) = self.cfg.proxy {
                    // As a load balancer would: the client's address first, then its session.
                    let client = match crate::uring::local_addr(fd) {
                        Ok(a) => a,
                        Err(e) => {
                            self.broken(
                                slot,
                                ErrorKind::from_errno(e.raw_os_error().unwrap_or(0)),
                                now,
                            );
                            return Ok(());
                        }
                    };
                    let cmd = self.ring.cmd_mut(slot);
                    cmd.clear();
                    crate::proxy::header(version, client, self.cfg.target, cmd);
                    conn.cmd_len = cmd.len();
                    conn.cmd_done = 0;
                    self.ring.send_cmd(slot, gen, fd, 0)?;
                }
                self.ring.recv(slot, gen, fd)?;
            }
            OpKind::SendCmd => {
                conn.cmd_done += res;
                if conn.cmd_done < conn.cmd_len {
                    let off = conn.cmd_done;
                    self.ring.send_cmd(slot, gen, fd, off)?;
                }
            }
            OpKind::SendMessage => {
                conn.msg_done += res;
                if conn.msg_done < self.ring.message_len() {
                    let off = conn.msg_done;
                    self.ring.send_message(slot, gen, fd, off)?;
                } else if conn.cmd_waiting {
                    conn.cmd_waiting = false;
                    self.ring.send_cmd(slot, gen, fd, 0)?;
                }
            }
            OpKind::Recv if res == 0 => {
                if conn.session.closing_is_fine() {
                    // The server closed after QUIT without (or before we read) its 221: fine.
                    let ok = conn.session.errors == 0;
                    self.teardown(slot, ok)?;
                } else {
                    self.broken(slot, ErrorKind::Closed, now);
                }
            }
            OpKind::Recv => self.received(slot, res, now)?,
            OpKind::Cancel | OpKind::Close => unreachable!(),
        }
        Ok(())
    }

    /// Feeds received bytes to the parser and the session, and queues what they ask for.
    fn received(&mut self, slot: u32, len: usize, now: Instant) -> Result<()> {
        let cfg = Arc::clone(&self.cfg);
        let cmd_busy = self.ring.op_busy(slot, OpKind::SendCmd);
        let (input, mut cmd) = self.ring.recv_and_cmd(slot, len, cmd_busy);
        let conn = &mut self.conns[slot as usize];
        // A low estimate of the reply time: follows a faster reply at once and a slower one
        // only slowly, so the batch window stays small next to the fastest replies (EHLO), not
        // just the average (which slow end-of-data replies dominate).
        let sample = (now - conn.asked).as_nanos() as u64;
        if sample < self.reply_ns_low || self.reply_ns_low == 0 {
            self.reply_ns_low = sample;
        } else {
            self.reply_ns_low += (sample - self.reply_ns_low) / 32;
        }
        let mut pos = 0;
        // The first action other than Wait; at most one per read is legitimate.
        let mut next: Option<Action> = None;
        while pos < input.len() {
            let (used, r) = conn.parser.feed(&input[pos..]);
            pos += used;
            let mut text = None;
            let o = match r {
                None => break,
                Some(Err(e)) => {
                    let got: String = String::from_utf8_lossy(&input[pos - used..pos])
                        .chars()
                        .take(60)
                        .collect();
                    text = Some(format!("{e}: {got:?}"));
                    conn.session.on_garbage()
                }
                // A reply while our previous command is still being sent, or a second reply
                // where one was due: the server is not following the protocol.
                Some(Ok(_)) if cmd_busy || next.is_some() => {
                    text = Some(format!("unexpected extra reply {:?}", conn.parser.text()));
                    conn.session.on_garbage()
                }
                Some(Ok(reply)) => {
                    let cmd = cmd.as_deref_mut().expect("command buffer is free");
                    cmd.clear();
                    let o = conn
                        .session
                        .on_reply(&cfg.script, reply.code, reply.pipelining, cmd);
                    if o.error.is_some() {
                        text = Some(format!("{:?}", conn.parser.text()));
                    }
                    o
                }
            };
            apply(
                &mut self.stats,
                &mut self.interval,
                &cfg,
                conn,
                &o,
                now,
                text.as_deref(),
            );
            if o.action == Action::Close {
                next = Some(Action::Close);
                break;
            }
            if o.action != Action::Wait {
                next = Some(o.action);
            }
        }
        let cmd_len = cmd.map_or(0, |c| c.len());
        let (fd, gen) = (conn.fd, conn.gen);
        conn.deadline = now + self.cfg.timeout;
        match next {
            Some(Action::Close) => {
                let ok = conn.session.errors == 0;
                return self.teardown(slot, ok);
            }
            Some(Action::Send) => {
                conn.asked = now;
                conn.cmd_len = cmd_len;
                conn.cmd_done = 0;
                if self.ring.op_busy(slot, OpKind::SendMessage) {
                    conn.cmd_waiting = true;
                } else {
                    self.ring.send_cmd(slot, gen, fd, 0)?;
                }
            }
            Some(Action::SendMessage) => {
                conn.asked = now;
                conn.msg_done = 0;
                self.ring.send_message(slot, gen, fd, 0)?;
            }
            Some(Action::Wait) | None => {}
        }
        self.ring.recv(slot, gen, fd)?;
        Ok(())
    }

    /// The connection failed (errno, EOF, timeout): count it and close.
    fn broken(&mut self, slot: u32, kind: ErrorKind, now: Instant) {
        let conn = &mut self.conns[slot as usize];
        let o = conn.session.on_broken(kind);
        apply(
            &mut self.stats,
            &mut self.interval,
            &self.cfg,
            conn,
            &o,
            now,
            None,
        );
        // Teardown pushes ring ops; a failure to push is reported on the next one.
        let _ = self.teardown(slot, false);
    }

    fn teardown(&mut self, slot: u32, ok: bool) -> Result<()> {
        let conn = &mut self.conns[slot as usize];
        if conn.state == State::Closing {
            return Ok(());
        }
        conn.state = State::Closing;
        conn.ok &= ok;
        if self.ring.slot_busy(slot) && !conn.cancel_pushed {
            conn.cancel_pushed = true;
            let (fd, gen) = (conn.fd, conn.gen);
            self.ring.cancel_fd(slot, gen, fd)?;
        }
        self.maybe_close(slot)
    }

    fn maybe_close(&mut self, slot: u32) -> Result<()> {
        let conn = &mut self.conns[slot as usize];
        if conn.close_pushed || self.ring.slot_busy(slot) {
            return Ok(());
        }
        conn.close_pushed = true;
        let (fd, gen) = (conn.fd, conn.gen);
        if fd < 0 {
            // The socket was never created: nothing to close.
            self.finish_session(slot, Instant::now());
            return Ok(());
        }
        self.ring.close(slot, gen, fd)?;
        Ok(())
    }

    fn finish_session(&mut self, slot: u32, now: Instant) {
        let conn = &mut self.conns[slot as usize];
        let counts = &mut self.stats.counts;
        if !conn.measured {
            counts.warmup_sessions += 1;
        } else if conn.unfinished {
            counts.sessions_unfinished += 1;
        } else if conn.ok {
            counts.sessions_ok += 1;
            let v = us(now - conn.start);
            self.stats.phases.record(Phase::Session, v);
            self.stats.last_end_ns = self
                .stats
                .last_end_ns
                .max((now - self.start).as_nanos() as u64);
            if let Some(iv) = &mut self.interval {
                iv.phases.record(Phase::Session, v);
                iv.sessions_ok += 1;
            }
        } else {
            counts.sessions_failed += 1;
            self.stats.last_end_ns = self
                .stats
                .last_end_ns
                .max((now - self.start).as_nanos() as u64);
        }
        conn.state = State::Free;
        conn.fd = -1;
        conn.gen = conn.gen.wrapping_add(1);
        self.free.push(slot);
        self.active -= 1;
    }

    fn check_deadlines(&mut self, now: Instant) {
        for slot in 0..self.conns.len() as u32 {
            let c = &self.conns[slot as usize];
            if matches!(c.state, State::Connecting | State::Live) && c.deadline <= now {
                self.broken(slot, ErrorKind::Timeout, now);
            }
        }
    }

    /// The drain deadline passed: end the sessions still running without counting errors.
    fn abandon_all(&mut self, _now: Instant) -> Result<()> {
        for slot in 0..self.conns.len() as u32 {
            let c = &mut self.conns[slot as usize];
            if matches!(c.state, State::Connecting | State::Live) {
                c.unfinished = true;
                self.teardown(slot, false)?;
            }
        }
        Ok(())
    }

    fn tick_interval(&mut self, now: Instant, last: bool) {
        let Some(iv) = &mut self.interval else { return };
        let boundary = self.start + Duration::from_secs(iv.index + 1);
        if now < boundary && !last {
            return;
        }
        let report = IntervalReport {
            thread: self.t as usize,
            index: iv.index,
            phases: iv.phases.clone(),
            messages_accepted: iv.messages_accepted,
            sessions_ok: iv.sessions_ok,
            errors: iv.errors,
        };
        // The receiver only goes away when the run is over.
        let _ = iv.tx.send(report);
        iv.phases.reset();
        iv.messages_accepted = 0;
        iv.sessions_ok = 0;
        iv.errors = 0;
        iv.index = (now.saturating_duration_since(self.start))
            .as_secs()
            .max(iv.index + 1);
    }
}

/// One line saying which session failed where, and what the server said.
fn example(
    n: u64,
    kind: ErrorKind,
    step: Step,
    state: State,
    timeout: Duration,
    text: Option<&str>,
) -> String {
    let at = if state == State::Connecting {
        "connect".to_string()
    } else {
        format!("waiting for the reply to {}", step.name())
    };
    match (kind, text) {
        (ErrorKind::Timeout, _) => format!("session {n}: timeout {at} ({timeout:?})"),
        (ErrorKind::Reply(_), Some(t)) => format!("session {n}: {} answered {t}", step.name()),
        (ErrorKind::Protocol, Some(t)) => format!("session {n}: after {}: {t}", step.name()),
        (k, _) => format!("session {n}: {k} {at}"),
    }
}

/// Timestamps and counts what a reply (or a broken connection) meant.
fn apply(
    stats: &mut ThreadStats,
    interval: &mut Option<Interval>,
    cfg: &RunConfig,
    conn: &mut Conn,
    o: &Outcome,
    now: Instant,
    text: Option<&str>,
) {
    let measured = conn.measured;
    let e = o.events;
    let mut record = |phase: Phase, v: u64| {
        if measured {
            stats.phases.record(phase, v);
            if let Some(iv) = interval.as_mut() {
                iv.phases.record(phase, v);
            }
        }
    };
    if e & ev::GREETED != 0 {
        record(Phase::Banner, us(now - conn.connected));
    }
    if e & ev::EHLO_SENT != 0 {
        conn.ehlo_sent = now;
    }
    if e & ev::EHLO_DONE != 0 {
        record(Phase::Ehlo, us(now - conn.ehlo_sent));
    }
    if e & ev::ACCEPTED != 0 {
        record(Phase::Transaction, us(now - conn.mail_sent));
    }
    if e & ev::EHLO_DONE != 0 {
        stats.counts.server_pipelining |= conn.session.server_pipelining();
    }
    if e & ev::ACCEPTED != 0 {
        if measured {
            stats.counts.messages_accepted += 1;
            stats.counts.bytes_accepted += cfg.size;
            if let Some(iv) = interval.as_mut() {
                iv.messages_accepted += 1;
            }
        } else {
            stats.counts.warmup_messages_accepted += 1;
        }
    }
    if e & ev::FAILED != 0 && measured {
        stats.counts.messages_failed += 1;
    }
    if e & ev::MAIL_SENT != 0 {
        conn.mail_sent = now;
    }
    if let Some((kind, step)) = o.error {
        conn.ok = false;
        if !measured {
            stats.counts.warmup_errors += 1;
            return;
        }
        if let Some(iv) = interval.as_mut() {
            iv.errors += 1;
        }
        let n = conn.session.n;
        let state = conn.state;
        stats
            .errors
            .add(kind, || example(n, kind, step, state, cfg.timeout, text));
    }
}
