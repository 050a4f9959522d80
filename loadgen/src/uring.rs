//! The only module with `unsafe` code: one io_uring per thread and the buffers the kernel uses.
//!
//! # Who owns a buffer while an operation is in flight
//!
//! The ring owns every buffer the kernel reads or writes: per connection slot a command buffer
//! (sent), a receive buffer (written by the kernel) and the target address (read by connect),
//! plus the message bytes shared by all slots. From the push of an operation until its completion
//! is reaped, the buffer it names belongs to the kernel: the slot's `busy` bits record that, the
//! safe accessor (`recv_and_cmd`) panics rather than hand out a buffer the kernel is using,
//! and nothing here frees or reallocates a buffer while its bit is set. On drop, operations still
//! in flight are cancelled and waited for; if they cannot be, the buffers are leaked rather than
//! freed under the kernel.
//!
//! Completions are reaped into the caller's vector and handled outside the reap (no callbacks
//! inside the ring). Waits use the kernel's timeout argument, not timeout entries.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Receive buffer per connection: a whole EHLO reply fits; longer replies take several reads.
pub const RECV_BYTES: usize = 4096;

/// What an operation was, carried in the low byte of its user_data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Connect = 1,
    SendCmd = 2,
    SendMessage = 3,
    Recv = 4,
    Cancel = 5,
    Close = 6,
}

impl OpKind {
    fn from_u8(v: u8) -> OpKind {
        match v {
            1 => OpKind::Connect,
            2 => OpKind::SendCmd,
            3 => OpKind::SendMessage,
            4 => OpKind::Recv,
            5 => OpKind::Cancel,
            6 => OpKind::Close,
            _ => unreachable!("user_data kind {v} was never pushed"),
        }
    }
    fn busy_bit(self) -> u8 {
        match self {
            OpKind::Connect => 1,
            OpKind::SendCmd => 2,
            OpKind::SendMessage => 4,
            OpKind::Recv => 8,
            OpKind::Close => 16,
            // A cancel names no buffer.
            OpKind::Cancel => 0,
        }
    }
}

/// A reaped completion: which slot and generation, what operation, and the kernel's result.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub slot: u32,
    pub gen: u16,
    pub kind: OpKind,
    /// Bytes or 0 on success, `-errno` on failure.
    pub result: i32,
}

fn user_data(slot: u32, gen: u16, kind: OpKind) -> u64 {
    (u64::from(slot) << 32) | (u64::from(gen) << 8) | kind as u64
}

struct SlotBufs {
    cmd: Vec<u8>,
    recv: Box<[u8]>,
    busy: u8,
}

pub struct Ring {
    ring: IoUring,
    slots: Vec<SlotBufs>,
    /// The connect target; read by the kernel during every connect, never changed.
    addr: Box<socket2::SockAddr>,
    message: Box<[u8]>,
    /// Operations pushed and not yet reaped (cancels included).
    in_flight: usize,
    /// The kernel understands a minimum wait before returning fewer completions (6.12+).
    min_wait: bool,
}

impl Ring {
    /// A ring for `slots` connections. Tries the cheapest set-up first (single issuer, task
    /// work deferred to our own waits) and falls back for older kernels.
    pub fn new(slots: usize, addr: socket2::SockAddr, message: Vec<u8>) -> io::Result<Ring> {
        // Each slot has at most connect|send|recv|close and a cancel in flight.
        let entries = (slots * 4 + 64).next_power_of_two().min(32768) as u32;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            // Pending task work shows in the ring's flags, so `poll` enters the kernel for it.
            .setup_taskrun_flag()
            .setup_cqsize(entries * 2)
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))?;
        let slots = (0..slots)
            .map(|_| SlotBufs {
                cmd: Vec::new(),
                recv: Box::new([]),
                busy: 0,
            })
            .collect();
        let min_wait = ring.params().is_feature_min_timeout();
        Ok(Ring {
            min_wait,
            ring,
            slots,
            addr: Box::new(addr),
            message: message.into_boxed_slice(),
            in_flight: 0,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether any operation naming this slot's buffers is in flight.
    pub fn slot_busy(&self, slot: u32) -> bool {
        self.slots[slot as usize].busy != 0
    }

    pub fn op_busy(&self, slot: u32, kind: OpKind) -> bool {
        self.slots[slot as usize].busy & kind.busy_bit() != 0
    }

    pub fn message_len(&self) -> usize {
        self.message.len()
    }

    /// The received bytes and, unless a send from it is in flight (`cmd_busy`), the command
    /// buffer, at once: replies are parsed straight out of the receive buffer while the next
    /// commands are written.
    pub fn recv_and_cmd(
        &mut self,
        slot: u32,
        len: usize,
        cmd_busy: bool,
    ) -> (&[u8], Option<&mut Vec<u8>>) {
        let s = &mut self.slots[slot as usize];
        assert!(
            s.busy & OpKind::Recv.busy_bit() == 0,
            "receive buffer of slot {slot} is in flight"
        );
        assert_eq!(cmd_busy, s.busy & OpKind::SendCmd.busy_bit() != 0);
        let cmd = if cmd_busy { None } else { Some(&mut s.cmd) };
        (&s.recv[..len], cmd)
    }

    fn push(&mut self, entry: squeue::Entry, slot: u32, kind: OpKind) -> io::Result<()> {
        loop {
            // SAFETY: every buffer `entry` names is owned by `self` (see the module docs) and is
            // marked busy below before the kernel can see the entry, so it stays valid and
            // unaliased until the completion is reaped in `reap`.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // A full submission queue: hand what is queued to the kernel and retry.
            self.ring.submit()?;
        }
        self.slots[slot as usize].busy |= kind.busy_bit();
        self.in_flight += 1;
        Ok(())
    }

    /// The command buffer of `slot`, to be filled before a `send_cmd` (none may be in flight).
    pub fn cmd_mut(&mut self, slot: u32) -> &mut Vec<u8> {
        let s = &mut self.slots[slot as usize];
        assert!(
            s.busy & OpKind::SendCmd.busy_bit() == 0,
            "command buffer of slot {slot} is in flight"
        );
        &mut s.cmd
    }

    pub fn connect(&mut self, slot: u32, gen: u16, fd: RawFd) -> io::Result<()> {
        let e = opcode::Connect::new(types::Fd(fd), self.addr.as_ptr().cast(), self.addr.len())
            .build()
            .user_data(user_data(slot, gen, OpKind::Connect));
        self.push(e, slot, OpKind::Connect)
    }

    /// Sends the command buffer from `offset` on.
    pub fn send_cmd(&mut self, slot: u32, gen: u16, fd: RawFd, offset: usize) -> io::Result<()> {
        let s = &self.slots[slot as usize];
        assert!(s.busy & OpKind::SendCmd.busy_bit() == 0);
        let buf = &s.cmd[offset..];
        let e = opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(slot, gen, OpKind::SendCmd));
        self.push(e, slot, OpKind::SendCmd)
    }

    /// Sends the shared message bytes from `offset` on.
    pub fn send_message(
        &mut self,
        slot: u32,
        gen: u16,
        fd: RawFd,
        offset: usize,
    ) -> io::Result<()> {
        let buf = &self.message[offset..];
        let e = opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(slot, gen, OpKind::SendMessage));
        self.push(e, slot, OpKind::SendMessage)
    }

    pub fn recv(&mut self, slot: u32, gen: u16, fd: RawFd) -> io::Result<()> {
        let s = &mut self.slots[slot as usize];
        assert!(s.busy & OpKind::Recv.busy_bit() == 0);
        if s.recv.is_empty() {
            // Allocated on a slot's first use, then kept: open-loop slots may never be used.
            s.recv = vec![0u8; RECV_BYTES].into_boxed_slice();
        }
        // The reply is not there yet when we ask (we just sent the command), so skip the first
        // non-blocking attempt and go straight to waiting (IORING_RECVSEND_POLL_FIRST).
        const POLL_FIRST: u16 = 1;
        let e = opcode::Recv::new(types::Fd(fd), s.recv.as_mut_ptr(), s.recv.len() as u32)
            .ioprio(POLL_FIRST)
            .build()
            .user_data(user_data(slot, gen, OpKind::Recv));
        self.push(e, slot, OpKind::Recv)
    }

    /// Cancels every operation on `fd` (they complete with -ECANCELED).
    pub fn cancel_fd(&mut self, slot: u32, gen: u16, fd: RawFd) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data(slot, gen, OpKind::Cancel));
        self.push(e, slot, OpKind::Cancel)
    }

    pub fn close(&mut self, slot: u32, gen: u16, fd: RawFd) -> io::Result<()> {
        let e = opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(user_data(slot, gen, OpKind::Close));
        self.push(e, slot, OpKind::Close)
    }

    /// Submits what is queued and waits for at least one completion or until `timeout`.
    pub fn submit_and_wait(
        &mut self,
        timeout: Option<Duration>,
        want: usize,
        min_wait_us: u32,
    ) -> io::Result<()> {
        // `want` completions, but fewer once `min_wait_us` has passed (the --batch window).
        let min_wait_us = if self.min_wait { min_wait_us } else { 0 };
        let r = match timeout {
            None => self.ring.submitter().submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new()
                    .timespec(&ts)
                    .min_wait_usec(min_wait_us);
                self.ring
                    .submitter()
                    .submit_with_args(if min_wait_us > 0 { want.max(1) } else { 1 }, &args)
            }
        };
        entered(r)
    }

    /// Submits what is queued and collects what has completed, without waiting. With deferred
    /// task work, completions are only posted while the thread is in the kernel asking for
    /// events; the ring's task-run flag (set up in `new`) tells the submitter when to ask.
    pub fn poll(&mut self) -> io::Result<()> {
        let args = types::SubmitArgs::new();
        entered(self.ring.submitter().submit_with_args(0, &args))
    }

    /// Moves every available completion into `out` and releases the buffers they named.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            let kind = OpKind::from_u8(ud as u8);
            let slot = (ud >> 32) as u32;
            debug_assert!(
                !cqueue::more(cqe.flags()),
                "no multishot operations are used"
            );
            self.slots[slot as usize].busy &= !kind.busy_bit();
            self.in_flight -= 1;
            out.push(Completion {
                slot,
                gen: (ud >> 8) as u16,
                kind,
                result: cqe.result(),
            });
        }
    }
}

/// The outcome of an `io_uring_enter`: a timeout, a signal, or a full completion queue (reap,
/// then enter again) are all normal returns for the loop.
fn entered(r: io::Result<usize>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        // Cancel everything and wait (bounded) so the kernel is done with our buffers.
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(u64::MAX);
        // SAFETY: a cancel names no buffer.
        let _ = unsafe { self.ring.submission().push(&e) };
        let mut buf = Vec::new();
        for _ in 0..100 {
            let _ = self.submit_and_wait(Some(Duration::from_millis(10)), 1, 0);
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                if cqe.user_data() != u64::MAX {
                    buf.push(cqe.user_data());
                }
            }
            drop(cq);
            if buf.len() >= self.in_flight {
                return;
            }
        }
        // The kernel may still read or write them: leak rather than free.
        std::mem::forget(std::mem::take(&mut self.slots));
        std::mem::forget(std::mem::take(&mut self.message));
        let addr = std::mem::replace(
            &mut self.addr,
            Box::new(socket2::SockAddr::from(std::net::SocketAddr::from((
                [0, 0, 0, 0],
                0,
            )))),
        );
        std::mem::forget(addr);
    }
}

/// Raises the soft limit on open files to the hard limit (open loops can hold many
/// connections). Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass, which lives across the call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Grows this process's descriptor table to `n` slots by asking for a descriptor at `n - 1` and
/// closing it again. `n` must not exceed the open-file limit (`raise_nofile_limit`'s answer).
/// Call it before the first thread starts.
///
/// Why: when a new descriptor does not fit, the kernel grows the table, and in a process with
/// more than one thread it waits for an RCU grace period before the socket(2) returns. Each
/// doubling stopped the sending thread for 7-43 ms in the first half second of an open-loop run
/// (sched_switch traces, BENCHMARKS.md), and since latency counts from the scheduled start, that
/// stop was in the figures of every session due meanwhile. The table costs 8 bytes of kernel
/// memory per slot.
pub fn reserve_fd_table(n: u64) {
    let Ok(dir) = std::fs::File::open("/") else {
        return;
    };
    let top = n.saturating_sub(1).min(i32::MAX as u64) as libc::c_int;
    // SAFETY: F_DUPFD_CLOEXEC only duplicates `dir`, which is open for the whole call; the new
    // descriptor is ours alone and closed at once.
    unsafe {
        let fd = libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            libc::F_DUPFD_CLOEXEC,
            top,
        );
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// The local address of the connected socket `fd`.
pub fn local_addr(fd: RawFd) -> io::Result<std::net::SocketAddr> {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is an open socket the caller owns for the whole call; `ManuallyDrop` keeps
    // this temporary `Socket` from closing it.
    let socket = std::mem::ManuallyDrop::new(unsafe { socket2::Socket::from_raw_fd(fd) });
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("the socket has no IP address"))
}

/// CPU time (user + system) used by this process so far.
pub fn process_cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe_zeroed_rusage();
    // SAFETY: getrusage writes into the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn unsafe_zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}
