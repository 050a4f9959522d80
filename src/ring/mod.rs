//! The only place that touches the kernel after start-up: io_uring set-up and feature probe,
//! the provided-buffer ring, pushing ops, waiting with a deadline and reaping completions.
//! Knows nothing about SMTP.
//!
//! Every op is moved into the ring's in-flight table when pushed and handed back with its
//! final completion (see `bufs` for the buffer-ownership rules). The io_uring `user_data` is
//! the op's table slot plus a generation; the worker's own `Token` travels alongside.
//! Completions are reaped into a queue first and handled by the caller afterwards, never from
//! inside the reap (STYLE habit 4). An interrupted single-shot op (EINTR) is pushed again here
//! and never reaches the caller; a full submission queue is flushed and the push retried.
//!
//! Where the kernel can (Linux 6.17, found by `Ring::probe`), a multishot receive ends by itself
//! after `RECV_MULTI_CAP` bytes and the caller arms another; the field has no setter in the
//! io-uring crate and is set on the raw entry (`with_recv_cap`).
//!
//! One op has no io_uring opcode: `Op::SyncFs`. A ring runs it on a helper thread of its own,
//! started at first use, and learns of its end through an eventfd that it reads like any other
//! op, so the caller pushes it and reaps its completion exactly as for the rest.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bufs;
pub mod op;
pub mod slab;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

pub use bufs::BufRing;
pub use op::{AcceptOutcome, CancelOutcome, FileOutcome, Op, RecvOutcome, SendOutcome, Token};

/// Why the ring cannot be used, in words a person can act on.
#[derive(Debug)]
pub enum SetupError {
    /// io_uring_setup itself failed.
    Setup { errno: i32, cause: String },
    /// The kernel lacks an operation or feature the loop needs.
    Missing { what: &'static str, cause: String },
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Setup { errno, cause } => {
                write!(
                    f,
                    "io_uring is not available (io_uring_setup: {}): {cause}",
                    io::Error::from_raw_os_error(*errno)
                )
            }
            SetupError::Missing { what, cause } => {
                write!(f, "io_uring lacks {what}, which ringmx needs: {cause}")
            }
        }
    }
}

impl std::error::Error for SetupError {}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Explains a failed io_uring_setup: sysctl, seccomp, memlock or an old kernel.
fn diagnose_setup(errno: i32) -> String {
    let release = kernel_release();
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match errno {
        libc::EPERM => match disabled {
            Some(2) => "the sysctl kernel.io_uring_disabled is 2 (io_uring disabled for everyone); set it to 0".into(),
            Some(1) => "the sysctl kernel.io_uring_disabled is 1 (only the kernel.io_uring_group may use io_uring); \
                        run as a member of that group or set it to 0"
                .into(),
            _ => "a seccomp profile forbids io_uring_setup (common in containers: docker/podman's default \
                  profile); run with a profile that allows io_uring_setup, io_uring_enter and io_uring_register"
                .into(),
        },
        libc::ENOSYS => format!(
            "the kernel ({release}) has no io_uring syscalls: either it is older than 5.1 / built without \
             CONFIG_IO_URING, or a seccomp profile (container default) answers ENOSYS; ringmx needs Linux 6.0 or later"
        ),
        libc::ENOMEM => "not enough locked memory for the rings: raise RLIMIT_MEMLOCK (ulimit -l)".into(),
        libc::EINVAL => format!("the kernel ({release}) rejected the ring parameters; ringmx needs Linux 6.0 or later"),
        _ => format!("unexpected error on kernel {release}"),
    }
}

/// The opcodes the worker loop pushes, with their names for the probe's message.
const NEEDED_OPS: &[(u8, &str)] = &[
    (opcode::AcceptMulti::CODE, "ACCEPT"),
    (opcode::RecvMulti::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::Read::CODE, "READ"),
    (opcode::OpenAt::CODE, "OPENAT"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Close::CODE, "CLOSE"),
    (opcode::RenameAt::CODE, "RENAMEAT"),
    (opcode::UnlinkAt::CODE, "UNLINKAT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

/// Seeded faults for tests (STYLE habit 5, on the real kernel): each pushed op may be refused
/// with an errno without being performed, or a send or write cut short. Percentages are per op.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub seed: u64,
    /// Any single-shot op except cancel and close: EINTR, which the ring must resubmit.
    pub eintr_pct: u32,
    /// Sends and writes: a real short send or write of a random prefix.
    pub short_pct: u32,
    /// openat, writev, fsync, syncfs, renameat: ENOSPC or EIO, which the store path must survive.
    pub file_error_pct: u32,
    /// Sends and (multishot) receives: ECONNRESET, as if the peer had reset the connection.
    pub reset_pct: u32,
}

enum Fault {
    None,
    Errno(i32),
    Short(usize),
}

struct FaultPlan {
    faults: Faults,
    rng: u64,
}

impl FaultPlan {
    /// xorshift64: deterministic for a seed, no dependency.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn roll(&mut self, pct: u32) -> bool {
        pct > 0 && self.next() % 100 < pct as u64
    }

    fn decide(&mut self, op: &Op) -> Fault {
        let f = self.faults;
        let single_shot = !matches!(
            op,
            Op::AcceptMulti { .. } | Op::RecvMulti { .. } | Op::Cancel { .. } | Op::Close { .. }
        );
        if single_shot && self.roll(f.eintr_pct) {
            return Fault::Errno(libc::EINTR);
        }
        let socket_op = matches!(
            op,
            Op::Send { .. } | Op::RecvMulti { .. } | Op::RecvOnce { .. }
        );
        if socket_op && self.roll(f.reset_pct) {
            return Fault::Errno(libc::ECONNRESET);
        }
        let file_op = matches!(
            op,
            Op::OpenAt { .. }
                | Op::Write2 { .. }
                | Op::Fsync { .. }
                | Op::SyncFs { .. }
                | Op::RenameAt { .. }
        );
        if file_op && self.roll(f.file_error_pct) {
            return Fault::Errno(if self.next().is_multiple_of(2) {
                libc::ENOSPC
            } else {
                libc::EIO
            });
        }
        let len = match op {
            Op::Send { buf, off, .. } => buf.len().saturating_sub(*off),
            Op::Write2 {
                head, body, done, ..
            } => (head.len() + body.len()).saturating_sub(*done),
            _ => 0,
        };
        if len > 1 && self.roll(f.short_pct) {
            return Fault::Short(1 + (self.next() as usize) % (len - 1));
        }
        Fault::None
    }
}

/// One completion, reaped and ready for the caller.
#[derive(Debug)]
pub struct Completion {
    pub token: Token,
    pub res: i32,
    pub flags: u32,
    /// The op handed back: `Some` on its final completion, `None` while a multishot op goes on.
    pub op: Option<Op>,
    /// The provided buffer this completion filled, now owned by the caller until `recycle`.
    pub bid: Option<u16>,
}

impl Completion {
    /// A multishot op posts more completions after this one.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

struct InFlight {
    token: Token,
    op: Op,
}

/// The token of the ring's own eventfd read, which tells it that the helper thread finished
/// ops (see `Helper`). Never handed to the caller.
const HELPER_TOKEN: Token = Token(u64::MAX - 1);

/// Runs the ops io_uring cannot (`Op::SyncFs`) on a thread of their own, so the worker never
/// blocks on them. The ring sends (user_data, fd, injected errno) over `tx`; the thread runs the
/// call, appends (user_data, result) to `done` and bumps `event`, which the ring reads through
/// itself; that completion moves the results into the ready queue (`Ring::reap`). The thread
/// ends when `tx` is dropped with the ring.
struct Helper {
    tx: std::sync::mpsc::Sender<(u64, RawFd, i32)>,
    done: std::sync::Arc<std::sync::Mutex<Vec<(u64, i32)>>>,
    event: std::sync::Arc<EventFd>,
}

impl Helper {
    fn spawn() -> io::Result<Helper> {
        let event = std::sync::Arc::new(EventFd::new()?);
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(u64, RawFd, i32)>();
        let (ev, out) = (event.clone(), done.clone());
        std::thread::Builder::new()
            .name("ringmx-sync".into())
            .spawn(move || {
                for (user_data, fd, injected) in rx {
                    let res = if injected != 0 {
                        -injected
                    } else {
                        syncfs_retrying(fd)
                    };
                    out.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((user_data, res));
                    ev.notify();
                }
            })?;
        Ok(Helper { tx, done, event })
    }
}

/// `syncfs(fd)`, resumed after a signal: 0 or a negative errno, like a completion's result.
fn syncfs_retrying(fd: RawFd) -> i32 {
    loop {
        // SAFETY: a plain system call on a descriptor that the op's owner keeps open until the
        // op completes (the worker's new/ directory, open for the worker's whole life).
        if unsafe { libc::syncfs(fd) } == 0 {
            return 0;
        }
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if e != libc::EINTR {
            return -e;
        }
    }
}

/// A worker's io_uring: push ops, wait, reap.
pub struct Ring {
    // Field order matters: `uring` is dropped (closing the ring and releasing the kernel's hold
    // on every buffer) before `bufs` and `table` free the memory the kernel may have used.
    uring: IoUring,
    bufs: BufRing,
    table: slab::Slab<InFlight>,
    ready: VecDeque<Completion>,
    in_flight: usize,
    /// Fault injection for tests (`inject_faults`); `None` in production.
    faults: Option<FaultPlan>,
    /// Ops replaced by a no-op, by user_data, with the errno to report.
    injected: std::collections::HashMap<u64, i32>,
    /// The thread for `Op::SyncFs`, started at its first use.
    helper: Option<Helper>,
}

/// Most io-wq workers per ring, bounded and unbounded (see `Ring::new`).
const IOWQ_WORKERS: u32 = 64;

/// The buffer group id of the receive buffers.
const BGID: u16 = 0;

impl Ring {
    /// Sets up a ring of `entries` submission entries and registers `buf_count` provided receive
    /// buffers of `buf_len` bytes. Errors say why in words.
    pub fn new(entries: u32, buf_count: u16, buf_len: u32) -> Result<Ring, SetupError> {
        let uring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).build(entries))
            .or_else(|_| IoUring::new(entries))
            .map_err(|e| {
                let errno = e.raw_os_error().unwrap_or(0);
                SetupError::Setup {
                    errno,
                    cause: diagnose_setup(errno),
                }
            })?;
        if !uring.params().is_feature_ext_arg() {
            return Err(SetupError::Missing {
                what: "IORING_FEAT_EXT_ARG (waits with a timeout)",
                cause: format!(
                    "kernel {} is older than 5.11; ringmx needs Linux 6.0 or later",
                    kernel_release()
                ),
            });
        }
        let mut probe = Probe::new();
        uring
            .submitter()
            .register_probe(&mut probe)
            .map_err(|e| SetupError::Missing {
                what: "IORING_REGISTER_PROBE",
                cause: format!("{e} (kernel {} is older than 5.6?)", kernel_release()),
            })?;
        for (code, name) in NEEDED_OPS {
            if !probe.is_supported(*code) {
                return Err(SetupError::Missing {
                    what: name,
                    cause: format!(
                        "kernel {} does not support IORING_OP_{name} (too old, or a seccomp/io_uring restriction)",
                        kernel_release()
                    ),
                });
            }
        }
        // File ops (openat, fsync, renameat) block in the kernel's io-wq workers. Their default
        // cap (4 per CPU) bounds how many file fsyncs of a group commit are in flight at once,
        // and durable throughput follows that number: 64 measured 10-15% more messages/s than
        // the default with 50 sessions on one worker. Best effort: older kernels keep theirs.
        let mut max_workers = [IOWQ_WORKERS, IOWQ_WORKERS];
        let _ = uring
            .submitter()
            .register_iowq_max_workers(&mut max_workers);
        let bufs = BufRing::new(buf_count, buf_len, BGID);
        // SAFETY: `bufs` owns the page-aligned entry array of `buf_count` entries; it lives in the
        // returned Ring and is dropped only after `uring` (field order), see `bufs` module docs.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(bufs.ring_addr(), buf_count, BGID, 0)
        }
        .map_err(|e| SetupError::Missing {
            what: "IORING_REGISTER_PBUF_RING (provided-buffer rings)",
            cause: format!(
                "{e}: kernel {} is older than 5.19; ringmx needs Linux 6.0 or later",
                kernel_release()
            ),
        })?;
        Ok(Ring {
            uring,
            bufs,
            table: slab::Slab::new(u32::MAX),
            ready: VecDeque::new(),
            in_flight: 0,
            faults: None,
            injected: std::collections::HashMap::new(),
            helper: None,
        })
    }

    /// Start-up check: can this process create a ring with everything the loop needs, and does
    /// multishot receive with provided buffers work (Linux 6.0)? Tries it on a socket pair.
    pub fn probe() -> Result<(), SetupError> {
        let mut ring = Ring::new(8, 2, 64)?;
        let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|e| SetupError::Missing {
            what: "a socket pair for the probe",
            cause: e.to_string(),
        })?;
        match probe_recv(&mut ring, Token(1), a.as_raw_fd(), 0, &b, b"x") {
            Some((1, true, true)) => {
                if probe_recv_cap(&mut ring) {
                    RECV_CAP_SUPPORTED.store(RECV_MULTI_CAP, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
            Some((res, more, _)) => Err(SetupError::Missing {
                what: "multishot RECV with provided buffers",
                cause: format!(
                    "kernel {} answered {res} (more={more}); ringmx needs Linux 6.0 or later",
                    kernel_release()
                ),
            }),
            None => Err(SetupError::Missing {
                what: "multishot RECV with provided buffers",
                cause: format!("no completion within 2s on kernel {}", kernel_release()),
            }),
        }
    }
}

/// Does a multishot receive with a byte cap end by itself at the cap (Linux 6.17)? An older
/// kernel refuses the field with EINVAL. Tried on a socket pair of its own with a cap of 2
/// bytes and 3 bytes waiting: a kernel that knows the cap reads what one buffer takes (all 3)
/// and ends the receive there, since it has its 2; without the cap the receive goes on.
fn probe_recv_cap(ring: &mut Ring) -> bool {
    let Ok((a, b)) = std::os::unix::net::UnixStream::pair() else {
        return false;
    };
    // The first completion tells: data and the end with the cap, data and more to come
    // without it, EINVAL where the kernel refuses the field.
    matches!(
        probe_recv(ring, Token(2), a.as_raw_fd(), 2, &b, b"xyz"),
        Some((res, false, _)) if res > 0
    )
}

/// Arms a multishot receive (`cap` as in `Op::RecvMulti`) on `fd`, writes `bytes` to its peer
/// and returns the receive's first completion within 2 s: result, more to come, a buffer used.
fn probe_recv(
    ring: &mut Ring,
    token: Token,
    fd: RawFd,
    cap: u32,
    peer: &std::os::unix::net::UnixStream,
    bytes: &[u8],
) -> Option<(i32, bool, bool)> {
    ring.push(token, Op::RecvMulti { fd, cap });
    use std::io::Write;
    let _ = (&*peer).write_all(bytes);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        let _ = ring.wait(Some(Duration::from_millis(100)));
        while let Some(c) = ring.next_completion() {
            if let Some(bid) = c.bid {
                ring.recycle(bid);
            }
            if c.token == token {
                return Some((c.res, c.more(), c.bid.is_some()));
            }
        }
    }
    None
}

impl Ring {
    /// Turns on seeded fault injection (tests): see `Faults`.
    pub fn inject_faults(&mut self, faults: Faults) {
        self.faults = Some(FaultPlan {
            faults,
            rng: faults.seed | 1,
        });
    }

    /// Ops pushed and not yet finally completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The received bytes of provided buffer `bid` (handed over by a completion).
    pub fn buf(&self, bid: u16, len: usize) -> &[u8] {
        self.bufs.get(bid, len)
    }

    /// Gives a provided buffer back; the kernel gets it again at a later `submit` or `wait`.
    pub fn recycle(&mut self, bid: u16) {
        self.bufs.recycle(bid);
    }

    /// A receive ended on ENOBUFS. Returns false if every receive buffer was in the worker's
    /// hands (overload); true if some were held back to keep the published ones warm (see the
    /// `bufs` module docs), in which case the next submission publishes at least twice as many.
    pub fn bufs_short(&self) -> bool {
        self.bufs.short()
    }

    pub fn bufs_held(&self) -> u32 {
        self.bufs.held()
    }

    /// Queues `op`; the kernel sees it at the next `submit` or `wait`. Returns the op's id, for
    /// `Op::Cancel`.
    pub fn push(&mut self, token: Token, op: Op) -> u64 {
        let (slot, generation) = self.table.vacant();
        let user_data = ((generation as u64) << 32) | slot as u64;
        self.table.fill(slot, InFlight { token, op });
        self.in_flight += 1;
        let fault = match self.faults.as_mut() {
            Some(f) => f.decide(&self.table.get(slot).expect("just stored").op),
            None => Fault::None,
        };
        if let Op::SyncFs { fd } = self.table.get(slot).expect("just stored").op {
            let injected = match fault {
                Fault::Errno(e) => e,
                _ => 0,
            };
            self.push_to_helper(user_data, fd, injected);
            return user_data;
        }
        let entry = match fault {
            Fault::Errno(e) => {
                // The op is not performed at all: a no-op completes in its place and reaps as
                // this errno, exactly like a kernel that refused it.
                self.injected.insert(user_data, e);
                opcode::Nop::new().build().user_data(user_data)
            }
            Fault::Short(limit) => {
                let inflight = self.table.get_any_mut(slot).expect("just stored");
                build_entry(&mut inflight.op, limit).user_data(user_data)
            }
            Fault::None => {
                let inflight = self.table.get_any_mut(slot).expect("just stored");
                build_entry(&mut inflight.op, usize::MAX).user_data(user_data)
            }
        };
        self.push_entry(&entry);
        user_data
    }

    /// Hands op `user_data` (already in the table) to the helper thread, starting it and the
    /// ring's read of its eventfd first if needed. If no thread can be started, the op completes
    /// with that errno.
    fn push_to_helper(&mut self, user_data: u64, fd: RawFd, injected: i32) {
        if self.helper.is_none() {
            match Helper::spawn() {
                Ok(h) => {
                    let efd = h.event.fd();
                    self.helper = Some(h);
                    self.arm_helper_read(efd);
                }
                Err(e) => {
                    tracing::error!("cannot start the ring's sync thread: {e}");
                    let errno = e.raw_os_error().unwrap_or(libc::EAGAIN);
                    self.helper_result(user_data, -errno);
                    return;
                }
            }
        }
        let helper = self.helper.as_ref().expect("started above");
        if helper.tx.send((user_data, fd, injected)).is_err() {
            // The thread is gone (it panicked): fail the op rather than lose it.
            self.helper_result(user_data, -libc::EIO);
        }
    }

    /// Keeps one read of the helper's eventfd in flight. It is the ring's own op: not counted
    /// in `in_flight` (the worker waits for that to reach zero at shutdown) and never faulted.
    fn arm_helper_read(&mut self, efd: RawFd) {
        let (slot, generation) = self.table.vacant();
        let user_data = ((generation as u64) << 32) | slot as u64;
        self.table.fill(
            slot,
            InFlight {
                token: HELPER_TOKEN,
                op: Op::ReadEventFd {
                    fd: efd,
                    buf: Box::new([0; 8]),
                },
            },
        );
        let inflight = self.table.get_any_mut(slot).expect("just stored");
        let entry = build_entry(&mut inflight.op, usize::MAX).user_data(user_data);
        self.push_entry(&entry);
    }

    /// A helper op finished: hand it to the caller with its op, like a kernel completion.
    fn helper_result(&mut self, user_data: u64, res: i32) {
        let (slot, generation) = (user_data as u32, (user_data >> 32) as u32);
        if self.table.get_mut(slot, generation).is_none() {
            tracing::error!("helper result for unknown op {user_data:#x} (res {res})");
            return;
        }
        let inflight = self.table.remove(slot).expect("checked");
        self.in_flight -= 1;
        self.ready.push_back(Completion {
            token: inflight.token,
            res,
            flags: 0,
            op: Some(inflight.op),
            bid: None,
        });
    }

    fn push_entry(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every pointer in `entry` points into the `Op` stored in `self.table`, whose
            // heap buffers stay put until its final completion is reaped (see `bufs` module docs).
            let pushed = unsafe { self.uring.submission().push(entry) };
            if pushed.is_ok() {
                return;
            }
            // Submission queue full: hand what we have to the kernel and try again.
            tracing::debug!("submission queue full; flushing");
            if let Err(e) = self.uring.submit() {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    // The completion queue is full: make room by reaping, then retry.
                    self.reap();
                } else if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!("io_uring_enter failed while flushing: {e}");
                    self.reap();
                }
            }
        }
    }

    /// Submits queued ops without waiting.
    pub fn submit(&mut self) {
        self.bufs.top_up();
        if let Err(e) = self.uring.submit() {
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => tracing::error!("io_uring_enter failed: {e}"),
            }
        }
        self.reap();
    }

    /// Submits queued ops and waits until at least one completion is ready or `timeout` passed
    /// (`None`: no limit; zero: don't block). Completions are then available from `next`.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.ready.is_empty() {
            self.submit();
            return Ok(());
        }
        self.bufs.top_up();
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
            None => self.uring.submitter().submit_and_wait(1),
        };
        let r = match result {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // Timed out, interrupted by a signal, or completions pending: all fine.
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                    Ok(())
                }
                _ => Err(e),
            },
        };
        self.reap();
        r
    }

    /// The next reaped completion, if any.
    pub fn next_completion(&mut self) -> Option<Completion> {
        if self.ready.is_empty() {
            self.reap();
        }
        self.ready.pop_front()
    }

    /// Moves completions from the kernel's queue to `ready`, re-pushing interrupted ops.
    fn reap(&mut self) {
        let mut again: Vec<(Token, Op)> = Vec::new();
        let mut helper_read_done = None;
        {
            let cq = self.uring.completion();
            for cqe in cq {
                let user_data = cqe.user_data();
                let slot = user_data as u32;
                let generation = (user_data >> 32) as u32;
                // Only tests inject faults; skip the hash lookup for every other completion.
                let injected = if self.injected.is_empty() {
                    None
                } else {
                    self.injected.remove(&user_data)
                };
                let res = match injected {
                    Some(errno) => -errno,
                    None => cqe.result(),
                };
                let flags = cqe.flags();
                let bid = cqueue::buffer_select(flags);
                if let Some(b) = bid {
                    self.bufs.taken(b);
                }
                if self.table.get_mut(slot, generation).is_none() {
                    // Cannot happen: each slot's generation changes only after its final
                    // completion. Keep the buffer accounting right and go on.
                    tracing::error!("completion for unknown op {user_data:#x} (res {res})");
                    if let Some(b) = bid {
                        self.ready.push_back(Completion {
                            token: Token(u64::MAX),
                            res,
                            flags,
                            op: None,
                            bid: Some(b),
                        });
                    }
                    continue;
                }
                let more = cqueue::more(flags);
                if more {
                    let token = self.table.get_mut(slot, generation).expect("checked").token;
                    self.ready.push_back(Completion {
                        token,
                        res,
                        flags,
                        op: None,
                        bid,
                    });
                    continue;
                }
                let inflight = self.table.remove(slot).expect("checked");
                if inflight.token == HELPER_TOKEN {
                    // The helper finished one or more ops; its results are collected below,
                    // once the completion queue is no longer borrowed.
                    if let Op::ReadEventFd { fd, .. } = inflight.op {
                        helper_read_done = Some(fd);
                    }
                    continue;
                }
                self.in_flight -= 1;
                let multishot =
                    matches!(inflight.op, Op::AcceptMulti { .. } | Op::RecvMulti { .. });
                if res == -libc::EINTR && !multishot {
                    again.push((inflight.token, inflight.op));
                    continue;
                }
                self.ready.push_back(Completion {
                    token: inflight.token,
                    res,
                    flags,
                    op: Some(inflight.op),
                    bid,
                });
            }
        }
        for (token, op) in again {
            self.push(token, op);
        }
        if let Some(efd) = helper_read_done {
            let results = match &self.helper {
                Some(h) => std::mem::take(&mut *h.done.lock().unwrap_or_else(|e| e.into_inner())),
                None => Vec::new(),
            };
            for (user_data, res) in results {
                self.helper_result(user_data, res);
            }
            self.arm_helper_read(efd);
        }
    }
}

/// Bytes after which a multishot receive ends by itself and the worker arms another (the
/// kernel ends it in the read that reaches the cap, so it may take up to one buffer more):
/// bounds the input that arrives after the worker decided to stop one (a body that starts
/// being written to disk, a connection that is paused) and before its cancel lands. Large
/// enough that the re-arms cost nothing that shows: one per 512 KiB received.
pub const RECV_MULTI_CAP: u32 = 512 * 1024;

/// `RECV_MULTI_CAP` once `Ring::probe` found the kernel supports it (Linux 6.17), else 0.
static RECV_CAP_SUPPORTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The cap new multishot receives get (`Op::recv_multi`): 0 until `Ring::probe` ran and
/// found the kernel supports it.
pub fn recv_multi_cap() -> u32 {
    RECV_CAP_SUPPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets the byte cap of a multishot receive (`sqe->optlen`, Linux 6.17); 0 leaves it unset.
fn with_recv_cap(entry: squeue::Entry, cap: u32) -> squeue::Entry {
    if cap == 0 {
        return entry;
    }
    // The io-uring crate has no setter for it. `optlen` shares the 4 bytes at offset 44 of the
    // 64-byte SQE (kernel ABI, include/uapi/linux/io_uring.h) with `file_index` and
    // `splice_fd_in`, which a receive does not use.
    const OPTLEN_AT: usize = 44;
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe` and
    // holds no pointers of its own that the bytes could invalidate; `transmute` checks the
    // sizes at compile time. Only the 4 bytes of `optlen` change.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(entry) };
    raw[OPTLEN_AT..OPTLEN_AT + 4].copy_from_slice(&cap.to_ne_bytes());
    // SAFETY: the same 64 bytes back, a valid SQE with `optlen` set.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Builds the submission entry for `op`, pointing into the op's own buffers. `limit` caps the
/// bytes of a send or write (fault injection: a real short send or write); `usize::MAX` for none.
fn build_entry(op: &mut Op, limit: usize) -> squeue::Entry {
    match op {
        Op::AcceptMulti { fd } => opcode::AcceptMulti::new(types::Fd(*fd))
            .flags(libc::SOCK_CLOEXEC)
            .build(),
        Op::RecvMulti { fd, cap } => {
            with_recv_cap(opcode::RecvMulti::new(types::Fd(*fd), BGID).build(), *cap)
        }
        // Length 0 with a provided buffer: up to the whole buffer.
        Op::RecvOnce { fd } => opcode::Recv::new(types::Fd(*fd), std::ptr::null_mut(), 0)
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT),
        Op::Send {
            fd,
            buf,
            off,
            then_close,
        } => {
            let rest = &buf[(*off).min(buf.len())..];
            let len = rest.len().min(limit).min(u32::MAX as usize) as u32;
            let more = if *then_close { libc::MSG_MORE } else { 0 };
            opcode::Send::new(types::Fd(*fd), rest.as_ptr(), len)
                .flags(libc::MSG_NOSIGNAL | more)
                .build()
        }
        Op::ReadEventFd { fd, buf } => {
            opcode::Read::new(types::Fd(*fd), buf.as_mut_ptr(), 8).build()
        }
        Op::OpenAt { path, flags, mode } => {
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
                .flags(*flags)
                .mode(*mode)
                .build()
        }
        Op::Write2 {
            fd,
            head,
            body,
            at,
            done,
            iov,
        } => {
            let n = if *done < head.len() {
                iov[0] = libc::iovec {
                    iov_base: head[*done..].as_ptr() as *mut _,
                    iov_len: head.len() - *done,
                };
                iov[1] = libc::iovec {
                    iov_base: body.as_ptr() as *mut _,
                    iov_len: body.len(),
                };
                2
            } else {
                let off = (*done - head.len()).min(body.len());
                iov[0] = libc::iovec {
                    iov_base: body[off..].as_ptr() as *mut _,
                    iov_len: body.len() - off,
                };
                1
            };
            // Fault injection: shorten the write to `limit` bytes in total.
            let mut room = limit;
            for v in iov.iter_mut().take(n as usize) {
                v.iov_len = v.iov_len.min(room);
                room -= v.iov_len;
            }
            // An explicit offset, not -1 ("the file position"): the file is written from `at`,
            // and a resumed short write must land right after the bytes already written.
            // With -1, short writes on a filling tmpfs were seen to start again at offset 0.
            opcode::Writev::new(types::Fd(*fd), iov.as_ptr(), n)
                .offset(*at + *done as u64)
                .build()
        }
        Op::Fsync { fd } => opcode::Fsync::new(types::Fd(*fd)).build(),
        Op::Close { fd } => opcode::Close::new(types::Fd(*fd)).build(),
        // Never reaches the kernel's ring: `Ring::push` hands it to the helper thread.
        Op::SyncFs { .. } => unreachable!("syncfs runs on the helper thread"),
        Op::RenameAt { from, to } => opcode::RenameAt::new(
            types::Fd(libc::AT_FDCWD),
            from.as_ptr(),
            types::Fd(libc::AT_FDCWD),
            to.as_ptr(),
        )
        .build(),
        Op::UnlinkAt { path } => {
            opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build()
        }
        Op::Cancel { target } => opcode::AsyncCancel::new(*target).build(),
    }
}

/// The peer address of an accepted socket (multishot accept does not report it).
pub fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: `fd` is an open socket owned by the caller for the duration of this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&borrowed)
        .peer_addr()
        .ok()?
        .as_socket()
}

/// Closes a descriptor synchronously (start-up and error paths only).
pub fn close_now(fd: RawFd) {
    // SAFETY: the caller owns `fd` and gives it up here.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}

/// An eventfd used to wake a worker (shutdown): the worker reads it through its ring.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall with constant flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Adds one to the counter, completing a pending read.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let _ = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn setup_failures_are_explained_in_words() {
        let eperm = diagnose_setup(libc::EPERM);
        assert!(
            eperm.contains("io_uring_disabled") || eperm.contains("seccomp"),
            "{eperm}"
        );
        let enosys = diagnose_setup(libc::ENOSYS);
        assert!(
            enosys.contains("seccomp") && enosys.contains("6.0"),
            "{enosys}"
        );
        assert!(diagnose_setup(libc::ENOMEM).contains("RLIMIT_MEMLOCK"));
        let e = SetupError::Missing {
            what: "IORING_OP_RENAMEAT",
            cause: "kernel 5.4".into(),
        };
        let line = e.to_string();
        assert!(
            line.contains("IORING_OP_RENAMEAT") && !line.contains('\n'),
            "{line}"
        );
    }

    #[test]
    fn probe_passes_on_this_kernel() {
        Ring::probe().unwrap();
    }

    #[test]
    fn a_capped_multishot_recv_ends_at_its_cap() {
        Ring::probe().unwrap();
        if recv_multi_cap() == 0 {
            eprintln!(
                "SKIP: kernel {} has no cap for multishot receives (Linux 6.17)",
                kernel_release()
            );
            return;
        }
        let mut ring = Ring::new(8, 8, 64).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (&b).write_all(&[b'x'; 300]).unwrap();
        ring.push(
            Token(7),
            Op::RecvMulti {
                fd: a.as_raw_fd(),
                cap: 100,
            },
        );
        let (mut taken, mut ended) = (0, false);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !ended && std::time::Instant::now() < deadline {
            ring.wait(Some(Duration::from_millis(50))).unwrap();
            while let Some(c) = ring.next_completion() {
                if let RecvOutcome::Data { bid, len } = RecvOutcome::from_result(c.res, c.bid) {
                    taken += len;
                    ring.recycle(bid);
                }
                ended |= c.op.is_some();
            }
        }
        // 300 bytes were waiting, read a buffer (64 bytes) at a time: the receive ended by
        // itself once it had its 100, in the read that crossed them.
        assert!(ended, "the capped receive did not end");
        assert_eq!(taken, 128);
        let mut rest = [0u8; 300];
        a.set_nonblocking(true).unwrap();
        assert_eq!((&a).read(&mut rest).unwrap(), 300 - taken);
    }

    #[test]
    fn multishot_recv_hands_over_and_recycles_provided_buffers() {
        let mut ring = Ring::new(8, 4, 16).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        ring.push(
            Token(42),
            Op::RecvMulti {
                fd: a.as_raw_fd(),
                cap: 0,
            },
        );
        let mut got = Vec::new();
        // More reads than buffers: works only if recycled buffers come back into use.
        for i in 0..10u8 {
            (&b).write_all(&[b'a' + i; 5]).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            let before = got.len();
            while got.len() == before && std::time::Instant::now() < deadline {
                ring.wait(Some(Duration::from_millis(50))).unwrap();
                while let Some(c) = ring.next_completion() {
                    assert_eq!(c.token, Token(42));
                    assert!(c.more(), "multishot recv ended: {}", c.res);
                    match RecvOutcome::from_result(c.res, c.bid) {
                        RecvOutcome::Data { bid, len } => {
                            got.extend_from_slice(ring.buf(bid, len));
                            assert_eq!(ring.bufs_held(), 1);
                            ring.recycle(bid);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        }
        let want: Vec<u8> = (0..10u8).flat_map(|i| [b'a' + i; 5]).collect();
        assert_eq!(got, want);
        assert_eq!(ring.bufs_held(), 0);
        // Closing the peer ends the multishot recv with EOF and hands the op back.
        drop(b);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut eof = false;
        while !eof && std::time::Instant::now() < deadline {
            ring.wait(Some(Duration::from_millis(50))).unwrap();
            while let Some(c) = ring.next_completion() {
                eof = c.res == 0 && c.op.is_some();
            }
        }
        assert!(eof);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn a_burst_beyond_the_warm_buffers_is_short_not_starved_and_all_of_it_arrives() {
        let mut ring = Ring::new(64, 64, 16).unwrap();
        // One steady connection: the kernel takes one buffer a turn, so after some turns only
        // the floor of warm buffers stays published.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        ring.push(
            Token(1),
            Op::RecvMulti {
                fd: a.as_raw_fd(),
                cap: 0,
            },
        );
        for _ in 0..200 {
            (&b).write_all(b"x").unwrap();
            let mut got = false;
            while !got {
                ring.wait(Some(Duration::from_secs(2))).unwrap();
                while let Some(c) = ring.next_completion() {
                    let RecvOutcome::Data { bid, .. } = RecvOutcome::from_result(c.res, c.bid)
                    else {
                        panic!("unexpected {}", c.res);
                    };
                    ring.recycle(bid);
                    got = true;
                }
            }
        }
        assert!(
            ring.bufs.published() < 20,
            "{} published",
            ring.bufs.published()
        );
        // Then 48 connections with input at once: more than are published.
        const N: usize = 48;
        let pairs: Vec<_> = (0..N)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        for (i, (_, w)) in pairs.iter().enumerate() {
            let mut w = w;
            w.write_all(format!("conn {i:02}").as_bytes()).unwrap();
        }
        for (i, (r, _)) in pairs.iter().enumerate() {
            ring.push(
                Token(100 + i as u64),
                Op::RecvMulti {
                    fd: r.as_raw_fd(),
                    cap: 0,
                },
            );
        }
        let mut got = vec![Vec::new(); N];
        let mut shorts = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.iter().any(|g| g.is_empty()) && std::time::Instant::now() < deadline {
            ring.wait(Some(Duration::from_millis(50))).unwrap();
            let mut again = Vec::new();
            while let Some(c) = ring.next_completion() {
                let i = (c.token.0 - 100) as usize;
                match RecvOutcome::from_result(c.res, c.bid) {
                    RecvOutcome::Data { bid, len } => {
                        got[i].extend_from_slice(ring.buf(bid, len));
                        ring.recycle(bid);
                    }
                    RecvOutcome::NoBuffers => {
                        assert!(c.op.is_some(), "ENOBUFS ends the multishot receive");
                        assert!(ring.bufs_short(), "buffers were held back: not an overload");
                        shorts += 1;
                        again.push(i);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            for i in again {
                ring.push(
                    Token(100 + i as u64),
                    Op::RecvMulti {
                        fd: pairs[i].0.as_raw_fd(),
                        cap: 0,
                    },
                );
            }
        }
        assert!(
            shorts > 0,
            "the burst found fewer buffers published than it needed"
        );
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g, format!("conn {i:02}").as_bytes());
        }
        ring.submit();
        assert!(
            ring.bufs.published() >= 32,
            "after the burst more buffers are published: {}",
            ring.bufs.published()
        );
    }

    #[test]
    fn send_write_fsync_rename_go_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = Ring::new(8, 2, 16).unwrap();
        let tmp = std::ffi::CString::new(dir.path().join("t").to_str().unwrap()).unwrap();
        let new = std::ffi::CString::new(dir.path().join("n").to_str().unwrap()).unwrap();
        let run = |ring: &mut Ring, op: Op| -> Completion {
            ring.push(Token(7), op);
            loop {
                ring.wait(Some(Duration::from_secs(2))).unwrap();
                if let Some(c) = ring.next_completion() {
                    return c;
                }
            }
        };
        let c = run(
            &mut ring,
            Op::OpenAt {
                path: tmp.clone(),
                flags: libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                mode: 0o600,
            },
        );
        let FileOutcome::Done(fd) = FileOutcome::from_result(c.res) else {
            panic!("openat {}", c.res)
        };
        // A write that stopped after the header (as a short write would) is resumed at `done`:
        // the rest lands right after it, not at the file position or at 0.
        let c = run(
            &mut ring,
            Op::write2(fd, b"head\r\n".to_vec(), Vec::new(), 0),
        );
        assert_eq!(FileOutcome::from_result(c.res), FileOutcome::Done(6));
        let c = run(
            &mut ring,
            Op::write2(fd, b"XXXX\r\n".to_vec(), b"body".to_vec(), 6),
        );
        assert_eq!(FileOutcome::from_result(c.res), FileOutcome::Done(4));
        let c = run(
            &mut ring,
            Op::write2(fd, b"head\r\n".to_vec(), b"body".to_vec(), 8),
        );
        assert_eq!(FileOutcome::from_result(c.res), FileOutcome::Done(2));
        assert_eq!(
            FileOutcome::from_result(run(&mut ring, Op::Fsync { fd }).res),
            FileOutcome::Done(0)
        );
        assert_eq!(
            FileOutcome::from_result(run(&mut ring, Op::Close { fd }).res),
            FileOutcome::Done(0)
        );
        assert_eq!(
            FileOutcome::from_result(
                run(
                    &mut ring,
                    Op::RenameAt {
                        from: tmp.clone(),
                        to: new
                    }
                )
                .res
            ),
            FileOutcome::Done(0)
        );
        assert_eq!(
            std::fs::read(dir.path().join("n")).unwrap(),
            b"head\r\nbody"
        );
        // Opening the same tmp name again with O_EXCL fails: a named failure, not a panic.
        let c = run(
            &mut ring,
            Op::OpenAt {
                path: std::ffi::CString::new(dir.path().join("n").to_str().unwrap()).unwrap(),
                flags: libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                mode: 0o600,
            },
        );
        assert_eq!(
            FileOutcome::from_result(c.res),
            FileOutcome::Failed(libc::EEXIST)
        );
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = run(
            &mut ring,
            Op::Send {
                fd: a.as_raw_fd(),
                buf: b"250 ok\r\n".to_vec(),
                off: 4,
                then_close: false,
            },
        );
        assert_eq!(SendOutcome::from_result(c.res), SendOutcome::Sent(4));
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok\r\n");
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn syncfs_completes_through_the_ring_without_counting_its_helper() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::open(dir.path()).unwrap();
        let mut ring = Ring::new(8, 2, 16).unwrap();
        for round in 0..3u64 {
            ring.push(Token(100 + round), Op::SyncFs { fd: f.as_raw_fd() });
            assert_eq!(ring.in_flight(), 1);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut got = None;
            while got.is_none() && std::time::Instant::now() < deadline {
                ring.wait(Some(Duration::from_millis(100))).unwrap();
                got = ring.next_completion();
            }
            let c = got.expect("syncfs completed");
            assert_eq!((c.token, c.res), (Token(100 + round), 0));
            assert!(matches!(c.op, Some(Op::SyncFs { .. })));
            // The ring's own read of the helper's eventfd is not the caller's business.
            assert_eq!(ring.in_flight(), 0);
        }
        // A bad descriptor is a named failure, not a panic.
        ring.push(Token(7), Op::SyncFs { fd: -1 });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = None;
        while got.is_none() && std::time::Instant::now() < deadline {
            ring.wait(Some(Duration::from_millis(100))).unwrap();
            got = ring.next_completion();
        }
        assert_eq!(
            FileOutcome::from_result(got.expect("completed").res),
            FileOutcome::Failed(libc::EBADF)
        );
    }

    #[test]
    fn eventfd_wakes_a_pending_read() {
        let mut ring = Ring::new(8, 2, 16).unwrap();
        let ev = EventFd::new().unwrap();
        ring.push(
            Token(5),
            Op::ReadEventFd {
                fd: ev.fd(),
                buf: Box::new([0; 8]),
            },
        );
        ring.wait(Some(Duration::from_millis(10))).unwrap();
        assert!(ring.next_completion().is_none());
        ev.notify();
        ring.wait(Some(Duration::from_secs(2))).unwrap();
        let c = ring.next_completion().expect("read completed");
        assert_eq!((c.token, c.res), (Token(5), 8));
    }
}
