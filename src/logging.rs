//! Where log lines go and what they look like: stderr, one line per event, through `tracing`.
//!
//! A worker thread buffers its lines and writes them from its loop (`flush_thread`), so a busy
//! core makes few write(2) calls instead of one per event. The profile of shape (a) in
//! BENCHMARKS.md showed an unbuffered write per "message accepted" and "session end" line costing
//! about 9% of the server's CPU; one write per loop turn still cost about 3% in shape (c), where
//! a turn often carries a single line. So a turn writes its lines at once only if the thread's
//! last write was at least `--log-flush-ms` ago (20 ms by default; a quiet server's lines appear
//! at the end of the turn that produced them), or once `FLUSH_AT` bytes are pending; otherwise
//! they wait for a
//! later turn, which comes at the latest with the worker's timer tick (250 ms). A worker hands
//! everything left over when it stops (`flush_now`, and again when the thread ends).
//!
//! No worker waits for the log output. `init` starts one writer thread that does every write(2);
//! a worker's turn only hands its buffer over a channel. A write(2) to stderr blocks when stderr
//! is a pipe whose reader has stopped (a stuck journald, a paused `| less`): once the pipe's 64
//! KiB were full, a worker that wrote its own lines stopped in that write, and with it every
//! session of its core, for as long as the reader was away (`tests/hardening`,
//! `a_log_reader_that_stops_reading_does_not_stop_the_server`). A file can block a write too, if
//! less often. What the workers handed over and the writer has not written yet is bounded by
//! `QUEUE_MAX` bytes; past it their lines are dropped and counted, and the writer reports the
//! count in a WARN line of its own once it writes again. Lines of other threads (start-up,
//! signals, the exit summary) are never dropped. `LogGuard`, dropped at the end of `main`, lets
//! the writer finish the queue (waiting at most `DRAIN_WAIT`) before the process exits.
//!
//! `LineFormat` formats each event into the line tracing-subscriber's default format would
//! print without colours and targets (`2026-11-24T12:26:00.358728Z  INFO message queue_id=...
//! client=... size=102400 result="stored"`), at a fraction of its cost: the date and time up to
//! the second are formatted once per second and per thread, integers and plain strings are
//! copied without going through `core::fmt`, and nothing is allocated per event. After the
//! buffering above, formatting was the larger half of what logging still cost (about 4.5% of
//! the server's CPU in shape (c)). Every control character in a message or field value is
//! escaped, so a client cannot forge lines or send terminal escapes through its envelope. ringmx
//! opens no spans; a span's fields would not be printed.
use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self as tfmt, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// A buffered thread writes early once this much is pending, keeping its buffer bounded.
const FLUSH_AT: usize = 32 * 1024;
/// Bytes of the workers' lines the writer thread may have queued; past this they are dropped.
/// About three seconds of the log of a core at full load (two lines of ~200 bytes per message).
const QUEUE_MAX: usize = 16 << 20;
/// How long `LogGuard` waits at exit for the writer to finish the queue.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// The writer reports dropped lines at most this often.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);
/// The default of `--log-flush-ms`, used by the tests here.
#[cfg(test)]
const FLUSH_EVERY: Duration = Duration::from_millis(crate::config::DEFAULT_LOG_FLUSH_MS);

thread_local! {
    static BUF: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// A thread's unwritten lines; written out when the thread ends, so none are lost on exit.
struct Pending {
    buf: Vec<u8>,
    /// When this thread last wrote; `None` before its first write.
    written: Option<Instant>,
    /// A loop turn writes pending lines only if the last write is at least this old.
    every: Duration,
}

impl Pending {
    /// Lines are pending and the thread's last write is at least `every` old.
    fn due(&self) -> bool {
        !self.buf.is_empty() && self.written.is_none_or(|t| t.elapsed() >= self.every)
    }

    fn write_out(&mut self) {
        if !self.buf.is_empty() {
            let lines = std::mem::replace(&mut self.buf, Vec::with_capacity(8 * 1024));
            hand_over(lines, true);
            self.written = Some(Instant::now());
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.write_out();
    }
}

/// From now on this thread's log lines wait for `flush_thread`, which writes them at most
/// every `every` (`--log-flush-ms`; zero: at the end of every turn that has lines).
pub fn buffer_this_thread(every: Duration) {
    BUF.with(|b| {
        *b.borrow_mut() = Some(Pending {
            buf: Vec::with_capacity(8 * 1024),
            written: None,
            every,
        })
    });
}

/// True when `flush_thread` would hand lines over now.
#[cfg(test)]
fn write_due() -> bool {
    BUF.with(|b| b.borrow().as_ref().is_some_and(Pending::due))
}

/// End of a loop turn: hands this thread's pending lines to the writer unless it did less than
/// its interval ago (see the module docs).
pub fn flush_thread() {
    BUF.with(|b| {
        if let Some(p) = b.borrow_mut().as_mut() {
            if p.due() {
                p.write_out();
            }
        }
    });
}

/// Writes this thread's pending lines, if any, now.
pub fn flush_now() {
    BUF.with(|b| {
        if let Some(p) = b.borrow_mut().as_mut() {
            p.write_out();
        }
    });
}

/// Bytes waiting in this thread's buffer.
pub fn pending_bytes() -> usize {
    BUF.with(|b| b.borrow().as_ref().map_or(0, |p| p.buf.len()))
}

/// The `tracing_subscriber` writer: stderr, buffered on threads that asked for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One event's output.
pub struct Line;

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let buffered = BUF.with(|b| match b.borrow_mut().as_mut() {
            Some(p) => {
                p.buf.extend_from_slice(data);
                if p.buf.len() >= FLUSH_AT {
                    p.write_out();
                }
                true
            }
            None => false,
        });
        if !buffered {
            hand_over(data.to_vec(), false);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Installs the process-wide subscriber: events that `filter` lets through, formatted by
/// `LineFormat`, written to stderr by the writer thread started here. Keep the guard until the
/// end of `main`: dropping it lets the writer finish.
pub fn init(filter: EnvFilter) -> LogGuard {
    let (queue, done) = LogQueue::spawn(Box::new(io::stderr()), QUEUE_MAX);
    let guard = LogGuard {
        queue: queue.clone(),
        done,
    };
    let _ = QUEUE.set(queue);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .event_format(LineFormat)
        .init();
    guard
}

/// The process's writer thread, once `init` started it.
static QUEUE: OnceLock<LogQueue> = OnceLock::new();

/// Gives `lines` to the writer thread, or writes them here when there is none (tests, or after
/// the guard stopped it). `lossy`: a worker's lines, dropped and counted when the queue is full.
fn hand_over(lines: Vec<u8>, lossy: bool) {
    match QUEUE.get() {
        Some(q) => q.send(lines, lossy),
        None => {
            let _ = io::stderr().write_all(&lines);
        }
    }
}

enum Msg {
    Lines(Vec<u8>),
    Stop,
}

/// The sending side of a writer thread: an unbounded channel whose queued bytes are counted, so
/// that lossy senders can be refused past the limit.
#[derive(Clone)]
struct LogQueue {
    tx: mpsc::Sender<Msg>,
    counts: Arc<Counts>,
    limit: usize,
}

#[derive(Default)]
struct Counts {
    /// Bytes sent and not yet written.
    queued: AtomicUsize,
    /// Lines refused because the queue was full.
    dropped: AtomicU64,
}

impl LogQueue {
    /// Starts a thread writing what is sent to `sink`, in order. The receiver gets a message
    /// when the thread has finished (after `Msg::Stop`, or when every sender is gone).
    fn spawn(mut sink: Box<dyn Write + Send>, limit: usize) -> (LogQueue, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel::<Msg>();
        let (done_tx, done) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let theirs = counts.clone();
        let spawned = std::thread::Builder::new()
            .name("ringmx-log".into())
            .spawn(move || {
                // Signals are for the signal thread: this thread starts before the server blocks
                // SIGTERM/SIGINT, and one delivered here would take the default action and end
                // the process without a shutdown.
                let _ = nix::sys::signal::SigSet::all().thread_block();
                let mut reported = 0u64;
                // When the writer first saw drops it has not reported yet.
                let mut unreported_since: Option<Instant> = None;
                let mut stopping = false;
                loop {
                    // After Stop, whatever was sent before the channel noticed is written too.
                    let msg = if stopping {
                        rx.try_recv().ok()
                    } else {
                        rx.recv().ok()
                    };
                    let lines = match msg {
                        Some(Msg::Lines(lines)) => lines,
                        Some(Msg::Stop) => {
                            stopping = true;
                            continue;
                        }
                        None => break,
                    };
                    let _ = sink.write_all(&lines);
                    let left =
                        theirs.queued.fetch_sub(lines.len(), Ordering::Relaxed) - lines.len();
                    let dropped = theirs.dropped.load(Ordering::Relaxed);
                    if dropped > reported {
                        // The count follows the lines queued before the drops: once the queue is
                        // written, or after DROP_REPORT_EVERY if it never empties.
                        let since = *unreported_since.get_or_insert_with(Instant::now);
                        if left == 0 || since.elapsed() >= DROP_REPORT_EVERY {
                            let _ = sink.write_all(drop_report(dropped - reported).as_bytes());
                            reported = dropped;
                            unreported_since = None;
                        }
                    }
                }
                // From here on a send fails and its sender writes the lines itself: nothing sent
                // after the queue was drained is lost in a receiver that nobody reads.
                drop(rx);
                let dropped = theirs.dropped.load(Ordering::Relaxed);
                if dropped > reported {
                    let _ = sink.write_all(drop_report(dropped - reported).as_bytes());
                }
                let _ = sink.flush();
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            // Without the thread every send fails and is written by the sender itself.
            let _ = writeln!(
                io::stderr(),
                "ringmx: no log writer thread ({e}); logging inline"
            );
        }
        (LogQueue { tx, counts, limit }, done)
    }

    fn send(&self, lines: Vec<u8>, lossy: bool) {
        let n = lines.len();
        let queued = self.counts.queued.fetch_add(n, Ordering::Relaxed);
        if lossy && queued + n > self.limit {
            self.counts.queued.fetch_sub(n, Ordering::Relaxed);
            let count = memchr::memchr_iter(b'\n', &lines).count().max(1);
            self.counts
                .dropped
                .fetch_add(count as u64, Ordering::Relaxed);
            return;
        }
        if let Err(mpsc::SendError(Msg::Lines(lines))) = self.tx.send(Msg::Lines(lines)) {
            // The writer has stopped: write here, as before there was one.
            self.counts.queued.fetch_sub(n, Ordering::Relaxed);
            let _ = io::stderr().write_all(&lines);
        }
    }
}

/// The writer's line about lines it never got, in the format of the others.
fn drop_report(count: u64) -> String {
    let mut line = String::new();
    let _ = write_time(&mut line, SystemTime::now());
    let _ = writeln!(
        line,
        "  WARN log output fell behind; lines dropped so the workers did not wait for it \
         dropped_lines={count}"
    );
    line
}

/// Returned by `init`; on drop, the writer finishes what is queued (waiting at most
/// `DRAIN_WAIT`, should the output be stuck) and stops.
pub struct LogGuard {
    queue: LogQueue,
    done: mpsc::Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush_now();
        if self.queue.tx.send(Msg::Stop).is_ok() {
            let _ = self.done.recv_timeout(DRAIN_WAIT);
        }
    }
}

/// One line per event: the UTC time to the microsecond, the level padded to five characters,
/// the message, then each field as `name=value` (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct LineFormat;

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: tfmt::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write_line(&mut writer, SystemTime::now(), event)
    }
}

/// Formats `event` as of `now` into `w`, newline included.
fn write_line(w: &mut dyn fmt::Write, now: SystemTime, event: &Event<'_>) -> fmt::Result {
    write_time(w, now)?;
    w.write_str(level_str(event.metadata().level()))?;
    let mut fields = Fields {
        w,
        first: true,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    fields.w.write_char('\n')
}

fn level_str(level: &Level) -> &'static str {
    // The separating spaces are part of the strings: tracing-subscriber pads levels to five
    // characters, right-aligned, after one space.
    match *level {
        Level::ERROR => " ERROR ",
        Level::WARN => "  WARN ",
        Level::INFO => "  INFO ",
        Level::DEBUG => " DEBUG ",
        Level::TRACE => " TRACE ",
    }
}

thread_local! {
    /// The second last formatted on this thread and its text, `YYYY-MM-DDTHH:MM:SS.`.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// `2026-11-24T12:26:00.358728Z` (RFC 3339, UTC, microseconds), as tracing-subscriber prints it.
fn write_time(w: &mut dyn fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut text) = SECOND.with(Cell::get);
    if cached != secs {
        text = second_text(secs);
        SECOND.with(|c| c.set((secs, text)));
    }
    let mut out = [0u8; 27];
    out[..20].copy_from_slice(&text);
    let mut micros = since.subsec_micros();
    for i in (20..26).rev() {
        out[i] = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out[26] = b'Z';
    w.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
}

/// The date and time of `secs` since the epoch, up to and including the dot before the fraction.
fn second_text(secs: u64) -> [u8; 20] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = crate::date::civil_from_days(days);
    let mut t = [0u8; 20];
    let year = year.clamp(0, 9999) as u32;
    let digits = |t: &mut [u8], v: u32| {
        let n = t.len();
        let mut v = v;
        for i in (0..n).rev() {
            t[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    digits(&mut t[0..4], year);
    t[4] = b'-';
    digits(&mut t[5..7], month);
    t[7] = b'-';
    digits(&mut t[8..10], day);
    t[10] = b'T';
    digits(&mut t[11..13], (rem / 3600) as u32);
    t[13] = b':';
    digits(&mut t[14..16], (rem / 60 % 60) as u32);
    t[16] = b':';
    digits(&mut t[17..19], (rem % 60) as u32);
    t[19] = b'.';
    t
}

/// Writes an event's fields: the message bare, every other field as ` name=value`.
struct Fields<'a> {
    w: &'a mut dyn fmt::Write,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    /// The separator and, except for the message, `name=`.
    fn start(&mut self, field: &Field) -> fmt::Result {
        if !self.first {
            self.w.write_char(' ')?;
        }
        self.first = false;
        let name = field.name();
        if name != "message" {
            self.w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
            self.w.write_char('=')?;
        }
        Ok(())
    }

    fn record(&mut self, field: &Field, body: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.start(field).and_then(|()| body(self.w));
        }
    }
}

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, |w| write_u64(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, |w| {
            if value < 0 {
                w.write_char('-')?;
            }
            write_u64(w, value.unsigned_abs())
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let message = field.name() == "message";
        self.record(field, |w| {
            if message {
                Escaped(w).write_str(value)
            } else if value
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
            {
                // The common case, quoted as `{:?}` would quote it, without its machinery.
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            } else {
                write!(Escaped(w), "{value:?}")
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, |w| write!(Escaped(w), "{value:?}"));
    }
}

/// Writes `v` in decimal.
fn write_u64(w: &mut dyn fmt::Write, v: u64) -> fmt::Result {
    let mut buf = [0; 20];
    let digits = crate::protocol::reply::decimal(v, &mut buf);
    w.write_str(std::str::from_utf8(digits).map_err(|_| fmt::Error)?)
}

/// Passes text through with every control character (C0, DEL, C1) written as an escape, so a
/// value can neither end the line early nor reach a terminal as an escape sequence.
struct Escaped<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| c.is_control()) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().expect("found at i");
            write!(self.0, "\\u{{{:x}}}", c as u32)?;
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_buffered_thread_holds_lines_until_its_turn_ends() {
        std::thread::spawn(|| {
            buffer_this_thread(FLUSH_EVERY);
            Line.write_all(b"logging test: a buffered line\n").unwrap();
            assert_eq!(pending_bytes(), 30);
            flush_thread();
            assert_eq!(pending_bytes(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_buffer_never_grows_past_its_bound() {
        std::thread::spawn(|| {
            buffer_this_thread(FLUSH_EVERY);
            // Spaces, so the early write leaves no visible noise in the test output.
            let chunk = [b' '; 1000];
            for _ in 0..100 {
                Line.write_all(&chunk).unwrap();
                assert!(pending_bytes() < FLUSH_AT);
            }
            flush_thread();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_busy_thread_writes_at_most_every_flush_interval() {
        std::thread::spawn(|| {
            buffer_this_thread(FLUSH_EVERY);
            Line.write_all(b"logging test: first line\n").unwrap();
            flush_thread();
            assert_eq!(pending_bytes(), 0, "the first turn writes at once");
            Line.write_all(b"logging test: second line\n").unwrap();
            assert!(!write_due(), "a turn right after a write is not due");
            flush_thread();
            assert_eq!(
                pending_bytes(),
                26,
                "a turn right after a write keeps its lines"
            );
            std::thread::sleep(FLUSH_EVERY);
            assert!(write_due(), "a turn after the interval is due");
            flush_thread();
            assert_eq!(pending_bytes(), 0, "a later turn writes them");
            Line.write_all(b"logging test: third line\n").unwrap();
            flush_now();
            assert_eq!(pending_bytes(), 0, "flush_now always writes");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_threads_write_directly() {
        std::thread::spawn(|| {
            Line.write_all(b"").unwrap();
            assert_eq!(pending_bytes(), 0);
        })
        .join()
        .unwrap();
    }

    /// Collects what a subscriber writes, for comparing formats.
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    /// What the events `f` logs on this thread print in the server's format (other modules'
    /// tests use it to check their log lines).
    pub(crate) fn captured(f: impl FnOnce()) -> String {
        printed(true, f)
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    impl Write for Capture {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The events the worker logs most, plus the awkward cases.
    fn emit_samples() {
        let peer: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let to = vec!["rcpt@example.net".to_string(), "b@example.org".to_string()];
        tracing::info!(
            queue_id = %"6B0F27A7D1195P3A49W0Q0",
            client = %peer,
            from = %"sender@example.com",
            to = ?to,
            size = 102400usize,
            result = "stored",
            "message"
        );
        tracing::info!(
            client = %peer,
            duration_ms = 12u64,
            messages = 1u32,
            errors = 0u32,
            result = "closed",
            "session end"
        );
        tracing::warn!(
            delta = -5i64,
            ok = true,
            "unexpected errno {} from recv",
            104
        );
        tracing::error!(worker = 0usize, "waiting on the ring failed");
        tracing::info!(note = "say \"hi\" \\ there", "quotes");
    }

    /// What the events of `f` print through our `LineFormat` (`ours`) or through
    /// tracing-subscriber's default format as the server used to configure it.
    fn printed(ours: bool, f: impl FnOnce()) -> String {
        let cap = Capture::default();
        let fmt = tracing_subscriber::fmt().with_writer(cap.clone());
        if ours {
            tracing::subscriber::with_default(fmt.event_format(LineFormat).finish(), f);
        } else {
            let sub = fmt.with_ansi(false).with_target(false).finish();
            tracing::subscriber::with_default(sub, f);
        }
        let out = cap.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    /// Lines with their 27-character timestamps cut off.
    fn without_time(out: &str) -> Vec<String> {
        out.lines().map(|l| l[27..].to_string()).collect()
    }

    #[test]
    fn lines_match_what_the_default_format_printed() {
        let ours = without_time(&printed(true, emit_samples));
        let theirs = without_time(&printed(false, emit_samples));
        assert_eq!(ours.len(), 5);
        assert_eq!(ours, theirs);
        assert_eq!(
            ours[0],
            "  INFO message queue_id=6B0F27A7D1195P3A49W0Q0 client=192.0.2.7 \
             from=sender@example.com to=[\"rcpt@example.net\", \"b@example.org\"] size=102400 \
             result=\"stored\""
        );
    }

    #[test]
    fn control_characters_in_values_are_escaped() {
        let out = printed(true, || {
            tracing::info!(from = %"a\x1b[31mb\nINFO forged\u{9b}c", "msg\rx");
        });
        assert_eq!(out.lines().count(), 1, "{out:?}");
        assert!(
            out.ends_with("  INFO msg\\u{d}x from=a\\u{1b}[31mb\\u{a}INFO forged\\u{9b}c\n"),
            "{out:?}"
        );
    }

    /// A sink that writes nothing until `open` is sent, then keeps what it gets in `got`.
    struct Gate {
        open: Option<mpsc::Receiver<()>>,
        got: Capture,
    }

    impl Write for Gate {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if let Some(open) = self.open.take() {
                let _ = open.recv();
            }
            self.got.write(data)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_log_output_drops_worker_lines_past_the_limit_and_says_how_many() {
        let (open_tx, open_rx) = mpsc::channel();
        let got = Capture::default();
        let sink = Gate {
            open: Some(open_rx),
            got: got.clone(),
        };
        let (q, done) = LogQueue::spawn(Box::new(sink), 100);
        // The writer takes the first buffer and blocks in the sink; 100 more bytes may queue.
        q.send(b"first line\n".to_vec(), true);
        std::thread::sleep(Duration::from_millis(50));
        let line = |i: usize| format!("worker line {i:02} padded to forty bytes...\n").into_bytes();
        assert_eq!(line(0).len(), 40);
        // Every send returns at once although nothing is written meanwhile.
        let sent = Instant::now();
        for i in 0..10 {
            q.send(line(i), true);
        }
        // A line of a thread that is not a worker is never dropped.
        q.send(b"startup line\n".to_vec(), false);
        assert!(sent.elapsed() < Duration::from_secs(1));
        open_tx.send(()).unwrap();
        q.tx.send(Msg::Stop).unwrap();
        done.recv_timeout(Duration::from_secs(10))
            .expect("the writer finishes");
        let out = String::from_utf8(got.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        // The first line, the two worker lines that fit in 100 bytes, the start-up line, then
        // the count of the eight dropped.
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(lines[0], "first line");
        assert!(lines[1].starts_with("worker line 00"), "{out}");
        assert!(lines[2].starts_with("worker line 01"), "{out}");
        assert_eq!(lines[3], "startup line");
        assert!(lines[4].contains("  WARN log output fell behind"), "{out}");
        assert!(lines[4].ends_with("dropped_lines=8"), "{out}");
        assert_eq!(q.counts.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn lines_sent_after_the_writer_stopped_are_written_by_the_sender() {
        let (q, done) = LogQueue::spawn(Box::new(io::sink()), 1 << 20);
        q.tx.send(Msg::Stop).unwrap();
        done.recv_timeout(Duration::from_secs(10)).unwrap();
        // The channel is closed now; this must neither block nor count as queued.
        q.send(b"late line\n".to_vec(), true);
        assert_eq!(q.counts.queued.load(Ordering::Relaxed), 0);
        assert_eq!(q.counts.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            let t = UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000 + 999);
            write_time(&mut s, t).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_868_800, 5), "2000-03-01T00:00:00.000005Z");
        assert_eq!(
            at(1_709_164_800 + 86_399, 999_999),
            "2024-02-29T23:59:59.999999Z"
        );
        assert_eq!(at(1_700_000_000, 123_456), "2023-11-14T22:13:20.123456Z");
        // The per-second cache must not leak one second's text into another.
        assert_eq!(at(1_700_000_001, 0), "2023-11-14T22:13:21.000000Z");
        assert_eq!(at(1_700_000_000, 1), "2023-11-14T22:13:20.000001Z");
    }
}
