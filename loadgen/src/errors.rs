//! Errors by kind: what went wrong in a session, counted, with the first few examples of each.
//!
//! A kind is what a user acts on: the server refused connections, reset them, timed out, answered
//! with a particular 4xx/5xx code, or broke the protocol. Examples say which session, which step
//! and what the server said, so one look at the report tells where to dig.

use std::fmt;

/// Examples kept per kind.
pub const EXAMPLES_MAX: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The TCP connection was refused (nothing listening, or the backlog overflowed).
    Refused,
    /// No route to the target.
    Unreachable,
    /// The connection was reset (RST, or a write to a closed socket).
    Reset,
    /// The server closed the connection while a reply was due.
    Closed,
    /// No reply (or no connection) within --timeout.
    Timeout,
    /// A 4xx or 5xx reply, by code.
    Reply(u16),
    /// An unexpected reply or bytes that are not SMTP.
    Protocol,
    /// Any other errno, e.g. EMFILE when the generator runs out of file descriptors.
    Io(i32),
}

impl ErrorKind {
    /// What a failed socket operation means, from its errno.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc::ECONNREFUSED => ErrorKind::Refused,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL => ErrorKind::Unreachable,
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => ErrorKind::Reset,
            libc::ETIMEDOUT => ErrorKind::Timeout,
            e => ErrorKind::Io(e),
        }
    }

    /// A reply code that ends the step it answers: every 4xx and 5xx.
    pub fn from_reply(code: u16) -> Option<ErrorKind> {
        (400..600).contains(&code).then_some(ErrorKind::Reply(code))
    }

    /// Stable machine-readable name (JSON key, baseline comparison).
    pub fn name(&self) -> String {
        match self {
            ErrorKind::Refused => "refused".into(),
            ErrorKind::Unreachable => "unreachable".into(),
            ErrorKind::Reset => "reset".into(),
            ErrorKind::Closed => "closed".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Reply(c) => c.to_string(),
            ErrorKind::Protocol => "protocol".into(),
            ErrorKind::Io(e) => format!("io-{}", errno_name(*e)),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Reply(c) if *c < 500 => write!(f, "{c} (transient)"),
            ErrorKind::Reply(c) => write!(f, "{c} (permanent)"),
            ErrorKind::Protocol => f.write_str("protocol violation"),
            ErrorKind::Closed => f.write_str("closed by server"),
            other => f.write_str(&other.name()),
        }
    }
}

fn errno_name(e: i32) -> String {
    match e {
        libc::EMFILE => "EMFILE".into(),
        libc::ENFILE => "ENFILE".into(),
        libc::ENOBUFS => "ENOBUFS".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::ECANCELED => "ECANCELED".into(),
        e => format!("errno{e}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEntry {
    pub kind: ErrorKind,
    pub count: u64,
    pub examples: Vec<String>,
}

/// Counts per kind. A handful of kinds at most, so a vector beats a map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorTable {
    entries: Vec<ErrorEntry>,
}

impl ErrorTable {
    /// Counts one error; `example` is only called while fewer than `EXAMPLES_MAX` are kept, so
    /// the common case allocates nothing.
    pub fn add(&mut self, kind: ErrorKind, example: impl FnOnce() -> String) {
        let entry = self.entry_mut(kind);
        entry.count += 1;
        if entry.examples.len() < EXAMPLES_MAX {
            entry.examples.push(example());
        }
    }

    fn entry_mut(&mut self, kind: ErrorKind) -> &mut ErrorEntry {
        let i = match self.entries.iter().position(|e| e.kind == kind) {
            Some(i) => i,
            None => {
                self.entries.push(ErrorEntry {
                    kind,
                    count: 0,
                    examples: Vec::new(),
                });
                self.entries.len() - 1
            }
        };
        &mut self.entries[i]
    }

    pub fn merge(&mut self, other: &ErrorTable) {
        for o in &other.entries {
            let entry = self.entry_mut(o.kind);
            entry.count += o.count;
            for ex in &o.examples {
                if entry.examples.len() < EXAMPLES_MAX {
                    entry.examples.push(ex.clone());
                }
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.entries.iter().map(|e| e.count).sum()
    }

    /// Entries, most frequent first.
    pub fn sorted(&self) -> Vec<ErrorEntry> {
        let mut v = self.entries.clone();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
        v
    }

    pub fn count(&self, kind: ErrorKind) -> u64 {
        self.entries
            .iter()
            .find(|e| e.kind == kind)
            .map_or(0, |e| e.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_map_to_the_kinds_users_act_on() {
        assert_eq!(
            ErrorKind::from_errno(libc::ECONNREFUSED),
            ErrorKind::Refused
        );
        assert_eq!(ErrorKind::from_errno(libc::ECONNRESET), ErrorKind::Reset);
        assert_eq!(ErrorKind::from_errno(libc::EPIPE), ErrorKind::Reset);
        assert_eq!(ErrorKind::from_errno(libc::ETIMEDOUT), ErrorKind::Timeout);
        assert_eq!(
            ErrorKind::from_errno(libc::EHOSTUNREACH),
            ErrorKind::Unreachable
        );
        assert_eq!(
            ErrorKind::from_errno(libc::EMFILE),
            ErrorKind::Io(libc::EMFILE)
        );
        assert_eq!(ErrorKind::Io(libc::EMFILE).name(), "io-EMFILE");
    }

    #[test]
    fn only_4xx_and_5xx_replies_are_errors() {
        assert_eq!(ErrorKind::from_reply(250), None);
        assert_eq!(ErrorKind::from_reply(354), None);
        assert_eq!(ErrorKind::from_reply(451), Some(ErrorKind::Reply(451)));
        assert_eq!(ErrorKind::from_reply(554), Some(ErrorKind::Reply(554)));
        assert_eq!(ErrorKind::Reply(451).to_string(), "451 (transient)");
        assert_eq!(ErrorKind::Reply(550).to_string(), "550 (permanent)");
    }

    #[test]
    fn table_counts_every_error_but_keeps_few_examples() {
        let mut t = ErrorTable::default();
        let mut calls = 0;
        for i in 0..10 {
            t.add(ErrorKind::Reply(451), || {
                calls += 1;
                format!("example {i}")
            });
        }
        t.add(ErrorKind::Timeout, || "t".into());
        assert_eq!(calls, EXAMPLES_MAX, "examples are built only while kept");
        assert_eq!(t.count(ErrorKind::Reply(451)), 10);
        assert_eq!(t.total(), 11);
        let sorted = t.sorted();
        assert_eq!(sorted[0].kind, ErrorKind::Reply(451));
        assert_eq!(
            sorted[0].examples,
            vec!["example 0", "example 1", "example 2"]
        );
    }

    #[test]
    fn merge_adds_counts_and_fills_examples() {
        let mut a = ErrorTable::default();
        a.add(ErrorKind::Reset, || "a1".into());
        let mut b = ErrorTable::default();
        for i in 0..7 {
            b.add(ErrorKind::Reset, || format!("b{i}"));
        }
        b.add(ErrorKind::Refused, || "r".into());
        a.merge(&b);
        assert_eq!(a.count(ErrorKind::Reset), 8);
        assert_eq!(a.count(ErrorKind::Refused), 1);
        assert_eq!(a.total(), 9);
        let reset = a
            .sorted()
            .into_iter()
            .find(|e| e.kind == ErrorKind::Reset)
            .unwrap();
        assert_eq!(reset.examples, vec!["a1", "b0", "b1"]);
    }
}
