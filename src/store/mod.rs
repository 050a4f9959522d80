//! Where an accepted message goes. A store *plans*; the worker performs the plan through the
//! ring. Never parses SMTP.
//!
//! CONTRACT (store author fills in; worker author calls):
//! - `maildir::Maildir::open(dir)` at start-up (blocking is fine there): creates DIR/{tmp,new,cur},
//!   applies the leftover-tmp policy, returns the store or a one-line error for people.
//! - `Maildir::prepare(&mut self, &Message, now: SystemTime) -> Prepared`: a unique queue id, the
//!   tmp and new paths, and the header block (Return-Path, X-Envelope-To per recipient,
//!   Received:) that goes before `message.body`. The worker then, through the ring: openat(tmp,
//!   O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0o600), writev(header, body) to completion, fsync, close,
//!   renameat(tmp, new); once every message of the batch is renamed, one fsync of the new/
//!   directory (`Maildir::new_dir_fd()`), then every session of the batch gets its 250. On any
//!   failure: unlinkat(tmp) and `CommitResult::NoSpace` (ENOSPC/EDQUOT) or `Failed`.
#![forbid(unsafe_code)]

pub mod discard;
pub mod maildir;
