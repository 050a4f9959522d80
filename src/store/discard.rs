//! The discard store: accepts and forgets. It isolates the network and protocol path when
//! benchmarking (compare its rate with maildir's to see what durability costs). It still counts
//! messages and bytes and hands out queue ids, so clients and reports look the same.
use std::time::SystemTime;

use super::{epoch_parts, queue_id};
use crate::protocol::Message;

/// One worker's discard store.
#[derive(Debug)]
pub struct Discard {
    worker: usize,
    pid: u32,
    counter: u64,
    messages: u64,
    bytes: u64,
}

impl Discard {
    pub fn new(worker_index: usize) -> Discard {
        Discard {
            worker: worker_index,
            pid: std::process::id(),
            counter: 0,
            messages: 0,
            bytes: 0,
        }
    }

    /// Counts the message and drops it; returns the queue id for `CommitResult::Stored`.
    pub fn accept(&mut self, msg: &Message, now: SystemTime) -> String {
        let (secs, usecs) = epoch_parts(now);
        let id = queue_id(secs, usecs, self.pid, self.worker, self.counter);
        self.counter += 1;
        self.messages += 1;
        // `size`, not `body.len()`: discard sessions do not keep the body (`set_keep_body`).
        self.bytes += msg.size as u64;
        id
    }

    /// Messages accepted so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Body bytes accepted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Envelope;

    #[test]
    fn discard_counts_messages_and_bytes_and_gives_distinct_ids() {
        let msg = Message {
            envelope: Envelope {
                helo: "c".into(),
                esmtp: true,
                peer: "127.0.0.1:1".parse().unwrap(),
                mail_from: "a@b".into(),
                rcpt_to: vec!["c@d".into()],
                body_8bitmime: false,
                smtputf8: false,
            },
            body: vec![b'x'; 100],
            size: 100,
        };
        let mut d = Discard::new(2);
        let now = SystemTime::now();
        let a = d.accept(&msg, now);
        let b = d.accept(&msg, now);
        assert_ne!(a, b);
        assert!(a.contains("W2"), "{a}");
        assert_eq!(d.messages(), 2);
        assert_eq!(d.bytes(), 200);
        assert_ne!(a, Discard::new(3).accept(&msg, now));
        // A body that was not kept counts by its size.
        let unkept = Message {
            body: Vec::new(),
            size: 5000,
            ..msg
        };
        d.accept(&unkept, now);
        assert_eq!(d.bytes(), 5200);
    }
}
