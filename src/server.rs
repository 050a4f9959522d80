//! Start-up checks, spawning and pinning one worker per core, signals and shutdown. Does no
//! per-connection work.
//!
//! Start-up order, so that every failure is one clear line before any worker runs: probe
//! io_uring, recover and open the store, bind every listener (all workers' SO_REUSEPORT
//! sockets), block SIGTERM/SIGINT/SIGHUP, then spawn the workers. A signal thread waits for
//! SIGTERM/SIGINT (logging and ignoring SIGHUP, see `wait_for_stop`), marks the shutdown in the
//! workers' shared state (so that no worker greets a connection accepted after the signal) and
//! wakes every worker through its eventfd (read through the worker's ring);
//! each worker then closes its listeners, says 421 to idle sessions, lets sessions in DATA finish
//! within --shutdown-grace, and exits once its last connection is closed. `run` returns when all
//! workers have.
use std::net::SocketAddr;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::ring::{EventFd, Ring};
use crate::store::Store;
use crate::worker::{Shared, Worker, WorkerReport};

/// Why the server could not start or run. Display is one line for people.
#[derive(Debug)]
pub enum ServerError {
    Ring(crate::ring::SetupError),
    Store(crate::store::StoreError),
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    Other(String),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Ring(e) => write!(f, "{e}"),
            ServerError::Store(e) => write!(f, "{e}"),
            ServerError::Bind { addr, source } => {
                let hint = match source.raw_os_error() {
                    Some(libc::EADDRINUSE) => "another process is listening there; stop it or choose another --listen address",
                    Some(libc::EADDRNOTAVAIL) => "this host has no such address; choose one of its addresses for --listen",
                    Some(libc::EACCES) => "ports below 1024 need root or CAP_NET_BIND_SERVICE; use a higher port or grant the capability",
                    _ => "check the --listen address",
                };
                write!(f, "cannot listen on {addr}: {source}; {hint}")
            }
            ServerError::Other(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ServerError {}

/// The receive buffer asked for on listeners (the kernel doubles it for its bookkeeping, and caps
/// it at net.core.rmem_max); see `listener`.
const RCVBUF_BYTES: usize = 256 * 1024;

/// One listening socket for `addr`; `reuseport` lets every worker have its own.
fn listener(addr: SocketAddr, reuseport: bool) -> std::io::Result<Socket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // [::]:25 and 0.0.0.0:25 may both be given; each should take only its own family.
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener, which saves a setsockopt per
    // connection. Replies are already batched into one send per read, so Nagle only delays.
    s.set_nodelay(true)?;
    // Accepted sockets inherit the receive buffer too. A fixed one of at least RCVBUF_BYTES lets
    // a client send a 100 KB message in one go: with the default (tcp_rmem's 128 KiB, about 64
    // KiB of window at the start) the client stalls on the window, and each window update the
    // server sends also delivers the client's next segments in the server's context on
    // loopback. Shape (c) measured 9.5 instead of 12.3 packets sent per message in the server's
    // context. The buffer is only a limit: an idle connection holds no memory for it. A larger
    // default (a system with a big tcp_rmem) is left alone.
    if s.recv_buffer_size()? < RCVBUF_BYTES {
        s.set_recv_buffer_size(RCVBUF_BYTES)?;
    }
    s.bind(&addr.into())?;
    if reuseport {
        s.listen(1024)?;
    }
    Ok(s)
}

/// Binds `workers` SO_REUSEPORT sockets per address. First checks each address with a plain
/// socket: another process's SO_REUSEPORT listener would otherwise silently share the port with
/// us. A port 0 is resolved once so that every worker listens on the same port.
pub(crate) fn bind_all(
    addrs: &[SocketAddr],
    workers: usize,
) -> Result<Vec<Vec<Socket>>, ServerError> {
    let mut per_worker: Vec<Vec<Socket>> = (0..workers).map(|_| Vec::new()).collect();
    for &addr in addrs {
        let mut addr = addr;
        if addr.port() != 0 {
            listener(addr, false).map_err(|source| ServerError::Bind { addr, source })?;
        }
        for (i, socks) in per_worker.iter_mut().enumerate() {
            let s = listener(addr, true).map_err(|source| ServerError::Bind { addr, source })?;
            if i == 0 && addr.port() == 0 {
                if let Some(a) = s.local_addr().ok().and_then(|a| a.as_socket()) {
                    addr = a;
                }
            }
            socks.push(s);
        }
    }
    Ok(per_worker)
}

/// Descriptors a worker keeps for itself besides its connections, its listeners and its message
/// files: its ring, its wake-up eventfd, `new/` of its Maildir, with room to spare.
const FDS_PER_WORKER: usize = 16;
/// Descriptors of the process outside the workers: stdio, the signal thread, what the
/// allocator and the runtime open.
const FDS_FIXED: usize = 16;

/// Raises the soft limit on open files to the hard limit: every connection is a descriptor,
/// and --max-connections should be what limits them, not a default `ulimit -n` of 1024.
/// Returns the soft limit now in force (0 if it cannot be read).
pub(crate) fn raise_fd_limit() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((mut soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    usize::try_from(soft).unwrap_or(usize::MAX)
}

/// How many connections the limit on open files leaves room for, keeping `reserved`
/// descriptors for the workers' own use, so that a flood of connections can never take the
/// descriptors a message needs for its file (it would get a 451 instead of being stored).
/// `Ok(None)`: --max-connections fits (or the limit is unknown, `fd_limit` 0).
fn connections_within_fd_limit(
    connections_max: usize,
    fd_limit: usize,
    reserved: usize,
) -> Result<Option<usize>, String> {
    if fd_limit == 0 || connections_max + reserved <= fd_limit {
        return Ok(None);
    }
    match fd_limit.checked_sub(reserved) {
        Some(room) if room > 0 => Ok(Some(room)),
        _ => Err(format!(
            "the open-file limit ({fd_limit}) leaves no descriptors for connections: the workers \
             keep {reserved} for their rings, listeners and message files; raise `ulimit -n` \
             (at least {}; {} for --max-connections {connections_max}) or run fewer --workers",
            reserved + 1,
            reserved + connections_max
        )),
    }
}

/// Grows the process's descriptor table to `n` slots now, at start-up, by asking for a
/// descriptor at `n - 1` (a duplicate of `fd`, any open descriptor) and closing it again; the
/// kernel never shrinks the table. `n` must not exceed the soft limit on open files.
///
/// Why: the kernel grows the table when a new descriptor does not fit, and in a process with more
/// than one thread it then waits for an RCU grace period (`expand_files` → `synchronize_rcu`)
/// before it returns. That wait fell on a worker inside an accept, and stopped every session of
/// its core: in an open loop of 12,917 sessions/s the worker slept in `synchronize_rcu` for
/// 4-21 ms two or three times in each run's first second, as the table doubled towards the
/// number of open connections (sched_switch traces in BENCHMARKS.md). The table costs 8 bytes
/// of kernel memory per slot, and no process memory.
fn reserve_fd_table(fd: std::os::fd::RawFd, n: usize) {
    use nix::fcntl::{fcntl, FcntlArg};
    let Some(top) = n.checked_sub(1).and_then(|t| i32::try_from(t).ok()) else {
        return;
    };
    match fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(top)) {
        Ok(fd) => {
            let _ = nix::unistd::close(fd);
        }
        Err(e) => tracing::debug!("cannot reserve {n} descriptor slots: {e}"),
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn pin_to(cpu: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), &set) {
            tracing::warn!("cannot pin worker to CPU {cpu}: {e}");
        }
    }
}

/// Waits for SIGTERM or SIGINT among `signals`. A SIGHUP in between is logged and otherwise
/// ignored: daemons take it as "reload your settings" (or "reopen your log files"), and ringmx
/// reads its settings only at start-up and logs to stderr, so there is nothing to do but say
/// so; the server keeps running. (Were it left at its default action, the kernel would end the
/// process at once.)
fn wait_for_stop(signals: &SigSet) -> nix::Result<Signal> {
    loop {
        match signals.wait() {
            Ok(Signal::SIGHUP) => tracing::warn!(
                "SIGHUP received and ignored: ringmx reads its settings only at start-up, so \
                 there is nothing to reload; restart it (SIGTERM, then start) to apply new \
                 settings. Still running"
            ),
            other => return other,
        }
    }
}

/// Runs the server until SIGTERM/SIGINT and a finished shutdown.
pub fn run(mut cfg: Config) -> Result<(), ServerError> {
    Ring::probe().map_err(ServerError::Ring)?;
    let recovered = Store::recover(&cfg.store).map_err(ServerError::Store)?;
    if recovered > 0 {
        tracing::info!("removed {recovered} unacknowledged file(s) left in tmp/ by an earlier run");
    }
    let workers = cfg.workers.max(1);
    let mut stores = Vec::with_capacity(workers);
    for i in 0..workers {
        stores.push(Store::open(&cfg.store, i, &cfg.session.hostname).map_err(ServerError::Store)?);
    }
    let listeners = bind_all(&cfg.listen, workers)?;
    // A worker holds a message's file open from its open to its close after the fsync (or the
    // batch's syncfs): keep room for one full batch of them per worker.
    let reserved =
        FDS_FIXED + workers * (FDS_PER_WORKER + cfg.listen.len() + cfg.batch_messages_max);
    let fds_wanted = cfg.connections_max + reserved;
    let fd_limit = raise_fd_limit();
    if let Some(room) = connections_within_fd_limit(cfg.connections_max, fd_limit, reserved)
        .map_err(ServerError::Other)?
    {
        tracing::warn!(
            "the open-file limit ({fd_limit}) is below --max-connections plus what the workers \
             keep for their rings, listeners and message files ({fds_wanted}): taking at most \
             {room} connections at once, the next ones get 421 (raise `ulimit -Hn` to \
             {fds_wanted})"
        );
        cfg.connections_max = room;
        cfg.connections_max_by_fd_limit = true;
    }
    if let Some(s) = listeners.iter().flatten().next() {
        use std::os::fd::AsRawFd;
        reserve_fd_table(s.as_raw_fd(), fds_wanted.min(fd_limit));
    }

    // Block the shutdown signals before any thread starts, so every thread inherits the mask and
    // only the signal thread ever takes them. SIGHUP too: its default action would end the
    // process on the spot, dropping every session without a 421, when an operator sent it to
    // ask for a reload (see `wait_for_stop`).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals
        .thread_block()
        .map_err(|e| ServerError::Other(format!("cannot block signals: {e}")))?;
    // Sends use MSG_NOSIGNAL; this covers anything else that writes to a closed socket.
    let _ = block_sigpipe();

    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared::new(cfg.clone()));
    let cpus = allowed_cpus();
    let mut wakes = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for (i, (socks, store)) in listeners.into_iter().zip(stores).enumerate() {
        let wake = Arc::new(
            EventFd::new()
                .map_err(|e| ServerError::Other(format!("cannot create an eventfd: {e}")))?,
        );
        wakes.push(wake.clone());
        let shared = shared.clone();
        let cpu = if cpus.is_empty() {
            None
        } else {
            Some(cpus[i % cpus.len()])
        };
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("ringmx-w{i}"))
            .spawn(move || -> WorkerReport {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                match Worker::new(i, shared, socks, store, wake) {
                    Ok(w) => {
                        let _ = ready.send(Ok(()));
                        w.run()
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        WorkerReport::default()
                    }
                }
            })
            .map_err(|e| ServerError::Other(format!("cannot start worker thread: {e}")))?;
        handles.push(h);
    }
    drop(ready_tx);
    let mut failed = None;
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some("a worker thread died during start-up".into()),
        }
    }
    if let Some(e) = failed {
        for w in &wakes {
            w.notify();
        }
        for h in handles {
            let _ = h.join();
        }
        return Err(ServerError::Other(e));
    }
    tracing::info!(
        listen = ?cfg.listen,
        workers,
        store = ?cfg.store,
        hostname = %cfg.session.hostname,
        "ringmx ready"
    );

    let started = std::time::Instant::now();
    let signal_wakes = wakes.clone();
    let signal_shared = shared.clone();
    std::thread::Builder::new()
        .name("ringmx-signals".into())
        .spawn(move || {
            let sig = wait_for_stop(&signals);
            signal_shared.begin_shutdown();
            if let Ok(sig) = sig {
                tracing::info!("{sig:?} received: shutting down");
            }
            for w in &signal_wakes {
                w.notify();
            }
            // A second signal means "now": leave without waiting for the grace period.
            if let Ok(sig) = wait_for_stop(&signals) {
                tracing::warn!("{sig:?} received again: exiting at once");
                std::process::exit(1);
            }
        })
        .map_err(|e| ServerError::Other(format!("cannot start the signal thread: {e}")))?;

    let mut reports = Vec::with_capacity(workers);
    let mut panicked = false;
    for h in handles {
        match h.join() {
            Ok(r) => reports.push(r),
            Err(_) => {
                // One worker died: stop the others cleanly rather than run at reduced capacity.
                panicked = true;
                for w in &wakes {
                    w.notify();
                }
            }
        }
    }
    let total = Metrics::merged(reports.iter().map(|r| &r.metrics));
    total.log_summary(started.elapsed());
    if panicked {
        return Err(ServerError::Other(
            "a worker thread failed; see the log above".into(),
        ));
    }
    Ok(())
}

/// Blocks SIGPIPE in this thread and the threads it starts: for a server that never waits for
/// it, blocking has the effect of ignoring it, without an `unsafe` sigaction call.
fn block_sigpipe() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    set.thread_block()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_to_leave_the_workers_their_descriptors() {
        // Enough room: --max-connections stands. Unknown limit (0): likewise.
        assert_eq!(connections_within_fd_limit(10_000, 1 << 20, 178), Ok(None));
        assert_eq!(connections_within_fd_limit(10_000, 10_178, 178), Ok(None));
        assert_eq!(connections_within_fd_limit(10_000, 0, 178), Ok(None));
        // A hard limit of 1024 with two workers and one listener: the rest after their 178
        // (16, and 16 + 1 + 64 per worker).
        assert_eq!(
            connections_within_fd_limit(10_000, 1024, 178),
            Ok(Some(846))
        );
        assert_eq!(
            connections_within_fd_limit(10_000, 10_177, 178),
            Ok(Some(9_999))
        );
        // No room at all: a start-up error that says what to raise, and to what.
        for limit in [178, 40] {
            let e = connections_within_fd_limit(10_000, limit, 178).unwrap_err();
            assert!(e.contains(&format!("open-file limit ({limit})")), "{e}");
            assert!(
                e.contains("at least 179; 10178 for --max-connections 10000"),
                "{e}"
            );
        }
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let l = listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (a, _) = l.accept().unwrap();
        assert!(a.nodelay().unwrap());
    }

    #[test]
    fn accepted_sockets_get_the_larger_receive_buffer_of_the_listener() {
        let l = listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (a, _) = l.accept().unwrap();
        let plain = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        let default = plain.recv_buffer_size().unwrap();
        let got = a.recv_buffer_size().unwrap();
        assert_eq!(got, l.recv_buffer_size().unwrap());
        // At least what was asked for (as the kernel caps it) and never below the default.
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(RCVBUF_BYTES);
        assert!(got >= default, "{got} < default {default}");
        assert!(got >= RCVBUF_BYTES.min(rmem_max), "{got}");
    }

    #[test]
    fn a_port_held_by_another_reuseport_socket_is_refused() {
        // Another process's SO_REUSEPORT listener would otherwise silently share the port.
        let other = listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = other.local_addr().unwrap().as_socket().unwrap();
        let err = bind_all(&[addr], 2).expect_err("bind must fail");
        let line = err.to_string();
        assert!(
            line.contains(&addr.to_string()) && line.contains("in use"),
            "{line}"
        );
    }

    #[test]
    fn port_zero_gives_every_worker_the_same_port() {
        let socks = bind_all(&["127.0.0.1:0".parse().unwrap()], 3).unwrap();
        let ports: Vec<u16> = socks
            .iter()
            .map(|w| w[0].local_addr().unwrap().as_socket().unwrap().port())
            .collect();
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "{ports:?}");
    }
}
