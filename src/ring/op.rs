//! `Op`: what the kernel should do, with the buffers it needs owned by the op itself, and the
//! named outcome of every completion (STYLE habit 4: the worker sees `PeerClosed`, never -104).
//!
//! An `Op` is moved into the ring by `Ring::push` and handed back in the `Completion` once the
//! kernel is done with it, so a buffer can never be freed or reused while the kernel may still
//! touch it (see `bufs` module docs for the ownership rules).
use std::ffi::CString;
use std::os::fd::RawFd;

/// What the worker wants the kernel to do. Buffers live inside the op while it is in flight.
#[derive(Debug)]
pub enum Op {
    /// Multishot accept on a listening socket: one completion per connection.
    AcceptMulti { fd: RawFd },
    /// Multishot receive into the provided-buffer ring: one completion per read. With `cap`
    /// (Linux 6.17; 0 for none) it ends by itself once it has taken that many bytes, so
    /// that what it reads between a decision to stop it and its cancel landing is bounded;
    /// `Op::recv_multi` sets the cap this kernel supports (see `Ring::probe`).
    RecvMulti { fd: RawFd, cap: u32 },
    /// One receive into the provided-buffer ring: for a connection whose input must be taken
    /// one buffer at a time (a multishot one reads all the socket holds before a cancel lands).
    RecvOnce { fd: RawFd },
    /// Send `buf[off..]`. A short send completes with fewer bytes; push again from the new offset.
    /// `then_close`: the socket is closed right after this send completes, so the kernel may hold
    /// the bytes (MSG_MORE) and put them in one segment with the FIN the close sends, instead of
    /// two packets.
    Send {
        fd: RawFd,
        buf: Vec<u8>,
        off: usize,
        then_close: bool,
    },
    /// Read 8 bytes (an eventfd counter).
    ReadEventFd { fd: RawFd, buf: Box<[u8; 8]> },
    /// `openat(AT_FDCWD, path, flags, mode)`.
    OpenAt {
        path: CString,
        flags: i32,
        mode: u32,
    },
    /// Write `head` then `body` to a file at offset `at`, skipping the first `done` bytes of
    /// the two together, at file offset `at + done` (so a short write is resumed by pushing
    /// again with a larger `done`).
    Write2 {
        fd: RawFd,
        head: Vec<u8>,
        body: Vec<u8>,
        at: u64,
        done: usize,
        iov: Box<[libc::iovec; 2]>,
    },
    /// `fsync(fd)`.
    Fsync { fd: RawFd },
    /// `close(fd)`.
    Close { fd: RawFd },
    /// `syncfs(fd)`: write back every dirty file and metadata block of the file system that
    /// holds `fd` and flush the device, in one pass (one block plug for all of them). io_uring
    /// has no such op, so the ring runs it on its helper thread (see `Ring`); the worker never
    /// blocks on it and gets its completion like any other.
    SyncFs { fd: RawFd },
    /// `renameat(AT_FDCWD, from, AT_FDCWD, to)`.
    RenameAt { from: CString, to: CString },
    /// `unlinkat(AT_FDCWD, path, 0)`.
    UnlinkAt { path: CString },
    /// Cancel the op with this id (`Ring::push` returned it).
    Cancel { target: u64 },
}

impl Op {
    /// A multishot receive with the cap on its bytes this kernel supports (none before 6.17).
    pub fn recv_multi(fd: RawFd) -> Op {
        Op::RecvMulti {
            fd,
            cap: super::recv_multi_cap(),
        }
    }

    /// The op's name for log lines ("unexpected errno 22 from send").
    pub fn name(&self) -> &'static str {
        match self {
            Op::AcceptMulti { .. } => "accept",
            Op::RecvMulti { .. } | Op::RecvOnce { .. } => "recv",
            Op::Send { .. } => "send",
            Op::ReadEventFd { .. } => "read",
            Op::OpenAt { .. } => "openat",
            Op::Write2 { .. } => "writev",
            Op::Fsync { .. } => "fsync",
            Op::Close { .. } => "close",
            Op::SyncFs { .. } => "syncfs",
            Op::RenameAt { .. } => "renameat",
            Op::UnlinkAt { .. } => "unlinkat",
            Op::Cancel { .. } => "async_cancel",
        }
    }

    /// A `Write2` that completed with `n` more bytes written: `Ok` with the write of what is
    /// left of `head` + `body` (a short write, resumed at the right file offset), or `Err`
    /// with the op itself when nothing is left or `n` is 0 (no progress), or for any other op.
    pub fn write_rest(self, n: usize) -> Result<Op, Op> {
        match self {
            Op::Write2 {
                fd,
                head,
                body,
                at,
                done,
                ..
            } if n > 0 && done + n < head.len() + body.len() => {
                Ok(Op::write_at(fd, head, body, at, done + n))
            }
            op => Err(op),
        }
    }

    /// A Write2 op for `head` + `body` from the start of the file, after `done` bytes.
    pub fn write2(fd: RawFd, head: Vec<u8>, body: Vec<u8>, done: usize) -> Op {
        Op::write_at(fd, head, body, 0, done)
    }

    /// A Write2 op for `head` + `body` at file offset `at`, after `done` bytes.
    pub fn write_at(fd: RawFd, head: Vec<u8>, body: Vec<u8>, at: u64, done: usize) -> Op {
        let iov = Box::new(
            [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        );
        Op::Write2 {
            fd,
            head,
            body,
            at,
            done,
            iov,
        }
    }
}

/// The worker's name for an op: what it belongs to. Carried through the ring unchanged.
///
/// Layout of the `u64`: bits 0..32 slot, bits 32..56 generation, bits 56..64 kind. A slot is
/// reused only with a new generation, so a late completion for a closed connection is recognised
/// and dropped instead of being delivered to the connection now living in that slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

impl Token {
    pub const GEN_MASK: u32 = (1 << 24) - 1;

    pub fn new(kind: u8, slot: u32, generation: u32) -> Token {
        Token(((kind as u64) << 56) | (((generation & Self::GEN_MASK) as u64) << 32) | slot as u64)
    }
    pub fn kind(self) -> u8 {
        (self.0 >> 56) as u8
    }
    pub fn slot(self) -> u32 {
        self.0 as u32
    }
    pub fn generation(self) -> u32 {
        ((self.0 >> 32) as u32) & Self::GEN_MASK
    }
}

/// Errno values as positive numbers, from a completion's negative result.
fn errno_of(res: i32) -> i32 {
    -res
}

/// Multishot accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptOutcome {
    Accepted(RawFd),
    /// The peer went away before we accepted, or a signal: try the next one.
    Transient,
    /// Out of descriptors or memory: the connection was not accepted; re-arm after a pause.
    Exhausted,
    /// The listener was cancelled or closed (shutdown).
    Canceled,
    Unexpected(i32),
}

impl AcceptOutcome {
    pub fn from_result(res: i32) -> AcceptOutcome {
        if res >= 0 {
            return AcceptOutcome::Accepted(res);
        }
        match errno_of(res) {
            libc::EINTR
            | libc::EAGAIN
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH => AcceptOutcome::Transient,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => AcceptOutcome::Exhausted,
            libc::ECANCELED | libc::EBADF | libc::EINVAL => AcceptOutcome::Canceled,
            e => AcceptOutcome::Unexpected(e),
        }
    }
}

/// Multishot receive with a provided buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvOutcome {
    /// `len` bytes in provided buffer `bid` (give it back with `Ring::recycle`).
    Data {
        bid: u16,
        len: usize,
    },
    /// The peer closed its side (a 0-byte read).
    Eof,
    /// The buffer ring ran dry; the multishot recv has ended and must be re-armed.
    NoBuffers,
    /// A signal or spurious wake: re-arm.
    Retry,
    /// Reset, timed out, unreachable: the connection is gone.
    PeerClosed,
    /// We cancelled it (pause for back-pressure, or close).
    Canceled,
    Unexpected(i32),
}

impl RecvOutcome {
    pub fn from_result(res: i32, bid: Option<u16>) -> RecvOutcome {
        if res > 0 {
            return match bid {
                Some(bid) => RecvOutcome::Data {
                    bid,
                    len: res as usize,
                },
                // A positive result without a buffer would be a kernel contract break.
                None => RecvOutcome::Unexpected(0),
            };
        }
        if res == 0 {
            return RecvOutcome::Eof;
        }
        match errno_of(res) {
            libc::ENOBUFS => RecvOutcome::NoBuffers,
            libc::EINTR | libc::EAGAIN => RecvOutcome::Retry,
            libc::ECONNRESET
            | libc::EPIPE
            | libc::ETIMEDOUT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ENETDOWN
            | libc::ECONNREFUSED
            | libc::ENOTCONN
            | libc::ECONNABORTED => RecvOutcome::PeerClosed,
            libc::ECANCELED => RecvOutcome::Canceled,
            e => RecvOutcome::Unexpected(e),
        }
    }
}

/// Send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// This many bytes went out (maybe fewer than asked: push the rest).
    Sent(usize),
    Retry,
    PeerClosed,
    Canceled,
    Unexpected(i32),
}

impl SendOutcome {
    pub fn from_result(res: i32) -> SendOutcome {
        if res >= 0 {
            return SendOutcome::Sent(res as usize);
        }
        match errno_of(res) {
            libc::EINTR | libc::EAGAIN | libc::ENOBUFS => SendOutcome::Retry,
            libc::ECONNRESET
            | libc::EPIPE
            | libc::ETIMEDOUT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ENETDOWN
            | libc::ENOTCONN
            | libc::ECONNREFUSED
            | libc::ECONNABORTED => SendOutcome::PeerClosed,
            libc::ECANCELED => SendOutcome::Canceled,
            e => SendOutcome::Unexpected(e),
        }
    }
}

/// File operations of a commit (openat, writev, fsync, syncfs, close, renameat, unlinkat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOutcome {
    /// The non-negative result (a descriptor for openat, a byte count for writev).
    Done(i32),
    /// Resubmit the same step.
    Retry,
    /// ENOSPC or EDQUOT: the client hears 452.
    NoSpace,
    /// Any other failure (EIO, EACCES, EROFS, ...): the client hears 451.
    Failed(i32),
}

impl FileOutcome {
    pub fn from_result(res: i32) -> FileOutcome {
        if res >= 0 {
            return FileOutcome::Done(res);
        }
        match errno_of(res) {
            libc::EINTR | libc::EAGAIN => FileOutcome::Retry,
            libc::ENOSPC | libc::EDQUOT => FileOutcome::NoSpace,
            e => FileOutcome::Failed(e),
        }
    }
}

/// Async cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Done,
    /// The target had already completed (ENOENT) or was past cancelling (EALREADY).
    TooLate,
    Unexpected(i32),
}

impl CancelOutcome {
    pub fn from_result(res: i32) -> CancelOutcome {
        if res >= 0 {
            return CancelOutcome::Done;
        }
        match errno_of(res) {
            libc::ENOENT | libc::EALREADY => CancelOutcome::TooLate,
            e => CancelOutcome::Unexpected(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_slot_generation_and_kind() {
        let t = Token::new(7, 123_456, 0xABCDEF);
        assert_eq!((t.kind(), t.slot(), t.generation()), (7, 123_456, 0xABCDEF));
        // The generation wraps inside its 24 bits instead of spilling into the kind.
        let t = Token::new(3, u32::MAX, Token::GEN_MASK + 2);
        assert_eq!((t.kind(), t.slot(), t.generation()), (3, u32::MAX, 1));
    }

    #[test]
    fn recv_errnos_map_to_named_outcomes() {
        assert_eq!(
            RecvOutcome::from_result(5, Some(9)),
            RecvOutcome::Data { bid: 9, len: 5 }
        );
        assert_eq!(RecvOutcome::from_result(0, None), RecvOutcome::Eof);
        assert_eq!(
            RecvOutcome::from_result(-libc::ENOBUFS, None),
            RecvOutcome::NoBuffers
        );
        assert_eq!(
            RecvOutcome::from_result(-libc::ECONNRESET, None),
            RecvOutcome::PeerClosed
        );
        assert_eq!(
            RecvOutcome::from_result(-libc::EINTR, None),
            RecvOutcome::Retry
        );
        assert_eq!(
            RecvOutcome::from_result(-libc::ECANCELED, None),
            RecvOutcome::Canceled
        );
        assert_eq!(
            RecvOutcome::from_result(-libc::EINVAL, None),
            RecvOutcome::Unexpected(libc::EINVAL)
        );
        assert_eq!(
            RecvOutcome::from_result(3, None),
            RecvOutcome::Unexpected(0)
        );
    }

    #[test]
    fn send_accept_file_and_cancel_errnos_map_to_named_outcomes() {
        assert_eq!(SendOutcome::from_result(10), SendOutcome::Sent(10));
        assert_eq!(
            SendOutcome::from_result(-libc::EPIPE),
            SendOutcome::PeerClosed
        );
        assert_eq!(SendOutcome::from_result(-libc::EAGAIN), SendOutcome::Retry);
        assert_eq!(AcceptOutcome::from_result(4), AcceptOutcome::Accepted(4));
        assert_eq!(
            AcceptOutcome::from_result(-libc::ECONNABORTED),
            AcceptOutcome::Transient
        );
        assert_eq!(
            AcceptOutcome::from_result(-libc::EMFILE),
            AcceptOutcome::Exhausted
        );
        assert_eq!(
            AcceptOutcome::from_result(-libc::ECANCELED),
            AcceptOutcome::Canceled
        );
        assert_eq!(
            FileOutcome::from_result(-libc::ENOSPC),
            FileOutcome::NoSpace
        );
        assert_eq!(
            FileOutcome::from_result(-libc::EDQUOT),
            FileOutcome::NoSpace
        );
        assert_eq!(
            FileOutcome::from_result(-libc::EIO),
            FileOutcome::Failed(libc::EIO)
        );
        assert_eq!(FileOutcome::from_result(-libc::EINTR), FileOutcome::Retry);
        assert_eq!(
            CancelOutcome::from_result(-libc::ENOENT),
            CancelOutcome::TooLate
        );
        assert_eq!(CancelOutcome::from_result(0), CancelOutcome::Done);
    }
}
