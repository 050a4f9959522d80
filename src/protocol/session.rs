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
//!             let msg = s.take_message().unwrap();   // envelope + unstuffed body
//!             /* store msg durably (group commit), then: */
//!             s.committed(CommitResult::Stored { queue_id }, &mut out);  // 250 into out
//!             /* then feed input[consumed..] again */
//!         }
//!         Feed::Close { .. } => { /* send out, then close; ignore the rest */ }
//!     }
//! }
//! ```
//! Timers and shutdown come in as calls: `on_idle_timeout`, `on_shutdown`.
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
    pub body: Vec<u8>,
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
}

/// MAIL ... end of data.
struct Transaction {
    from: String,
    rcpts: Vec<String>,
    params: MailParams,
    /// Present from the 354 on.
    data: Option<DataScanner>,
    body: Vec<u8>,
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
        }
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
                    if self.discarding || self.line.len() + lf + 1 > LINE_BYTES_MAX {
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

    /// Keeps the start of a command line whose LF has not arrived, bounded by `LINE_BYTES_MAX`.
    fn hold_partial_line(&mut self, rest: &[u8]) {
        if self.discarding || rest.is_empty() {
            return;
        }
        // The LF still to come makes the line one byte longer.
        if self.line.len() + rest.len() + 1 > LINE_BYTES_MAX {
            self.discarding = true;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(rest);
        }
    }

    fn scan_data(&mut self, input: &[u8]) -> Option<usize> {
        let tx = self.tx.as_mut()?;
        let Transaction { data, body, .. } = &mut **tx;
        data.as_mut()?.scan(input, body)
    }

    /// The end of data was seen: hand the message over (true) or reject it (false).
    fn end_of_data(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(tx) = self.tx.take() else {
            debug_assert!(false, "Data phase without a transaction");
            self.phase = Phase::Ready;
            return false;
        };
        self.phase = Phase::Ready;
        let (bare, too_big) = tx.data.as_ref().map_or((false, false), |d| (d.bare_cr_lf(), d.too_big()));
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
        let Transaction { from, rcpts, params, body, .. } = *tx;
        self.ready = Some(Box::new(Message {
            envelope: Envelope {
                helo: self.helo.clone(),
                esmtp: self.esmtp,
                peer: self.peer,
                mail_from: from,
                rcpt_to: rcpts,
                body_8bitmime: params.body == Some(Body::EightBitMime),
                smtputf8: params.smtputf8,
            },
            body,
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
                match e {
                    ParseError::Unknown => self.reject(out, reply::UNKNOWN),
                    ParseError::Syntax(v) => {
                        reply::syntax(out, v.syntax());
                        self.count_error(out);
                    }
                    ParseError::UnknownParam(_) => self.reject(out, reply::UNKNOWN_PARAM),
                    ParseError::NeedsSmtputf8 => self.reject(out, reply::NEEDS_SMTPUTF8),
                }
                return e.verb();
            }
        };
        let verb = cmd.verb();
        if verb.needs_helo() && self.helo.is_empty() {
            self.reject(out, reply::NEED_HELO);
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
                    self.reject(out, reply::NESTED_MAIL);
                } else if params.size.is_some_and(|n| n > self.cfg.max_message_size) {
                    tracing::info!(
                        peer = %self.peer,
                        from = %String::from_utf8_lossy(from.mailbox),
                        size = params.size.unwrap_or(0),
                        "transaction rejected: declared SIZE over the limit"
                    );
                    self.stats.messages_rejected += 1;
                    self.reject(out, reply::TOO_BIG);
                } else {
                    self.tx = Some(Box::new(Transaction {
                        from: String::from_utf8_lossy(from.mailbox).into_owned(),
                        rcpts: Vec::new(),
                        params,
                        data: None,
                        body: Vec::new(),
                    }));
                    self.phase = Phase::Transaction;
                    out.extend_from_slice(reply::MAIL_OK);
                }
            }
            Command::Rcpt { to } => self.rcpt(to, out),
            Command::Data => match &mut self.tx {
                None => self.reject(out, reply::NEED_MAIL),
                Some(tx) if tx.rcpts.is_empty() => self.reject(out, reply::NEED_RCPT),
                Some(tx) => {
                    tx.data = Some(DataScanner::new(self.cfg.max_message_size));
                    self.phase = Phase::Data;
                    out.extend_from_slice(reply::DATA_GO);
                }
            },
            Command::Rset => {
                self.tx = None;
                self.phase = if self.helo.is_empty() { Phase::Connected } else { Phase::Ready };
                out.extend_from_slice(reply::OK);
            }
            Command::Noop => out.extend_from_slice(reply::OK),
            Command::Help => out.extend_from_slice(reply::HELP),
            Command::Vrfy(_) => out.extend_from_slice(reply::VRFY),
            Command::Expn(_) => self.reject(out, reply::EXPN),
            Command::Quit => {
                out.extend_from_slice(reply::BYE);
                self.tx = None;
                self.phase = Phase::Closed;
            }
        }
        Some(verb)
    }

    fn rcpt(&mut self, to: Path<'_>, out: &mut Vec<u8>) {
        let Some(tx) = &mut self.tx else {
            self.reject(out, reply::NEED_MAIL);
            return;
        };
        if to.is_non_ascii() && !tx.params.smtputf8 {
            self.reject(out, reply::NEEDS_SMTPUTF8);
            return;
        }
        let domain_ok = to.is_bare_postmaster()
            || match &self.cfg.accept_domains {
                None => true,
                Some(list) => list.iter().any(|d| d.as_bytes().eq_ignore_ascii_case(to.domain)),
            };
        if !domain_ok {
            self.reject(out, reply::DOMAIN_DENIED);
            return;
        }
        if tx.rcpts.len() >= self.cfg.max_recipients {
            // Not counted as an error: RFC 5321 4.5.3.1.10 tells the client to send the message
            // to the recipients accepted so far and retry the rest, which a legitimate client with
            // a long list will do; closing it for that would lose the whole message.
            out.extend_from_slice(reply::TOO_MANY_RCPTS);
            return;
        }
        tx.rcpts.push(String::from_utf8_lossy(to.mailbox).into_owned());
        out.extend_from_slice(reply::RCPT_OK);
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

    fn log_rejected(&self, tx: &Transaction, reason: &str) {
        tracing::info!(
            peer = %self.peer,
            from = %tx.from,
            rcpts = ?tx.rcpts,
            reason,
            "message rejected"
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

    pub fn phase(&self) -> Phase {
        self.phase
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
        self.line.capacity() + self.helo.capacity() + tx + self.ready.as_ref().map_or(0, |m| m.body.capacity())
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

    fn session() -> Session {
        Session::new(Arc::new(SessionConfig::default()), "192.0.2.7:4000".parse().unwrap())
    }

    #[test]
    fn smoke_full_transaction() {
        let mut s = session();
        let mut out = Vec::new();
        s.greet(&mut out);
        let input = b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nSubject: t\r\n\r\n..hi\r\n.\r\nQUIT\r\n";
        let Feed::Commit { consumed } = s.feed(input, &mut out) else { panic!("no commit: {}", String::from_utf8_lossy(&out)) };
        let m = s.take_message().unwrap();
        assert_eq!(m.body, b"Subject: t\r\n\r\n.hi\r\n");
        assert_eq!(m.envelope.mail_from, "a@b.example");
        assert_eq!(m.envelope.rcpt_to, vec!["x@y.example".to_string()]);
        s.committed(CommitResult::Stored { queue_id: "Q1".into() }, &mut out);
        assert_eq!(s.feed(&input[consumed..], &mut out), Feed::Close { consumed: 6 });
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("220 localhost ESMTP\r\n250-localhost\r\n"), "{text}");
        assert!(text.ends_with("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"), "{text}");
    }
}
