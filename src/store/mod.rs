//! Where an accepted message goes. A store *plans*; the worker performs the plan through the
//! ring. Never parses SMTP.
//!
//! CONTRACT (store author fills in; worker author calls):
//! - `maildir::Maildir::recover(dir)` once, before any worker starts: creates DIR/{tmp,new,cur}
//!   and deletes what a crash left in tmp/ (never acknowledged, so never owed to anyone).
//! - `maildir::Maildir::open(dir, worker_index, hostname)` per worker at start-up (blocking is
//!   fine there): creates DIR/{tmp,new,cur} if needed, checks that tmp/ is writable, opens new/
//!   for the directory fsync, returns the store or a one-line error for people.
//! - `Maildir::prepare(&mut self, &Envelope, now: SystemTime) -> Prepared`: a unique queue id, the
//!   tmp and new paths, and the header block (Return-Path, X-Envelope-To per recipient,
//!   Received:) that goes before `message.body`. The worker then, through the ring: openat(tmp,
//!   O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0o600), writev(header, body) to completion, fsync, close,
//!   renameat(tmp, new); once every message of the batch is renamed, one fsync of the new/
//!   directory (`Maildir::new_dir_fd()`, or open `Maildir::new_dir_path()`), then every session of
//!   the batch gets its 250. On any failure: unlinkat(tmp) and `commit_result_for_errno(errno)`.
//!   With `--batch-syncfs` the per-file fsync is replaced by one syncfs (of `new_dir_fd()`'s file
//!   system) once every message of the batch is written, before any of them is renamed.
//!   A body over 128 KiB is written while it arrives (the open and the first writes before the
//!   end of data, each write at its offset; see the worker's module docs), then goes on the same
//!   way. `Maildir::commit_blocking` is the same sequence with std::fs: the reference for tests.
//! - `discard::Discard`: counts and forgets; `Discard::accept(&mut self, &Message, now)` gives the
//!   queue id for the 250 at once.
//! - `Store` wraps either, opened from a `StoreSpec` with `Store::open`.
#![forbid(unsafe_code)]

pub mod discard;
pub mod maildir;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::StoreSpec;
use crate::protocol::CommitResult;

/// A store could not be set up. Display is one line for people, naming the directory.
#[derive(Debug)]
pub enum StoreError {
    /// A directory could not be created (or a file is in its place).
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The directory exists but we cannot create files in it.
    NotWritable {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// Reading or cleaning tmp/ at start-up failed.
    Recover {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Create { dir, source } => write!(
                f,
                "cannot create maildir directory {}: {source}; check --store and the permissions of its parent",
                dir.display()
            ),
            StoreError::NotWritable { dir, source } => write!(
                f,
                "maildir directory {} is not writable: {source}; fix its permissions or choose another --store",
                dir.display()
            ),
            StoreError::Recover { dir, source } => write!(
                f,
                "cannot clean up leftover files in {}: {source}; fix its permissions or remove them by hand",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Create { source, .. }
            | StoreError::NotWritable { source, .. }
            | StoreError::Recover { source, .. } => Some(source),
        }
    }
}

/// What a failed store operation (by its positive errno) means for the client: out of space
/// or quota is `452 4.3.1` (try later, maybe elsewhere), anything else `451 4.3.0`.
pub fn commit_result_for_errno(errno: i32) -> CommitResult {
    if errno == libc::ENOSPC || errno == libc::EDQUOT {
        CommitResult::NoSpace
    } else {
        CommitResult::Failed
    }
}

/// As `commit_result_for_errno`, for a `std::io::Error` (e.g. from `commit_blocking`).
pub fn commit_result_for_io_error(e: &std::io::Error) -> CommitResult {
    commit_result_for_errno(e.raw_os_error().unwrap_or(0))
}

/// Seconds and microseconds since the epoch; a clock set before 1970 reads as the epoch.
pub(crate) fn epoch_parts(now: SystemTime) -> (u64, u32) {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_micros())
}

/// A queue id: short, ASCII alphanumeric, unique across workers and restarts.
///
/// Upper-case hex fields for the time (seconds, then microseconds in exactly five digits), the
/// process id, the worker and the per-store counter, separated by letters that are not hex
/// digits, so that no two different inputs give the same text. A restart gets a new pid or a
/// later time; two workers differ in W; one worker's messages differ in Q.
pub(crate) fn queue_id(secs: u64, usecs: u32, pid: u32, worker: usize, counter: u64) -> String {
    format!("{secs:X}{usecs:05X}P{pid:X}W{worker:X}Q{counter:X}")
}

/// One worker's store, whichever kind `--store` chose.
#[derive(Debug)]
pub enum Store {
    Maildir(maildir::Maildir),
    Discard(discard::Discard),
}

impl Store {
    /// Opens the store for one worker. For a Maildir, call `Store::recover` once before.
    pub fn open(
        spec: &StoreSpec,
        worker_index: usize,
        hostname: &str,
    ) -> Result<Store, StoreError> {
        Ok(match spec {
            StoreSpec::Maildir(dir) => {
                Store::Maildir(maildir::Maildir::open(dir, worker_index, hostname)?)
            }
            StoreSpec::Discard => Store::Discard(discard::Discard::new(worker_index)),
        })
    }

    /// The once-per-process start-up step (see `Maildir::recover`); returns how many leftover
    /// tmp files were deleted.
    pub fn recover(spec: &StoreSpec) -> Result<usize, StoreError> {
        match spec {
            StoreSpec::Maildir(dir) => maildir::Maildir::recover(dir),
            StoreSpec::Discard => Ok(0),
        }
    }

    /// The Maildir directory, if this is one (for logs).
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Store::Maildir(m) => Some(m.dir()),
            Store::Discard(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_sends_space_errors_to_452_and_the_rest_to_451() {
        assert_eq!(commit_result_for_errno(libc::ENOSPC), CommitResult::NoSpace);
        assert_eq!(commit_result_for_errno(libc::EDQUOT), CommitResult::NoSpace);
        assert_eq!(commit_result_for_errno(libc::EIO), CommitResult::Failed);
        assert_eq!(commit_result_for_errno(libc::EEXIST), CommitResult::Failed);
        assert_eq!(commit_result_for_errno(0), CommitResult::Failed);
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(commit_result_for_io_error(&e), CommitResult::NoSpace);
    }

    #[test]
    fn queue_ids_differ_in_every_component_and_stay_short() {
        let base = queue_id(1_700_000_000, 5, 1234, 0, 0);
        let variants = [
            queue_id(1_700_000_001, 5, 1234, 0, 0),
            queue_id(1_700_000_000, 6, 1234, 0, 0),
            queue_id(1_700_000_000, 5, 1235, 0, 0),
            queue_id(1_700_000_000, 5, 1234, 1, 0),
            queue_id(1_700_000_000, 5, 1234, 0, 1),
        ];
        for v in &variants {
            assert_ne!(&base, v);
        }
        assert_eq!(base, "6553F10000005P4D2W0Q0");
        // Microseconds take exactly five hex digits, so where the seconds end is never ambiguous.
        assert_eq!(queue_id(0x1, 0x12, 1, 0, 0), "100012P1W0Q0");
        assert_eq!(queue_id(0x1, 999_999, 1, 0, 0), "1F423FP1W0Q0");
        assert!(base.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(
            queue_id(
                u64::from(u32::MAX),
                999_999,
                u32::MAX,
                1023,
                u64::from(u32::MAX)
            )
            .len()
                <= 36
        );
    }

    #[test]
    fn store_error_display_is_one_line_naming_the_directory() {
        let e = StoreError::Create {
            dir: PathBuf::from("/srv/mail/tmp"),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        };
        let s = e.to_string();
        assert!(s.contains("/srv/mail/tmp"), "{s}");
        assert!(s.contains("--store"), "{s}");
        assert!(!s.contains('\n'), "{s}");
    }
}
