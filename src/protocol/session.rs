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

/// One SMTP session on one connection.
pub struct Session {
    cfg: Arc<SessionConfig>,
    peer: SocketAddr,
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, peer: SocketAddr) -> Session {
        Session { cfg, peer }
    }

    /// Appends the `220 <hostname> ESMTP` greeting.
    pub fn greet(&mut self, out: &mut Vec<u8>) {
        let _ = (&self.cfg, &self.peer, out);
        todo!()
    }

    /// Consumes bytes from the client, appending replies to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let _ = (input, out);
        todo!()
    }

    /// The message announced by `Feed::Commit`. `None` at any other time.
    pub fn take_message(&mut self) -> Option<Message> {
        todo!()
    }

    /// The store's answer for the message taken last; appends the reply.
    pub fn committed(&mut self, result: CommitResult, out: &mut Vec<u8>) {
        let _ = (result, out);
        todo!()
    }

    /// The idle timer fired: appends `421 4.4.2 <hostname> Error: timeout exceeded`; the
    /// session is closed afterwards.
    pub fn on_idle_timeout(&mut self, out: &mut Vec<u8>) {
        let _ = out;
        todo!()
    }

    /// The server is shutting down. Between commands: appends
    /// `421 4.3.2 <hostname> Service shutting down` and returns true (close now). In DATA or
    /// while committing: returns false and the message may finish; the session then answers the
    /// message and closes with the 421 right after it (`feed`/`committed` return/lead to Close).
    /// Calling it again after the grace period forces the 421 and returns true.
    pub fn on_shutdown(&mut self, out: &mut Vec<u8>, force: bool) -> bool {
        let _ = (out, force);
        todo!()
    }

    pub fn phase(&self) -> Phase {
        todo!()
    }

    /// Counters for the session-end log line.
    pub fn stats(&self) -> SessionStats {
        todo!()
    }
}

/// What a session did, for the log line at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub commands: u32,
    pub errors: u32,
    pub messages_accepted: u32,
    pub messages_rejected: u32,
}
