//! The session state machine: bytes in, replies and message events out. No I/O, no clocks.
//!
//! CONTRACT (shared by the protocol, worker and test authors; change only with care):
//!
//! ```text
//! let mut s = Session::new(cfg, peer);
//! s.greet(&mut out);                        // 220 greeting into out
//! loop {
//!     match s.feed(&input, &mut out) {      // replies appended to out, in order
//!         Feed::NeedMore => { /* all input consumed; send out; read more */ }
//!         Feed::Commit { consumed } => {
//!             let msg = s.take_message().unwrap();   // envelope + unstuffed body (and its size;
//!                                                    // only the size after set_keep_body(false))
//!             /* store msg durably (group commit), then: */
//!             s.committed(CommitResult::Stored { queue_id }, &mut out);  // 250 into out
//!             /* then feed input[consumed..] again */
//!         }
//!         Feed::Close { .. } => { /* send out, then close; ignore the rest */ }
//!     }
//! }
//! ```
//! Timers and shutdown come in as calls: `on_idle_timeout`, `on_shutdown`.
//!
//! Policy choices made here (each tested in this file's tests and `tests/fixtures/*.smtp`):
//! - Every 4xx/5xx reply to a client's command or message counts toward `max_errors`, except
//!   452 4.5.3 (too many recipients: RFC 5321 4.5.3.1.10 has the client deliver to those accepted
//!   and retry the rest, so counting it would punish a legitimate long list), EXPN's 502 (our
//!   choice, see `Verb::counts_errors`), and the store's own failures (451/452 after the data).
//! - A command line is at most `LINE_BYTES_MAX` (512) octets with its line ending (the worker may
//!   raise it with `set_line_bytes_max`); a longer one is answered 500 5.5.6 when its end
//!   arrives, and never more than the limit of it is held.
//! - A bare LF ends a command line; in DATA only CRLF counts (see `data`).
//! - Bytes that arrive after an accepted DATA in the same read are message data; after a refused
//!   DATA they are commands.
//! - Rejected transactions (bare CR/LF, too big, declared SIZE too big) and refused recipients
//!   are logged here with `tracing::info!`; accepted messages and session ends are logged by the
//!   worker, which knows the queue id (`take_message`'s envelope, `stats`, `helo`,
//!   `improper_pipelining`, `phase_at_end`).
use std::net::SocketAddr;
use std::sync::Arc;

use super::data::DataScanner;
use super::parse::{parse_command, Body, Command, MailParams, ParseError, Path, Verb};
use super::reply;

/// Everything the session needs to know about policy. Built once by `config`.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our host name: greeting, EHLO reply, 421 texts.
    pub hostname: String,
    /// Largest message we accept (advertised as SIZE); over it 552 5.3.4.
    pub max_message_size: u64,
    /// Recipients per transaction; beyond it 452 4.5.3.
    pub max_recipients: usize,
    /// Errors (4xx/5xx replies caused by the client) before 421 and close.
    pub max_errors: u32,
    /// Recipient domains we accept (lower-case ASCII). `None`: accept any domain.
    pub accept_domains: Option<Vec<String>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "localhost".into(),
            max_message_size: 26_214_400,
            max_recipients: 100,
            max_errors: 10,
            accept_domains: None,
        }
    }
}

/// What the caller must do after `feed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Every input byte was consumed; send the replies and read more.
    NeedMore,
    /// A message is complete: `take_message`, make it durable, then `committed`, then feed
    /// `input[consumed..]` again. Until `committed` is called the session accepts no input.
    Commit { consumed: usize },
    /// Send the replies, then close the connection. Input after `consumed` is ignored.
    Close { consumed: usize },
}

/// Where the session is, for logs and for shutdown decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected, greeting sent, no HELO/EHLO yet.
    Connected,
    /// HELO/EHLO done, no transaction open.
    Ready,
    /// MAIL accepted (and maybe some RCPTs).
    Transaction,
    /// Between 354 and the end of data.
    Data,
    /// Message handed over via `Feed::Commit`, waiting for `committed`.
    Committing,
    /// The session has ended (QUIT, error limit, timeout, shutdown).
    Closed,
}

impl Phase {
    /// The phase's name in the session's log line.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connected => "greeting",
            Phase::Ready => "ready",
            Phase::Transaction => "transaction",
            Phase::Data => "data",
            Phase::Committing => "commit",
            Phase::Closed => "closed",
        }
    }
}

/// The envelope of one accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The client's HELO/EHLO argument, as sent.
    pub helo: String,
    /// True when the client greeted with EHLO (Received: says ESMTP) rather than HELO (SMTP).
    pub esmtp: bool,
    pub peer: SocketAddr,
    /// Reverse path without angle brackets; empty for the null path `<>`.
    pub mail_from: String,
    /// Forward paths without angle brackets, in the order accepted.
    pub rcpt_to: Vec<String>,
    /// BODY=8BITMIME was given.
    pub body_8bitmime: bool,
    /// SMTPUTF8 was given.
    pub smtputf8: bool,
}

/// One complete message: envelope and the body exactly as received after dot-unstuffing,
/// without the terminating `.<CRLF>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub envelope: Envelope,
    /// The body; empty when the session does not keep bodies (`Session::set_keep_body`).
    pub body: Vec<u8>,
    /// The body's length in bytes, kept or not: `body.len()` when the body is kept.
    pub size: usize,
}

/// The store's verdict on a message handed over by `Feed::Commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitResult {
    /// Durable: reply `250 2.0.0 Ok: queued as <queue_id>`.
    Stored { queue_id: String },
    /// Out of space: reply `452 4.3.1 Insufficient system storage`.
    NoSpace,
    /// Any other store failure: reply `451 4.3.0 Local error in processing`.
    Failed,
}

/// Longest command line, CRLF included (RFC 5321 4.5.3.1.4). A longer one gets 500 5.5.6 and is
/// discarded; the session never holds more than this many bytes of a command line.
pub const LINE_BYTES_MAX: usize = 512;

/// One SMTP session on one connection.
///
/// Small while idle: no buffer exists unless a command line arrived in pieces, and the
/// transaction (envelope and body) exists only between MAIL and the end of data.
pub struct Session {
    cfg: Arc<SessionConfig>,
    peer: SocketAddr,
    phase: Phase,
    /// HELO/EHLO argument; empty until the client greets.
    helo: String,
    esmtp: bool,
    /// The start of a command line whose end has not arrived yet; no capacity otherwise.
    line: Vec<u8>,
    /// Inside a command line that is already too long: drop bytes up to its LF.
    discarding: bool,
    /// The open transaction, from MAIL to the end of data.
    tx: Option<Box<Transaction>>,
    /// The message announced by `Feed::Commit`, until `take_message`.
    ready: Option<Box<Message>>,
    /// Shutdown was requested while a message was in flight: close after answering it.
    shutdown: bool,
    stats: SessionStats,
    /// Commands that arrived after a group-ending command in the same input (RFC 2920 3.1).
    improper_pipelining: u32,
    /// Longest command line, line ending included (`LINE_BYTES_MAX` unless raised).
    line_max: u32,
    /// Copy message bodies into `Message::body` (true unless the store discards them).
    keep_body: bool,
    /// The session ended with the client's QUIT (not an error limit, timeout or shutdown).
    quit: bool,
    /// The phase the session was in when it closed (see `phase_at_end`).
    closed_in: Phase,
}

/// MAIL ... end of data.
struct Transaction {
    from: String,
    rcpts: Vec<String>,
    params: MailParams,
    /// Present from the 354 on.
    data: Option<DataScanner>,
    body: Vec<u8>,
    /// Body bytes already handed out by `take_body` (spilled to the store before the end of
    /// data); `body` holds only what came after them.
    spilled: usize,
    /// A recipient over `--max-recipients` has been logged (see `Session::rcpt`).
    too_many_logged: bool,
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, peer: SocketAddr) -> Session {
        Session {
            cfg,
            peer,
            phase: Phase::Connected,
            helo: String::new(),
            esmtp: false,
            line: Vec::new(),
            discarding: false,
            tx: None,
            ready: None,
            shutdown: false,
            stats: SessionStats::default(),
            improper_pipelining: 0,
            line_max: LINE_BYTES_MAX as u32,
            keep_body: true,
            quit: false,
            closed_in: Phase::Connected,
        }
    }

    /// Raises the command line limit (config `line_bytes_max`); values are clamped to
    /// `LINE_BYTES_MAX..=65536`, since RFC 5321 4.5.3.1.4 requires at least 512.
    pub fn set_line_bytes_max(&mut self, n: usize) {
        self.line_max = n.clamp(LINE_BYTES_MAX, 65_536) as u32;
    }

    /// With `false`, message bodies are scanned in place and never copied: `Message::body` stays
    /// empty and only `Message::size` tells the body's length. For a store that forgets bodies
    /// (`--store discard`), which then needs no body buffer and no fresh pages for one.
    pub fn set_keep_body(&mut self, keep: bool) {
        self.keep_body = keep;
    }

    /// Appends the `220 <hostname> ESMTP` greeting.
    pub fn greet(&mut self, out: &mut Vec<u8>) {
        reply::greeting(out, &self.cfg.hostname);
    }

    /// Consumes bytes from the client, appending replies to `out`.
    ///
    /// Commands that arrive together are answered in order into the same `out` (RFC 2920). Bytes
    /// after an accepted DATA are message data; after a refused DATA they are commands.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let mut i = 0;
        let mut group_ended = false;
        loop {
            match self.phase {
                Phase::Closed => return Feed::Close { consumed: i },
                // Only reached when the caller feeds before `committed`: consume nothing.
                Phase::Committing => return Feed::Commit { consumed: i },
                Phase::Data => match self.scan_data(&input[i..]) {
                    None => return Feed::NeedMore,
                    Some(n) => {
                        i += n;
                        if self.end_of_data(out) {
                            return Feed::Commit { consumed: i };
                        }
                    }
                },
                Phase::Connected | Phase::Ready | Phase::Transaction => {
                    let rest = &input[i..];
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        self.hold_partial_line(rest);
                        return Feed::NeedMore;
                    };
                    i += lf + 1;
                    let piece = &rest[..lf];
                    if group_ended {
                        self.improper_pipelining += 1;
                    }
                    if self.discarding || self.line.len() + lf + 1 > self.line_max as usize {
                        self.discarding = false;
                        self.line = Vec::new();
                        self.stats.commands += 1;
                        self.reject(out, reply::LINE_TOO_LONG);
                        continue;
                    }
                    let verb = if self.line.is_empty() {
                        self.command(strip_cr(piece), out)
                    } else {
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(piece);
                        self.command(strip_cr(&line), out)
                    };
                    group_ended |= verb.is_some_and(Verb::ends_group);
                }
            }
        }
    }

    /// Keeps the start of a command line whose LF has not arrived, bounded by the line limit.
    fn hold_partial_line(&mut self, rest: &[u8]) {
        if self.discarding || rest.is_empty() {
            return;
        }
        // The LF still to come makes the line one byte longer.
        if self.line.len() + rest.len() + 1 > self.line_max as usize {
            self.discarding = true;
            self.line = Vec::new();
        } else {
            // Grow exactly: the bound is on memory held, not just on bytes kept.
            self.line.reserve_exact(rest.len());
            self.line.extend_from_slice(rest);
        }
    }

    /// Scans body bytes; the scanner hands out the unstuffed body as slices of `input`, which
    /// are copied only when bodies are kept.
    fn scan_data(&mut self, input: &[u8]) -> Option<usize> {
        let tx = self.tx.as_mut()?;
        let Transaction { data, body, .. } = &mut **tx;
        let data = data.as_mut()?;
        let end = if self.keep_body {
            data.scan(input, |segment| body.extend_from_slice(segment))
        } else {
            data.scan(input, |_| {})
        };
        if data.rejecting() && body.capacity() != 0 {
            // Free the partial body now: it will never be stored.
            *body = Vec::new();
        }
        end
    }

    /// The end of data was seen: hand the message over (true) or reject it (false).
    fn end_of_data(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(tx) = self.tx.take() else {
            debug_assert!(false, "Data phase without a transaction");
            self.phase = Phase::Ready;
            return false;
        };
        self.phase = Phase::Ready;
        let (bare, too_big) = tx
            .data
            .as_ref()
            .map_or((false, false), |d| (d.bare_cr_lf(), d.too_big()));
        let refusal = if bare {
            Some((reply::BARE_CR_LF, "bare CR or LF in message"))
        } else if too_big {
            Some((reply::TOO_BIG, "message too big"))
        } else {
            None
        };
        if let Some((text, reason)) = refusal {
            self.stats.messages_rejected += 1;
            self.log_rejected(&tx, reason);
            self.reject(out, text);
            self.close_if_shutting_down(out);
            return false;
        }
        let size = tx.data.as_ref().map_or(0, |d| d.len() as usize);
        let Transaction {
            from,
            rcpts,
            params,
            body,
            spilled,
            ..
        } = *tx;
        debug_assert!(!self.keep_body || spilled + body.len() == size);
        self.ready = Some(Box::new(Message {
            envelope: self.envelope(from, rcpts, &params),
            body,
            size,
        }));
        self.phase = Phase::Committing;
        true
    }

    /// Executes one command line (without its line ending); returns its verb when it had one.
    fn command(&mut self, line: &[u8], out: &mut Vec<u8>) -> Option<Verb> {
        self.stats.commands += 1;
        let cmd = match parse_command(line) {
            Ok(cmd) => cmd,
            Err(e) => {
                let verb = e.verb();
                match e {
                    ParseError::Unknown => self.refuse(verb, out, reply::UNKNOWN),
                    ParseError::Syntax(v) => {
                        reply::syntax(out, v.syntax());
                        self.refuse(verb, out, b"");
                    }
                    ParseError::UnknownParam(_) => self.refuse(verb, out, reply::UNKNOWN_PARAM),
                    ParseError::NeedsSmtputf8 => self.refuse(verb, out, reply::NEEDS_SMTPUTF8),
                }
                return verb;
            }
        };
        let verb = cmd.verb();
        if verb.needs_helo() && self.helo.is_empty() {
            self.refuse(Some(verb), out, reply::NEED_HELO);
            return Some(verb);
        }
        match cmd {
            Command::Helo(name) | Command::Ehlo(name) => {
                // A new greeting resets the transaction (RFC 5321 4.1.4).
                self.tx = None;
                self.helo = String::from_utf8_lossy(name).into_owned();
                self.esmtp = verb == Verb::Ehlo;
                self.phase = Phase::Ready;
                if self.esmtp {
                    reply::ehlo(out, &self.cfg.hostname, self.cfg.max_message_size);
                } else {
                    reply::helo(out, &self.cfg.hostname);
                }
            }
            Command::Mail { from, params } => {
                if self.tx.is_some() {
                    self.refuse(Some(verb), out, reply::NESTED_MAIL);
                } else if params.size.is_some_and(|n| n > self.cfg.max_message_size) {
                    tracing::info!(
                        client = %self.peer.ip(),
                        from = %String::from_utf8_lossy(from.mailbox),
                        to = ?Vec::<&str>::new(),
                        size = params.size.unwrap_or(0),
                        result = "rejected: declared SIZE over the limit",
                        "message"
                    );
                    self.stats.messages_rejected += 1;
                    self.refuse(Some(verb), out, reply::TOO_BIG);
                } else {
                    self.tx = Some(Box::new(Transaction {
                        from: String::from_utf8_lossy(from.mailbox).into_owned(),
                        rcpts: Vec::new(),
                        params,
                        data: None,
                        body: Vec::new(),
                        spilled: 0,
                        too_many_logged: false,
                    }));
                    self.phase = Phase::Transaction;
                    out.extend_from_slice(reply::MAIL_OK);
                }
            }
            Command::Rcpt { to } => self.rcpt(to, out),
            Command::Data => match &mut self.tx {
                None => self.refuse(Some(verb), out, reply::NEED_MAIL),
                Some(tx) if tx.rcpts.is_empty() => self.refuse(Some(verb), out, reply::NEED_RCPT),
                Some(tx) => {
                    // Start the body at the declared size (RFC 1870), within reason: a few
                    // regrowths are cheaper than trusting a client with our memory.
                    const BODY_START_MAX: u64 = 64 * 1024;
                    let start = tx
                        .params
                        .size
                        .unwrap_or(4096)
                        .min(BODY_START_MAX)
                        .min(self.cfg.max_message_size);
                    if self.keep_body {
                        tx.body = Vec::with_capacity(start as usize);
                    }
                    tx.data = Some(DataScanner::new(self.cfg.max_message_size));
                    self.phase = Phase::Data;
                    out.extend_from_slice(reply::DATA_GO);
                }
            },
            Command::Rset => {
                self.tx = None;
                self.phase = if self.helo.is_empty() {
                    Phase::Connected
                } else {
                    Phase::Ready
                };
                out.extend_from_slice(reply::OK);
            }
            Command::Noop => out.extend_from_slice(reply::OK),
            Command::Help => out.extend_from_slice(reply::HELP),
            Command::Vrfy(_) => out.extend_from_slice(reply::VRFY),
            Command::Expn(_) => self.refuse(Some(verb), out, reply::EXPN),
            Command::Quit => {
                out.extend_from_slice(reply::BYE);
                self.tx = None;
                self.closed_in = self.phase;
                self.phase = Phase::Closed;
                self.quit = true;
            }
        }
        Some(verb)
    }

    fn rcpt(&mut self, to: Path<'_>, out: &mut Vec<u8>) {
        let verb = Verb::Rcpt;
        let Some(tx) = &mut self.tx else {
            self.refuse(Some(verb), out, reply::NEED_MAIL);
            return;
        };
        if to.is_non_ascii() && !tx.params.smtputf8 {
            self.log_refused_rcpt(&to, "non-ASCII address without SMTPUTF8");
            self.refuse(Some(verb), out, reply::NEEDS_SMTPUTF8);
            return;
        }
        let domain_ok = to.is_bare_postmaster()
            || match &self.cfg.accept_domains {
                None => true,
                Some(list) => list
                    .iter()
                    .any(|d| d.as_bytes().eq_ignore_ascii_case(to.domain)),
            };
        if !domain_ok {
            self.log_refused_rcpt(&to, "domain not accepted here (--accept-domain)");
            self.refuse(Some(verb), out, reply::DOMAIN_DENIED);
            return;
        }
        if tx.rcpts.len() >= self.cfg.max_recipients {
            // Once per transaction: these are not counted as errors, so a client could send
            // any number of them, and the first says all the operator needs.
            if !tx.too_many_logged {
                tx.too_many_logged = true;
                self.log_refused_rcpt(
                    &to,
                    "too many recipients (--max-recipients; logged once a transaction)",
                );
            }
            // Not counted as an error: RFC 5321 4.5.3.1.10 tells the client to send the message
            // to the recipients accepted so far and retry the rest, which a legitimate client with
            // a long list will do; closing it for that would lose the whole message.
            out.extend_from_slice(reply::TOO_MANY_RCPTS);
            return;
        }
        tx.rcpts
            .push(String::from_utf8_lossy(to.mailbox).into_owned());
        out.extend_from_slice(reply::RCPT_OK);
    }

    /// Appends a 4xx/5xx reply to a command line and counts it as a client error unless the
    /// verb's table entry says otherwise (the one place `Verb::counts_errors` is consulted).
    fn refuse(&mut self, verb: Option<Verb>, out: &mut Vec<u8>, text: &[u8]) {
        out.extend_from_slice(text);
        if verb.is_none_or(Verb::counts_errors) {
            self.count_error(out);
        }
    }

    /// Appends a 4xx/5xx reply caused by the client and counts it.
    fn reject(&mut self, out: &mut Vec<u8>, text: &[u8]) {
        out.extend_from_slice(text);
        self.count_error(out);
    }

    /// Counts one client error; at the limit, appends 421 4.7.0 and closes.
    fn count_error(&mut self, out: &mut Vec<u8>) {
        self.stats.errors += 1;
        if self.stats.errors >= self.cfg.max_errors && self.phase != Phase::Closed {
            reply::too_many_errors(out, &self.cfg.hostname);
            self.close();
        }
    }

    fn close(&mut self) {
        if self.phase != Phase::Closed {
            self.closed_in = self.phase;
        }
        self.phase = Phase::Closed;
        self.tx = None;
        self.line = Vec::new();
    }

    fn close_if_shutting_down(&mut self, out: &mut Vec<u8>) {
        if self.shutdown && self.phase != Phase::Closed {
            reply::shutting_down(out, &self.cfg.hostname);
            self.close();
        }
    }

    /// A refused recipient's log line (`recipient client=... from=... to=... result=...`), as
    /// Postfix logs each refused RCPT: a transaction whose recipients were all refused ends
    /// without a message line, and the operator should still see who was turned away and why.
    fn log_refused_rcpt(&self, to: &Path<'_>, reason: &str) {
        tracing::info!(
            client = %self.peer.ip(),
            from = %self.tx.as_ref().map_or("", |tx| tx.from.as_str()),
            to = %String::from_utf8_lossy(to.mailbox),
            result = format!("rejected: {reason}").as_str(),
            "recipient"
        );
    }

    /// The transaction's log line, with the same event name and fields as the worker's line for
    /// an accepted message (`message client=... from=... to=[...] size=... result=...`), so one
    /// filter finds every transaction.
    fn log_rejected(&self, tx: &Transaction, reason: &str) {
        tracing::info!(
            client = %self.peer.ip(),
            from = %tx.from,
            to = ?tx.rcpts,
            size = tx.data.as_ref().map_or(0, DataScanner::len),
            result = format!("rejected: {reason}").as_str(),
            "message"
        );
    }

    /// The message announced by `Feed::Commit`. `None` at any other time.
    pub fn take_message(&mut self) -> Option<Message> {
        if self.phase != Phase::Committing {
            return None;
        }
        self.ready.take().map(|m| *m)
    }

    /// The store's answer for the message taken last; appends the reply.
    pub fn committed(&mut self, result: CommitResult, out: &mut Vec<u8>) {
        if self.phase != Phase::Committing {
            // A late answer after a forced shutdown, or a caller bug: nothing to say.
            return;
        }
        self.ready = None;
        self.phase = Phase::Ready;
        match result {
            CommitResult::Stored { queue_id } => {
                self.stats.messages_accepted += 1;
                reply::queued(out, &queue_id);
            }
            // Server-side failures: not the client's fault, so not counted as errors.
            CommitResult::NoSpace => {
                self.stats.messages_rejected += 1;
                out.extend_from_slice(reply::NO_SPACE);
            }
            CommitResult::Failed => {
                self.stats.messages_rejected += 1;
                out.extend_from_slice(reply::LOCAL_ERROR);
            }
        }
        self.close_if_shutting_down(out);
    }

    /// The idle timer fired: appends `421 4.4.2 <hostname> Error: timeout exceeded`; the
    /// session is closed afterwards.
    pub fn on_idle_timeout(&mut self, out: &mut Vec<u8>) {
        if self.phase != Phase::Closed {
            reply::timeout(out, &self.cfg.hostname);
            self.close();
        }
    }

    /// The session has lasted longer than the server allows (`--max-session-time`): appends
    /// `421 4.4.2 <hostname> Error: session time limit exceeded`; the session is closed
    /// afterwards. Together with the idle timeout this bounds how long any client, however
    /// slowly it trickles bytes or however many NOOPs it sends, can hold a connection.
    pub fn on_session_time_limit(&mut self, out: &mut Vec<u8>) {
        if self.phase != Phase::Closed {
            reply::session_time_limit(out, &self.cfg.hostname);
            self.close();
        }
    }

    /// The server is shutting down. Between commands: appends
    /// `421 4.3.2 <hostname> Service shutting down` and returns true (close now). In DATA or
    /// while committing: returns false and the message may finish; the session then answers the
    /// message and closes with the 421 right after it (`feed`/`committed` return/lead to Close).
    /// Calling it again after the grace period forces the 421 and returns true.
    pub fn on_shutdown(&mut self, out: &mut Vec<u8>, force: bool) -> bool {
        match self.phase {
            Phase::Closed => true,
            Phase::Data | Phase::Committing if !force => {
                self.shutdown = true;
                false
            }
            _ => {
                reply::shutting_down(out, &self.cfg.hostname);
                self.close();
                true
            }
        }
    }

    /// True once the client's QUIT ended the session (the 221 is its last reply).
    pub fn quit_received(&self) -> bool {
        self.quit
    }

    /// Where the session is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Where the session was when it closed, or is if it has not: for the session's log line,
    /// where a client that vanished in the middle of a message (Postfix's "lost connection
    /// after DATA") is worth telling from one that left between transactions.
    pub fn phase_at_end(&self) -> Phase {
        if self.phase == Phase::Closed {
            self.closed_in
        } else {
            self.phase
        }
    }

    /// In DATA, with a body that is being kept (not known to be rejected): the body bytes held
    /// since the 354 or the last `take_body`. 0 otherwise.
    pub fn body_held(&self) -> usize {
        if !self.keep_body || self.phase != Phase::Data || self.body_rejected() {
            return 0;
        }
        self.tx.as_ref().map_or(0, |tx| tx.body.len())
    }

    /// In DATA: hands out the body bytes held so far (see `body_held`), so that a store can
    /// write a large body out while it arrives instead of holding it all, and goes on in `next`
    /// (emptied first; sized by the caller for what it lets the session hold). The
    /// message then carries only the rest of the body (`Message::body`), while `Message::size`
    /// stays the whole body's. Outside DATA or when the body is being rejected, gives back
    /// `next` (empty) and changes nothing.
    pub fn take_body(&mut self, mut next: Vec<u8>) -> Vec<u8> {
        next.clear();
        if self.body_held() == 0 {
            return next;
        }
        let Some(tx) = self.tx.as_mut() else {
            return next;
        };
        let body = std::mem::replace(&mut tx.body, next);
        tx.spilled += body.len();
        body
    }

    /// In DATA with a body already known to be rejected (too big, bare CR or LF): whatever a
    /// store wrote of it may go.
    pub fn body_rejected(&self) -> bool {
        self.phase == Phase::Data
            && self
                .tx
                .as_ref()
                .and_then(|t| t.data.as_ref())
                .is_some_and(DataScanner::rejecting)
    }

    /// In DATA: the envelope the message will have (the same as `Message::envelope`).
    pub fn data_envelope(&self) -> Option<Envelope> {
        let tx = self.tx.as_ref().filter(|_| self.phase == Phase::Data)?;
        Some(self.envelope(tx.from.clone(), tx.rcpts.clone(), &tx.params))
    }

    /// A transaction's envelope: its paths and MAIL parameters with this session's greeting.
    fn envelope(&self, mail_from: String, rcpt_to: Vec<String>, params: &MailParams) -> Envelope {
        Envelope {
            helo: self.helo.clone(),
            esmtp: self.esmtp,
            peer: self.peer,
            mail_from,
            rcpt_to,
            body_8bitmime: params.body == Some(Body::EightBitMime),
            smtputf8: params.smtputf8,
        }
    }

    /// Counters for the session-end log line.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The HELO/EHLO name the client gave, if any (for logs).
    pub fn helo(&self) -> Option<&str> {
        if self.helo.is_empty() {
            None
        } else {
            Some(&self.helo)
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Commands received after a group-ending command (RFC 2920 3.1) in the same input: the
    /// client did not wait for a reply it should have waited for. Answered anyway; for logs.
    pub fn improper_pipelining(&self) -> u32 {
        self.improper_pipelining
    }

    /// Bytes this session holds on the heap right now (partial line, envelope, body), for the
    /// memory budget of idle connections.
    pub fn heap_bytes(&self) -> usize {
        let tx = self.tx.as_ref().map_or(0, |t| {
            std::mem::size_of::<Transaction>()
                + t.from.capacity()
                + t.rcpts.capacity() * std::mem::size_of::<String>()
                + t.rcpts.iter().map(String::capacity).sum::<usize>()
                + t.body.capacity()
        });
        self.line.capacity()
            + self.helo.capacity()
            + tx
            + self.ready.as_ref().map_or(0, |m| m.body.capacity())
    }
}

/// Command lines may end in CRLF or, leniently, a bare LF.
fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What a session did, for the log line at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub commands: u32,
    pub errors: u32,
    pub messages_accepted: u32,
    pub messages_rejected: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "192.0.2.7:4000";

    fn cfg() -> SessionConfig {
        SessionConfig {
            hostname: "mx.example".into(),
            ..SessionConfig::default()
        }
    }

    /// What a whole session produced: every reply byte, the messages handed over, whether it
    /// closed, and its counters.
    #[derive(Debug, PartialEq)]
    struct Run {
        out: Vec<u8>,
        msgs: Vec<Message>,
        closed: bool,
        stats: SessionStats,
    }

    /// Drives a session over `chunks` like the worker does: every Commit is stored as `Q<n>`.
    fn drive(cfg: &Arc<SessionConfig>, chunks: &[&[u8]]) -> Run {
        let mut s = Session::new(cfg.clone(), PEER.parse().unwrap());
        let mut run = Run {
            out: Vec::new(),
            msgs: Vec::new(),
            closed: false,
            stats: SessionStats::default(),
        };
        s.greet(&mut run.out);
        'chunks: for chunk in chunks {
            let mut input = *chunk;
            loop {
                match s.feed(input, &mut run.out) {
                    Feed::NeedMore => break,
                    Feed::Commit { consumed } => {
                        assert_eq!(s.phase(), Phase::Committing);
                        // The session holds no input while committing.
                        let mut extra = Vec::new();
                        assert_eq!(
                            s.feed(b"NOOP\r\n", &mut extra),
                            Feed::Commit { consumed: 0 }
                        );
                        assert!(extra.is_empty());
                        run.msgs
                            .push(s.take_message().expect("message after Commit"));
                        assert!(s.take_message().is_none());
                        let queue_id = format!("Q{}", run.msgs.len());
                        s.committed(CommitResult::Stored { queue_id }, &mut run.out);
                        input = &input[consumed..];
                    }
                    Feed::Close { .. } => {
                        run.closed = true;
                        break 'chunks;
                    }
                }
            }
        }
        run.stats = s.stats();
        run
    }

    /// Feeds `input` whole, split at every offset, and byte by byte; all must agree. Returns the
    /// whole-input run.
    fn run_cfg(cfg: SessionConfig, input: &[u8]) -> Run {
        let cfg = Arc::new(cfg);
        let whole = drive(&cfg, &[input]);
        for cut in 0..=input.len() {
            let split = drive(&cfg, &[&input[..cut], &input[cut..]]);
            assert_eq!(
                split,
                whole,
                "split at {cut} differs; input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(drive(&cfg, &bytes), whole, "byte by byte differs");
        whole
    }

    fn run(input: &[u8]) -> Run {
        run_cfg(cfg(), input)
    }

    /// The reply lines, one string per reply (multi-line replies joined with '\n').
    fn replies(out: &[u8]) -> Vec<String> {
        let text = String::from_utf8(out.to_vec()).unwrap();
        let mut all = Vec::new();
        let mut cur = String::new();
        for line in text.split_terminator("\r\n") {
            if !cur.is_empty() {
                cur.push('\n');
            }
            cur.push_str(line);
            if line.as_bytes().get(3) != Some(&b'-') {
                all.push(std::mem::take(&mut cur));
            }
        }
        assert!(cur.is_empty(), "unterminated reply {cur:?}");
        all
    }

    fn codes(out: &[u8]) -> Vec<u16> {
        replies(out)
            .iter()
            .map(|r| r[..3].parse().unwrap())
            .collect()
    }

    const HELLO: &str = "EHLO c.example\r\n";

    fn with_hello(rest: &str) -> Vec<u8> {
        format!("{HELLO}{rest}").into_bytes()
    }

    #[test]
    fn greeting_and_ehlo_reply() {
        let r = run(b"EHLO client.example\r\n");
        assert_eq!(
            replies(&r.out),
            [
                "220 mx.example ESMTP",
                "250-mx.example\n250-PIPELINING\n250-SIZE 26214400\n250-8BITMIME\n250-ENHANCEDSTATUSCODES\n250 SMTPUTF8"
            ]
        );
        assert!(!r.closed);
    }

    #[test]
    fn helo_is_one_line_and_missing_domain_is_501() {
        let r = run(b"HELO client.example\r\nHELO\r\nEHLO\r\nEHLO  \r\n");
        assert_eq!(
            replies(&r.out)[1..],
            [
                "250 mx.example",
                "501 5.5.4 Syntax: HELO hostname",
                "501 5.5.4 Syntax: EHLO hostname",
                "501 5.5.4 Syntax: EHLO hostname"
            ]
        );
    }

    #[test]
    fn full_transaction_with_two_recipients() {
        let r = run(&with_hello(
            "MAIL FROM:<a@b.example> BODY=8BITMIME\r\nRCPT TO:<x@y.example>\r\nRCPT TO:<z@y.example>\r\nDATA\r\n\
             Subject: t\r\n\r\n..dot\r\nline\r\n.\r\nQUIT\r\n",
        ));
        assert_eq!(codes(&r.out), [220, 250, 250, 250, 250, 354, 250, 221]);
        assert!(replies(&r.out)[6] == "250 2.0.0 Ok: queued as Q1");
        assert!(r.closed);
        assert_eq!(r.msgs.len(), 1);
        let m = &r.msgs[0];
        assert_eq!(m.body, b"Subject: t\r\n\r\n.dot\r\nline\r\n");
        assert_eq!(
            m.envelope,
            Envelope {
                helo: "c.example".into(),
                esmtp: true,
                peer: PEER.parse().unwrap(),
                mail_from: "a@b.example".into(),
                rcpt_to: vec!["x@y.example".into(), "z@y.example".into()],
                body_8bitmime: true,
                smtputf8: false,
            }
        );
        assert_eq!(
            r.stats,
            SessionStats {
                commands: 6,
                errors: 0,
                messages_accepted: 1,
                messages_rejected: 0
            }
        );
    }

    #[test]
    fn helo_session_is_not_esmtp_and_null_sender_is_allowed() {
        let r = run(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n");
        assert_eq!(codes(&r.out), [220, 250, 250, 250, 354, 250]);
        let m = &r.msgs[0];
        assert!(!m.envelope.esmtp);
        assert_eq!(m.envelope.mail_from, "");
        assert!(m.body.is_empty());
    }

    #[test]
    fn several_transactions_in_one_session() {
        let one = "MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nhello\r\n.\r\n";
        let r = run(&with_hello(&format!("{one}{one}{one}")));
        assert_eq!(r.msgs.len(), 3);
        assert_eq!(
            replies(&r.out)
                .iter()
                .filter(|l| l.starts_with("250 2.0.0 Ok: queued as Q"))
                .count(),
            3
        );
        assert_eq!(r.stats.messages_accepted, 3);
    }

    #[test]
    fn new_ehlo_resets_the_transaction() {
        let r = run(&with_hello(
            "MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nEHLO again\r\nDATA\r\nMAIL FROM:<a@b>\r\n",
        ));
        assert_eq!(codes(&r.out), [220, 250, 250, 250, 250, 503, 250]);
        assert!(r.msgs.is_empty());
    }

    #[test]
    fn simple_commands() {
        let r = run(b"RSET\r\nNOOP\r\nVRFY someone\r\nHELP\r\nnoop with args\r\nEXPN list\r\nQUIT\r\nNOOP\r\n");
        assert_eq!(
            replies(&r.out)[1..],
            [
                "250 2.0.0 Ok",
                "250 2.0.0 Ok",
                "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
                "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
                "250 2.0.0 Ok",
                "502 5.5.1 Error: EXPN not implemented",
                "221 2.0.0 Bye"
            ]
        );
        // Nothing after QUIT is answered.
        assert!(r.closed);
    }

    #[test]
    fn expn_is_refused_but_not_counted_as_an_error() {
        let r = run_cfg(
            SessionConfig {
                max_errors: 2,
                ..cfg()
            },
            b"EXPN a\r\nEXPN b\r\nEXPN c\r\nNOOP\r\n",
        );
        assert_eq!(codes(&r.out), [220, 502, 502, 502, 250]);
        assert_eq!(r.stats.errors, 0);
        assert!(!r.closed);
    }

    #[test]
    fn quit_close_reports_consumed_bytes() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        assert_eq!(
            s.feed(b"NOOP\r\nQUIT\r\nNOOP\r\n", &mut out),
            Feed::Close { consumed: 12 }
        );
        assert_eq!(s.phase(), Phase::Closed);
        assert!(s.quit_received());
        // A closed session stays closed.
        assert_eq!(s.feed(b"NOOP\r\n", &mut out), Feed::Close { consumed: 0 });
    }

    /// The worker lets only a QUIT's 221 wait for the FIN (MSG_MORE); a session closed by the
    /// error limit must not look like one.
    #[test]
    fn only_quit_counts_as_quit_received() {
        let mut s = Session::new(
            Arc::new(SessionConfig {
                max_errors: 2,
                ..cfg()
            }),
            PEER.parse().unwrap(),
        );
        let mut out = Vec::new();
        assert!(!s.quit_received());
        assert!(matches!(
            s.feed(b"A\r\nB\r\n", &mut out),
            Feed::Close { .. }
        ));
        assert_eq!(s.phase(), Phase::Closed);
        assert!(!s.quit_received());
    }

    #[test]
    fn unknown_command_500_and_session_goes_on() {
        let r = run(b"FOO bar\r\n\r\nSTARTTLS\r\nEHLO x\r\n");
        assert_eq!(
            replies(&r.out)[1..4],
            [
                "500 5.5.2 Error: command not recognized",
                "500 5.5.2 Error: command not recognized",
                "500 5.5.2 Error: command not recognized"
            ]
        );
        assert_eq!(codes(&r.out)[4], 250);
        assert_eq!(r.stats.errors, 3);
    }

    #[test]
    fn syntax_errors_501_with_expected_syntax() {
        let r = run(&with_hello(
            "MAIL FROM:a@b\r\nMAIL FROM:<a@b>\r\nRCPT TO:<>\r\nDATA now\r\n",
        ));
        assert_eq!(
            replies(&r.out)[2..],
            [
                "501 5.5.4 Syntax: MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]",
                "250 2.1.0 Ok",
                "501 5.5.4 Syntax: RCPT TO:<address>",
                "501 5.5.4 Syntax: DATA"
            ]
        );
    }

    #[test]
    fn bad_sequence_503() {
        // MAIL, RCPT and DATA before HELO/EHLO.
        let r = run(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n");
        assert_eq!(
            replies(&r.out)[1..],
            ["503 5.5.1 Error: send HELO/EHLO first"; 3]
        );
        // RCPT before MAIL; DATA before MAIL; DATA with no accepted RCPT; nested MAIL.
        let r = run(&with_hello(
            "RCPT TO:<x@y>\r\nDATA\r\nMAIL FROM:<a@b>\r\nDATA\r\nMAIL FROM:<c@d>\r\n",
        ));
        assert_eq!(
            replies(&r.out)[2..],
            [
                "503 5.5.1 Error: need MAIL command",
                "503 5.5.1 Error: need MAIL command",
                "250 2.1.0 Ok",
                "503 5.5.1 Error: need RCPT command",
                "503 5.5.1 Error: nested MAIL command"
            ]
        );
        assert_eq!(r.stats.errors, 4);
    }

    #[test]
    fn data_refused_means_following_bytes_are_commands() {
        let r = run(&with_hello("MAIL FROM:<a@b>\r\nDATA\r\nNOOP\r\n.\r\n"));
        assert_eq!(codes(&r.out), [220, 250, 250, 503, 250, 500]);
    }

    #[test]
    fn rset_ends_the_transaction() {
        let r = run(&with_hello(
            "MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRSET\r\nDATA\r\nMAIL FROM:<a@b>\r\n",
        ));
        assert_eq!(codes(&r.out), [220, 250, 250, 250, 250, 503, 250]);
    }

    #[test]
    fn line_limit_is_512_octets_with_crlf() {
        // "NOOP " + pad + CRLF: exactly 512 octets is fine, 513 is not.
        let ok = format!("NOOP {}\r\n", "x".repeat(512 - 7));
        let long = format!("NOOP {}\r\n", "x".repeat(512 - 6));
        assert_eq!(ok.len(), 512);
        let r = run(format!("{ok}{long}NOOP\r\n").as_bytes());
        assert_eq!(
            replies(&r.out)[1..],
            [
                "250 2.0.0 Ok",
                "500 5.5.6 Error: line too long",
                "250 2.0.0 Ok"
            ]
        );
        // The same with bare LF: 512 octets including the LF.
        let ok = format!("NOOP {}\n", "x".repeat(512 - 6));
        let long = format!("NOOP {}\n", "x".repeat(512 - 5));
        let r = run(format!("{ok}{long}").as_bytes());
        assert_eq!(codes(&r.out), [220, 250, 500]);
    }

    #[test]
    fn line_limit_can_be_raised_but_not_below_512() {
        let line = format!("NOOP {}\r\n", "x".repeat(900));
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        s.feed(line.as_bytes(), &mut out);
        assert_eq!(replies(&out), ["500 5.5.6 Error: line too long"]);
        s.set_line_bytes_max(1024);
        out.clear();
        s.feed(&line.as_bytes()[..400], &mut out);
        s.feed(&line.as_bytes()[400..], &mut out);
        assert_eq!(replies(&out), ["250 2.0.0 Ok"]);
        s.set_line_bytes_max(10);
        out.clear();
        s.feed(format!("NOOP {}\r\n", "x".repeat(505)).as_bytes(), &mut out);
        assert_eq!(replies(&out), ["250 2.0.0 Ok"]);
    }

    #[test]
    fn long_line_memory_stays_bounded() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        assert_eq!(s.feed(b"NOOP ", &mut out), Feed::NeedMore);
        for _ in 0..1000 {
            assert_eq!(s.feed(&[b'x'; 100], &mut out), Feed::NeedMore);
            assert!(
                s.heap_bytes() <= LINE_BYTES_MAX,
                "holds {} bytes",
                s.heap_bytes()
            );
        }
        assert!(out.is_empty(), "no reply before the line ends");
        assert_eq!(s.feed(b"xx\r\nNOOP\r\n", &mut out), Feed::NeedMore);
        assert_eq!(
            replies(&out),
            ["500 5.5.6 Error: line too long", "250 2.0.0 Ok"]
        );
        assert_eq!(s.heap_bytes(), 0);
    }

    #[test]
    fn error_limit_421_and_close() {
        let r = run_cfg(
            SessionConfig {
                max_errors: 3,
                ..cfg()
            },
            b"A\r\nB\r\nNOOP\r\nC\r\nD\r\nE\r\n",
        );
        assert_eq!(codes(&r.out), [220, 500, 500, 250, 500, 421]);
        assert_eq!(
            replies(&r.out)[5],
            "421 4.7.0 mx.example Error: too many errors"
        );
        assert!(r.closed);
        assert_eq!(r.stats.errors, 3);
    }

    #[test]
    fn enhanced_codes_on_every_reply_after_ehlo() {
        let r = run_cfg(
            SessionConfig { accept_domains: Some(vec!["y.example".into()]), max_recipients: 1, ..cfg() },
            &with_hello(
                "NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nFOO\r\nDATA\r\nMAIL FROM:<a@b> X=1\r\nMAIL FROM:<a@b> SIZE=999999999999\r\n\
                 MAIL FROM:<\u{e9}@b>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@z.example>\r\nRCPT TO:<x@y.example>\r\n\
                 RCPT TO:<w@y.example>\r\nDATA\r\nbare\n\r\n.\r\nQUIT\r\n",
            ),
        );
        let rs = replies(&r.out);
        assert_eq!(rs.len(), 18, "{rs:?}");
        for reply in &rs[2..] {
            let code = reply.as_bytes()[0];
            if code == b'3' {
                continue;
            }
            let b = reply.as_bytes();
            assert!(
                b[4] == code && b[5] == b'.' && b[6].is_ascii_digit(),
                "no enhanced code: {reply:?}"
            );
        }
    }

    #[test]
    fn recipient_domain_policy() {
        let c = SessionConfig {
            accept_domains: Some(vec!["y.example".into(), "z.example".into()]),
            ..cfg()
        };
        let r = run_cfg(
            c,
            &with_hello(
                "MAIL FROM:<a@b>\r\nRCPT TO:<x@other.example>\r\nRCPT TO:<x@Y.EXAMPLE>\r\nRCPT TO:<x@sub.y.example>\r\n\
                 RCPT TO:<Postmaster>\r\nRCPT TO:<postmaster@other.example>\r\nRCPT TO:<x@z.example>\r\nDATA\r\n.\r\n",
            ),
        );
        assert_eq!(
            replies(&r.out)[3..9],
            [
                "550 5.7.1 Recipient domain not accepted here",
                "250 2.1.5 Ok",
                "550 5.7.1 Recipient domain not accepted here",
                "250 2.1.5 Ok",
                "550 5.7.1 Recipient domain not accepted here",
                "250 2.1.5 Ok"
            ]
        );
        assert_eq!(
            r.msgs[0].envelope.rcpt_to,
            ["x@Y.EXAMPLE", "Postmaster", "x@z.example"]
        );
        assert_eq!(r.stats.errors, 3);
    }

    #[test]
    fn recipient_limit_452_and_not_counted() {
        let r = run_cfg(
            SessionConfig { max_recipients: 2, max_errors: 2, ..cfg() },
            &with_hello("MAIL FROM:<a@b>\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\nRCPT TO:<3@y>\r\nRCPT TO:<4@y>\r\nDATA\r\n.\r\n"),
        );
        assert_eq!(codes(&r.out), [220, 250, 250, 250, 250, 452, 452, 354, 250]);
        assert_eq!(replies(&r.out)[5], "452 4.5.3 Error: too many recipients");
        assert_eq!(r.msgs[0].envelope.rcpt_to, ["1@y", "2@y"]);
        assert_eq!(r.stats.errors, 0);
    }

    #[test]
    fn declared_size_over_limit_552() {
        let r = run_cfg(
            SessionConfig {
                max_message_size: 100,
                ..cfg()
            },
            &with_hello("MAIL FROM:<a@b> SIZE=101\r\nMAIL FROM:<a@b> SIZE=100\r\n"),
        );
        assert_eq!(
            replies(&r.out)[2..],
            ["552 5.3.4 Message size exceeds fixed limit", "250 2.1.0 Ok"]
        );
        assert!(replies(&r.out)[1].contains("250-SIZE 100\n"));
    }

    #[test]
    fn body_over_limit_552_nothing_stored_session_goes_on() {
        let big = format!("{}\r\n", "y".repeat(99));
        let input = with_hello(&format!(
            "MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n{big}{big}.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n{big}.\r\n"
        ));
        let r = run_cfg(
            SessionConfig {
                max_message_size: 101,
                ..cfg()
            },
            &input,
        );
        assert_eq!(
            codes(&r.out),
            [220, 250, 250, 250, 354, 552, 250, 250, 354, 250]
        );
        assert_eq!(r.msgs.len(), 1);
        assert_eq!(r.msgs[0].body, big.as_bytes());
        assert_eq!(r.stats.messages_rejected, 1);
    }

    #[test]
    fn a_session_that_keeps_no_body_reports_its_size_and_holds_nothing() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        s.set_keep_body(false);
        let mut out = Vec::new();
        s.feed(
            b"EHLO x\r\nMAIL FROM:<a@b> SIZE=100000\r\nRCPT TO:<x@y>\r\nDATA\r\n",
            &mut out,
        );
        // A stuffed line in every read, every read ending inside a line.
        let mut sent = 0;
        for i in 0..100 {
            let chunk = format!("line {i}\r\n..{}", "w".repeat(900));
            assert_eq!(s.feed(chunk.as_bytes(), &mut out), Feed::NeedMore);
            sent += chunk.len() - 1;
            assert!(s.heap_bytes() < 1024, "holds {}", s.heap_bytes());
        }
        let Feed::Commit { consumed } = s.feed(b"\r\n.\r\nQUIT\r\n", &mut out) else {
            panic!("no commit: {}", String::from_utf8_lossy(&out));
        };
        assert_eq!(consumed, 5);
        let m = s.take_message().unwrap();
        assert!(m.body.is_empty());
        assert_eq!(m.size, sent + 2);
        assert_eq!(m.envelope.rcpt_to, ["x@y"]);
    }

    #[test]
    fn body_over_limit_memory_stays_bounded() {
        let mut s = Session::new(
            Arc::new(SessionConfig {
                max_message_size: 1000,
                ..cfg()
            }),
            PEER.parse().unwrap(),
        );
        let mut out = Vec::new();
        s.feed(
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n",
            &mut out,
        );
        let line = [b"z".repeat(998), b"\r\n".to_vec()].concat();
        for _ in 0..1000 {
            assert_eq!(s.feed(&line, &mut out), Feed::NeedMore);
            assert!(s.heap_bytes() < 4096, "holds {}", s.heap_bytes());
        }
        out.clear();
        assert_eq!(s.feed(b".\r\n", &mut out), Feed::NeedMore);
        assert_eq!(
            replies(&out),
            ["552 5.3.4 Message size exceeds fixed limit"]
        );
    }

    #[test]
    fn unknown_parameters_555() {
        let r = run(&with_hello(
            "MAIL FROM:<a@b> RET=FULL\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y> NOTIFY=NEVER\r\n",
        ));
        assert_eq!(
            replies(&r.out)[2..],
            [
                "555 5.5.4 Unsupported option",
                "250 2.1.0 Ok",
                "555 5.5.4 Unsupported option"
            ]
        );
    }

    #[test]
    fn non_ascii_needs_smtputf8() {
        let r = run(
            "EHLO x\r\nMAIL FROM:<j\u{f6}rg@b>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<\u{e9}@y>\r\nRSET\r\n\
             MAIL FROM:<j\u{f6}rg@b> SMTPUTF8\r\nRCPT TO:<\u{e9}@y>\r\nDATA\r\n.\r\n"
                .as_bytes(),
        );
        assert_eq!(
            codes(&r.out),
            [220, 250, 553, 250, 553, 250, 250, 250, 354, 250]
        );
        assert_eq!(
            replies(&r.out)[2],
            "553 5.6.7 Non-ASCII address requires SMTPUTF8"
        );
        let e = &r.msgs[0].envelope;
        assert!(e.smtputf8);
        assert_eq!(e.mail_from, "j\u{f6}rg@b");
        assert_eq!(e.rcpt_to, ["\u{e9}@y"]);
    }

    #[test]
    fn bare_lf_command_lines_are_accepted() {
        let r = run(b"EHLO x\nMAIL FROM:<a@b>\nRCPT TO:<x@y>\r\nDATA\n.\r\n");
        assert_eq!(codes(&r.out), [220, 250, 250, 250, 354, 250]);
    }

    #[test]
    fn pipelined_group_answered_in_order_and_data_follows_354() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        let input = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<bad>\r\nDATA\r\nMAIL FROM:<not@a.command>\r\n.\r\nNOOP\r\n";
        let Feed::Commit { consumed } = s.feed(input, &mut out) else {
            panic!()
        };
        assert_eq!(&input[consumed..], b"NOOP\r\n");
        assert_eq!(codes(&out), [250, 250, 250, 501, 354]);
        assert_eq!(
            s.take_message().unwrap().body,
            b"MAIL FROM:<not@a.command>\r\n"
        );
        // EHLO ends a pipelined group (RFC 2920 3.1): the four commands after it in the same
        // read were counted, and answered all the same.
        assert_eq!(s.improper_pipelining(), 4);
        s.committed(
            CommitResult::Stored {
                queue_id: "A".into(),
            },
            &mut out,
        );
        assert_eq!(s.feed(&input[consumed..], &mut out), Feed::NeedMore);
        assert_eq!(codes(&out), [250, 250, 250, 501, 354, 250, 250]);
    }

    #[test]
    fn improper_pipelining_is_counted_but_answered() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        s.feed(b"EHLO x\r\nNOOP\r\nHELP\r\n", &mut out);
        assert_eq!(codes(&out), [250, 250, 214]);
        assert_eq!(s.improper_pipelining(), 2);
    }

    #[test]
    fn store_failures_are_answered_and_session_goes_on() {
        for (result, want) in [
            (
                CommitResult::NoSpace,
                "452 4.3.1 Insufficient system storage",
            ),
            (CommitResult::Failed, "451 4.3.0 Local error in processing"),
        ] {
            let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
            let mut out = Vec::new();
            let r = s.feed(
                b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n",
                &mut out,
            );
            assert!(matches!(r, Feed::Commit { .. }));
            assert!(s.take_message().is_some());
            out.clear();
            s.committed(result, &mut out);
            assert_eq!(replies(&out), [want]);
            assert_eq!(s.phase(), Phase::Ready);
            assert_eq!(s.stats().errors, 0);
            assert_eq!(s.stats().messages_rejected, 1);
        }
    }

    #[test]
    fn smuggling_vectors_reject_the_whole_message_and_session_goes_on() {
        for v in [
            "\n.\n", "\r.\r", "\r\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r", "\n.\r", "\r.\n",
        ] {
            let input = with_hello(&format!(
                "MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nSubject: one\r\n\r\nx{v}MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\n\
                 DATA\r\nSubject: smuggled\r\n\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nclean\r\n.\r\n"
            ));
            let r = run(&input);
            assert_eq!(
                codes(&r.out),
                [220, 250, 250, 250, 354, 550, 250, 250, 354, 250],
                "vector {v:?}"
            );
            assert_eq!(
                replies(&r.out)[5],
                "550 5.6.11 Message contains bare CR or LF; lines must end with CRLF"
            );
            assert_eq!(r.msgs.len(), 1, "vector {v:?}");
            assert_eq!(r.msgs[0].body, b"clean\r\n");
            assert_eq!(r.stats.messages_rejected, 1);
        }
    }

    #[test]
    fn shutdown_between_commands() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        s.feed(b"EHLO x\r\nMAIL FROM:<a@b>\r\n", &mut out);
        out.clear();
        assert!(s.on_shutdown(&mut out, false));
        assert_eq!(
            replies(&out),
            ["421 4.3.2 mx.example Service shutting down"]
        );
        assert_eq!(s.phase(), Phase::Closed);
        assert!(s.on_shutdown(&mut out, true));
        assert_eq!(out.len(), 44, "no second 421");
    }

    #[test]
    fn shutdown_in_data_lets_the_message_finish_then_421() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        s.feed(
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nhalf",
            &mut out,
        );
        out.clear();
        assert!(!s.on_shutdown(&mut out, false));
        assert!(out.is_empty());
        assert_eq!(
            s.feed(b" done\r\n.\r\nNOOP\r\n", &mut out),
            Feed::Commit { consumed: 10 }
        );
        assert_eq!(s.take_message().unwrap().body, b"half done\r\n");
        s.committed(
            CommitResult::Stored {
                queue_id: "Q".into(),
            },
            &mut out,
        );
        assert_eq!(
            replies(&out),
            [
                "250 2.0.0 Ok: queued as Q",
                "421 4.3.2 mx.example Service shutting down"
            ]
        );
        assert_eq!(s.phase(), Phase::Closed);
        assert_eq!(s.feed(b"NOOP\r\n", &mut out), Feed::Close { consumed: 0 });
    }

    #[test]
    fn shutdown_in_data_with_rejected_message_closes_after_the_550() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        s.feed(
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nbare\n\r\n",
            &mut out,
        );
        out.clear();
        assert!(!s.on_shutdown(&mut out, false));
        assert_eq!(s.feed(b".\r\n", &mut out), Feed::Close { consumed: 3 });
        assert_eq!(codes(&out), [550, 421]);
    }

    #[test]
    fn forced_shutdown_in_data_and_while_committing() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        s.feed(
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n",
            &mut out,
        );
        out.clear();
        assert!(!s.on_shutdown(&mut out, false));
        assert!(s.on_shutdown(&mut out, true));
        assert_eq!(
            replies(&out),
            ["421 4.3.2 mx.example Service shutting down"]
        );

        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        s.feed(
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n",
            &mut out,
        );
        assert_eq!(s.phase(), Phase::Committing);
        out.clear();
        assert!(!s.on_shutdown(&mut out, false));
        assert!(s.on_shutdown(&mut out, true));
        // A late store answer after the forced close says nothing.
        s.committed(
            CommitResult::Stored {
                queue_id: "late".into(),
            },
            &mut out,
        );
        assert_eq!(
            replies(&out),
            ["421 4.3.2 mx.example Service shutting down"]
        );
    }

    #[test]
    fn idle_timeout_421() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        s.feed(b"EHLO x\r\nMAIL FRO", &mut out);
        out.clear();
        s.on_idle_timeout(&mut out);
        assert_eq!(
            replies(&out),
            ["421 4.4.2 mx.example Error: timeout exceeded"]
        );
        assert_eq!(s.phase(), Phase::Closed);
        // Only the HELO name is left, kept for the session-end log line.
        assert_eq!(s.heap_bytes(), 1);
    }

    /// The session's log line says where a session was when it ended: the phase it was in, not
    /// `closed`, whatever closed it.
    #[test]
    fn phase_at_end_is_where_the_session_was_when_it_closed() {
        let new = || Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        // Still open (the peer went away): the current phase.
        let mut s = new();
        s.feed(
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\npart of a bo",
            &mut out,
        );
        assert_eq!(s.phase_at_end(), Phase::Data);
        // Closed by the idle timer in the middle of a message.
        s.on_idle_timeout(&mut out);
        assert_eq!((s.phase(), s.phase_at_end()), (Phase::Closed, Phase::Data));
        // QUIT between transactions, and QUIT before any greeting.
        let mut s = new();
        s.feed(b"EHLO x\r\nQUIT\r\n", &mut out);
        assert_eq!((s.phase(), s.phase_at_end()), (Phase::Closed, Phase::Ready));
        let mut s = new();
        s.feed(b"QUIT\r\n", &mut out);
        assert_eq!(s.phase_at_end(), Phase::Connected);
        // The error limit inside a transaction; a later close changes nothing.
        let mut s = new();
        s.feed(b"EHLO x\r\nMAIL FROM:<a@b>\r\n", &mut out);
        for _ in 0..10 {
            s.feed(b"BOGUS\r\n", &mut out);
        }
        assert_eq!(
            (s.phase(), s.phase_at_end()),
            (Phase::Closed, Phase::Transaction)
        );
        s.on_idle_timeout(&mut out);
        assert!(s.on_shutdown(&mut out, true));
        assert_eq!(s.phase_at_end(), Phase::Transaction);
    }

    #[test]
    fn phases() {
        let mut s = Session::new(Arc::new(cfg()), PEER.parse().unwrap());
        let mut out = Vec::new();
        assert_eq!(s.phase(), Phase::Connected);
        s.feed(b"EHLO x\r\n", &mut out);
        assert_eq!(s.phase(), Phase::Ready);
        s.feed(b"MAIL FROM:<a@b>\r\n", &mut out);
        assert_eq!(s.phase(), Phase::Transaction);
        s.feed(b"RCPT TO:<x@y>\r\nDATA\r\n", &mut out);
        assert_eq!(s.phase(), Phase::Data);
        s.feed(b".\r\n", &mut out);
        assert_eq!(s.phase(), Phase::Committing);
        s.committed(CommitResult::Failed, &mut out);
        assert_eq!(s.phase(), Phase::Ready);
        assert_eq!(s.helo(), Some("x"));
    }

    #[test]
    fn idle_session_is_small() {
        let cfg = Arc::new(cfg());
        assert!(
            std::mem::size_of::<Session>() <= 160,
            "Session is {} bytes",
            std::mem::size_of::<Session>()
        );
        let mut s = Session::new(cfg, PEER.parse().unwrap());
        let mut out = Vec::new();
        assert_eq!(s.heap_bytes(), 0);
        s.feed(
            b"EHLO client.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nbody\r\n.\r\n",
            &mut out,
        );
        s.take_message();
        s.committed(
            CommitResult::Stored {
                queue_id: "Q".into(),
            },
            &mut out,
        );
        // Between transactions only the HELO name is held.
        assert!(
            s.heap_bytes() <= 32,
            "idle session holds {} bytes",
            s.heap_bytes()
        );
        // A command split across reads is held only until its end arrives.
        s.feed(b"NO", &mut out);
        assert!(s.heap_bytes() > 0);
        s.feed(b"OP\r\n", &mut out);
        assert!(s.heap_bytes() <= 32);
    }

    /// A body taken out while it arrives (`take_body`, as the worker does to write a large
    /// body to disk before its end) plus the message's rest is exactly the unstuffed body,
    /// `Message::size` counts all of it, and the envelope seen in DATA is the message's;
    /// whatever the cuts of the input and whenever the body is taken.
    #[test]
    fn a_body_taken_while_it_arrives_plus_the_rest_is_the_whole_body() {
        let mut wire = Vec::new();
        let mut body = Vec::new();
        for i in 0..400 {
            let line = format!("line {i} {}\r\n", "w".repeat(i % 90));
            if i % 7 == 0 {
                // A line that starts with a dot, stuffed on the wire.
                wire.extend_from_slice(b"..");
                body.push(b'.');
            }
            wire.extend_from_slice(line.as_bytes());
            body.extend_from_slice(line.as_bytes());
        }
        let head = with_hello("MAIL FROM:<a@b> SMTPUTF8\r\nRCPT TO:<x@y>\r\nDATA\r\n");
        let mut input = head.clone();
        input.extend_from_slice(&wire);
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let cfg = Arc::new(cfg());
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..200 {
            let mut s = Session::new(cfg.clone(), PEER.parse().unwrap());
            let mut out = Vec::new();
            s.greet(&mut out);
            let (mut taken, mut envelope, mut msg) = (Vec::new(), None, None);
            let mut pos = 0;
            while pos < input.len() {
                let end = (pos + 1 + next(3000)).min(input.len());
                let mut chunk = &input[pos..end];
                pos = end;
                loop {
                    match s.feed(chunk, &mut out) {
                        Feed::NeedMore => break,
                        Feed::Commit { consumed } => {
                            msg = s.take_message();
                            s.committed(
                                CommitResult::Stored {
                                    queue_id: "Q".into(),
                                },
                                &mut out,
                            );
                            chunk = &chunk[consumed..];
                        }
                        Feed::Close { .. } => break,
                    }
                }
                if s.phase() == Phase::Data {
                    envelope = envelope.or_else(|| s.data_envelope());
                    assert_eq!(s.body_held(), body.len().min(s.body_held()));
                    // Taken at random moments, the way a worker past its threshold would.
                    if next(3) == 0 {
                        let held = s.body_held();
                        let part = s.take_body(Vec::with_capacity(16));
                        assert_eq!(part.len(), held);
                        assert_eq!(s.body_held(), 0);
                        taken.extend_from_slice(&part);
                    }
                } else {
                    assert!(s.take_body(Vec::new()).is_empty());
                }
            }
            let msg = msg.expect("the message was handed over");
            taken.extend_from_slice(&msg.body);
            assert!(taken == body, "round {round}: body differs");
            assert_eq!(msg.size, body.len());
            assert_eq!(envelope.as_ref(), Some(&msg.envelope), "round {round}");
            assert_eq!(codes(&out), [220, 250, 250, 250, 354, 250, 221]);
        }
    }

    /// Outside DATA, or once the body is known to be rejected, nothing is held or taken.
    #[test]
    fn take_body_gives_nothing_outside_data_or_for_a_rejected_body() {
        let cfg = Arc::new(SessionConfig {
            max_message_size: 100,
            ..cfg()
        });
        let mut s = Session::new(cfg, PEER.parse().unwrap());
        let mut out = Vec::new();
        s.greet(&mut out);
        assert!(s.take_body(Vec::new()).is_empty());
        assert!(s.data_envelope().is_none());
        s.feed(
            &with_hello("MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n"),
            &mut out,
        );
        s.feed(&[b'z'; 60], &mut out);
        assert_eq!(s.body_held(), 60);
        assert!(!s.body_rejected());
        s.feed(&[b'z'; 60], &mut out);
        assert!(s.body_rejected(), "over max-message-size");
        assert_eq!(s.body_held(), 0);
        assert!(s.take_body(Vec::new()).is_empty());
        s.feed(b"\r\n.\r\n", &mut out);
        assert_eq!(codes(&out), [220, 250, 250, 250, 354, 552]);
        assert!(!s.body_rejected());
        assert!(s.take_message().is_none());
    }
}
