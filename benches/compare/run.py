#!/usr/bin/env python3
"""Side-by-side measurement for benches/compare.sh (issue 4). Python stdlib only.

compare.sh installs and builds; this file runs the servers and the client, reads the figures from
/proc and from the client's JSON, and writes the table into BENCHMARKS.md between the markers
<!-- compare:begin --> and <!-- compare:end --> (hand-written text outside them is kept).

What is measured, and how:
- Every server runs pinned to core 0, every client (and this script) to core 1.
- Every run of a durable server (the two ringmx maildir stores, the private Postfix) starts on
  a freshly started server with an empty store of its own (a new directory; none is deleted
  while measuring, see delete_stores), then WARMUP_S seconds of the run's own load that
  nothing measures (Postfix forks its smtpd processes then). Otherwise each run would start on
  the files of every earlier one, and the faster server, having written more, would pay more
  for its bigger directories: ringmx's new/ held 176,000 files at its third (b) run, the
  Postfix queue a tenth of that.
- messages/s: messages the client saw accepted (250 after the final dot) / the client's run time.
- server CPU us/msg: utime+stime (+cutime+cstime, so exited children such as Postfix's smtpd
  count) summed over the server's whole process tree, from /proc, taken just before the client
  starts and just after it exits, divided by the accepted messages.
- p50/p99: the client's whole-session latency (connect start to 221 and close).
- RSS per idle connection: (tree RSS with N connections held after their 220 - tree RSS just
  before) / N, on a freshly started server.
- fsyncs per message (ringmx maildir): fsync requests submitted to io_uring (tracepoint
  io_uring:io_uring_submit_req, opcode FSYNC) plus fsync/fdatasync/syncfs system calls (syncfs:
  `ringmx serve --batch-syncfs`, one per batch from the ring's helper thread), counted with
  `perf stat` on the server process during the run, divided by the accepted messages.
Every figure is taken REPS times; the table shows the median and the range, and the ratio to
smtp-sink's figure in the same repetition (median of the per-repetition ratios).
"""
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def env(name, default):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


QUICK = env("QUICK", "0") == "1"
REPS = int(env("REPS", "1" if QUICK else "3"))
DURATION = float(env("DURATION", "2" if QUICK else "6"))
OPEN_DURATION = float(env("OPEN_DURATION", "3" if QUICK else "8"))
WARMUP_S = float(env("WARMUP_S", "0.5" if QUICK else "1"))
# 10,000 even in QUICK mode: the per-connection figure at 2,000 still carries the allocator's
# fixed steps (2.8 KiB against 0.77 KiB at 10,000), and holding 10,000 takes seconds.
IDLE_CONNS = int(env("IDLE_CONNS", "10000"))
# A private Postfix needs one smtpd process (~1 MB+) per connection: 10,000 would be ~15 GB and
# 10,000 forks, so it holds fewer and the figure is per connection all the same.
POSTFIX_IDLE_CONNS = int(env("POSTFIX_IDLE_CONNS", "250"))
CLIENT = env("CLIENT", "loadgen")  # loadgen | smtp-source (stand-in while loadgen is not ready)
BIN = env("BIN_DIR", os.path.join(ROOT, "target", "cmp", "release"))
WORK = env("WORK", os.path.join(ROOT, "target", "cmp", "compare"))
OUT = env("OUT", os.path.join(ROOT, "BENCHMARKS.md"))
SERVERS = env("SERVERS", "ringmx-discard,ringmx-maildir,ringmx-syncfs,smtp-sink,postfix").split(",")
SHAPES_SEL = env("SHAPES", "a,b,c,d,open").split(",")
SERVER_CORE = int(env("SERVER_CORE", "0"))
CLIENT_CORE = int(env("CLIENT_CORE", "1"))
PERF = shutil.which("perf") and env("FSYNC_COUNT", "1") == "1"
NOTE = env("NOTE", "")
FS_SETTLE_S = float(env("FS_SETTLE_S", "360"))
KEEP_STORES = env("KEEP_STORES", "0") == "1"
LAST_DELETE = os.path.join(WORK, "last-delete")
# Open-loop rates as fractions of each server's closed-loop session rate in shape (a). Issue 4
# asks for 0.5; 0.25 shows how much of the tail is the single client core being busy.
OPEN_FRACTIONS = [float(x) for x in env("OPEN_FRACTIONS", "0.5,0.25").split(",") if x]
# The open-loop client busy-polls (`ringmx-loadgen --spin`) so that its own sleeps and wake-ups
# stay out of the latencies; OPEN_SPIN=0 lets it sleep as in the closed loops.
OPEN_SPIN = env("OPEN_SPIN", "1") == "1"
# ringmx logs one line per session at its default level (info), as Postfix does; the default is
# what is measured unless RINGMX_LOG (a --log-level filter) says otherwise.
RINGMX_LOG = env("RINGMX_LOG", "")
# Before each open-loop run, a thread spins this long on each of the two cores
# (benches/compare/stalls.py) and counts how often the machine stopped it: the floor under the
# open-loop tail. 0 skips the probe.
STALL_PROBE_S = float(env("STALL_PROBE_S", "2"))
# How the server's threads are scheduled in the open-loop runs: "other" is the kernel's default
# (SCHED_OTHER), the figure issue 4 asks for and the only one by default. OPEN_SCHED=other,fifo
# also runs the rate of the target (0.5) with every thread of a non-durable server's process tree
# at SCHED_FIFO priority FIFO_PRIO for the run, so that the machine's own processes run only while
# the server waits. On the VM of 2026-12-03 PID 1's tokio threads and DAMON's kdamond took the
# server's core for up to 10 ms at a time, with the server runnable and waiting (sched_switch
# traces, BENCHMARKS.md). Not for the durable stores: their fsyncs wait on kernel threads at
# SCHED_OTHER, which a SCHED_FIFO server on the same core starves (measured 15:13 that day: the
# default store's p50 went from 2.3 to 10.8-15 ms, --batch-syncfs's to 1.9 s). The client stays
# at SCHED_OTHER: it busy-polls, and the kernel's real-time limit (95% of each second) would stop
# it for 50 ms.
OPEN_SCHEDS = [x for x in env("OPEN_SCHED", "other").split(",") if x]
FIFO_PRIO = 10
# A run in which the hypervisor kept either core from running for more than STEAL_MAX_PCT of the
# run's wall time (the steal column of /proc/stat) is measured again, at most STEAL_RETRIES
# times, and the last try counts whatever its steal. On the VMs of 2026-12-03 steal came in
# bursts of minutes while the machine was loaded and was near zero at rest: up to 3.8-5.4 s of
# 6-8 s runs, which halves a server's rate or puts 100 ms stops into every latency percentile
# and says nothing about the server. Each server gets the same rule, and the report counts the
# runs measured again. STEAL_RETRIES=0 keeps every first run.
STEAL_MAX_PCT = float(env("STEAL_MAX_PCT", "5"))
STEAL_RETRIES = int(env("STEAL_RETRIES", "2"))

LOADGEN = os.path.join(BIN, "ringmx-loadgen")
RINGMX = os.path.join(BIN, "ringmx")
TCK = os.sysconf("SC_CLK_TCK")
PIDFILE = os.path.join(WORK, "pids")

SHAPES = {
    "a": dict(desc="(a) 1 KB, 1 msg/session, 50 sessions", conns=50, mps=1, size=1024),
    "b": dict(desc="(b) 50 x 1 KB per session, 50 sessions", conns=50, mps=50, size=1024),
    "c": dict(desc="(c) 100 KB, 1 msg/session, 20 sessions", conns=20, mps=1, size=102400),
}
# The ringmx servers that store durably (their fsyncs are counted).
MAILDIR_SERVERS = ("ringmx-maildir", "ringmx-syncfs")
# Appended to a server's label in the open-loop rows.
SCHED_LABEL = {"other": "", "fifo": ", server at SCHED_FIFO"}
LABEL = {
    "ringmx-discard": "ringmx --store discard",
    "ringmx-maildir": "ringmx maildir (durable)",
    "ringmx-syncfs": "ringmx maildir --batch-syncfs (durable)",
    "smtp-sink": "Postfix smtp-sink",
    "postfix": "Postfix smtpd (durable queue)",
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc helpers

def proc_stat(pid):
    """(ppid, utime+stime+cutime+cstime in ticks) or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), sum(int(x) for x in rest[11:15])


def tree(root):
    """root and all its live descendants."""
    kids = defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st:
                kids[st[0]].append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_cpu_s(root):
    total = 0
    for p in tree(root):
        st = proc_stat(p)
        if st:
            total += st[1]
    return total / TCK


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(root):
    return sum(rss_kib(p) for p in tree(root))


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kib(root):
    """Proportional set size: shared pages split among the processes mapping them, so a
    process-per-connection server is not charged its shared libraries once per connection."""
    return sum(pss_kib(p) for p in tree(root))


def busy_builders():
    """How many compiler/linker processes are running now (a noise indicator)."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    c = f.read().strip()
            except OSError:
                continue
            if c in ("rustc", "cc", "ld", "cc1", "ld.lld", "mold", "cargo", "clippy-driver",
                     "rust-lld", "collect2") or c.startswith("build-script"):
                n += 1
    return n


def core_ticks(core):
    """The given core's line of /proc/stat: user, nice, system, idle, iowait, irq, softirq,
    steal, ... in clock ticks since boot (empty if there is no such core)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                return [int(x) for x in line.split()[1:]]
    return []


def core_busy_s(core):
    """Seconds the given core spent busy (not idle, not iowait) since boot."""
    v = core_ticks(core)
    return (sum(v[:8]) - v[3] - v[4]) / TCK if len(v) > 4 else 0.0


def steal_s(core):
    """Seconds the hypervisor ran something else while this (virtual) core wanted to run: the
    steal column. The guest cannot see or prevent it; a server or client whose vCPU is
    descheduled for 100 ms shows a 100 ms stall in its latencies."""
    v = core_ticks(core)
    return v[7] / TCK if len(v) > 7 else 0.0


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, secs=10):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(3)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            time.sleep(0.1)
    return False


STARTED = []  # Popen objects of what this script started (stopped at exit, by PID)


def remember(proc_or_pid):
    """Record a started process: kept for the exit clean-up here, and written with its command
    name to WORK/pids so compare.sh's EXIT trap can stop it (checking the name first, so a reused
    PID is never killed)."""
    pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
    if not isinstance(proc_or_pid, int):
        STARTED.append(proc_or_pid)
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    with open(PIDFILE, "a") as f:
        f.write(f"{pid} {comm}\n")


def kill_pid(pid, sig=signal.SIGTERM):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- servers

class Server:
    name = ""
    cmd = ""  # shown in BENCHMARKS.md

    def __init__(self):
        self.port = free_port()
        self.pid = None
        self.proc = None

    def addr(self):
        return f"127.0.0.1:{self.port}"

    def alive(self):
        return self.pid is not None and proc_stat(self.pid) is not None

    def stored(self):
        """Messages in the store now, or None when the server keeps none."""
        return None

    def stop(self):
        if self.proc is not None:
            kill_pid(self.proc.pid)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_pid(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        self.pid = None


class Ringmx(Server):
    def __init__(self, store, maildir="maildir", name=None, extra=()):
        super().__init__()
        self.store = store
        self.base = maildir
        self.maildir = os.path.join(WORK, maildir) if store == "maildir" else None
        self.name = name or "ringmx-" + store
        self.extra = list(extra)
        self.log = os.path.join(WORK, f"{self.name}.log")
        self.exit_lines = []

    def argv(self):
        spec = f"maildir:{self.maildir}" if self.maildir else "discard"
        return ["taskset", "-c", str(SERVER_CORE), RINGMX, "serve", "--listen", self.addr(),
                "--workers", "1", "--store", spec, "--hostname", "bench.localdomain",
                "--max-connections", "15000", "--max-connections-per-ip", "15000",
                "--shutdown-grace", "2"] + self.extra \
            + (["--log-level", RINGMX_LOG] if RINGMX_LOG else [])

    def start(self):
        self.cmd = " ".join(shlex.quote(a) for a in self.argv())
        lf = open(self.log, "a")
        lf.write(f"\n=== {time.ctime()} {self.cmd}\n")
        lf.flush()
        self.proc = subprocess.Popen(self.argv(), stdout=lf, stderr=lf, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        remember(self.proc)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError(f"{self.name} did not greet on {self.addr()}; see {self.log}")

    def stop(self):
        if self.proc is None:
            return
        super().stop()
        # The last lines after "=== ..." are the exit metrics, if the server prints any.
        with open(self.log, errors="replace") as f:
            tail = f.read().rsplit("\n=== ", 1)[-1].splitlines()[1:]
        tail = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in tail]
        self.exit_lines = [l for l in tail if re.search(r"stopped|fsync|commit", l)
                           and "session end" not in l][-4:]

    def stored(self):
        if self.maildir:
            return len(os.listdir(os.path.join(self.maildir, "new")))
        return None

    def fresh_store(self, tag):
        """Restart on an empty store of its own (see the module docs). False for discard,
        which has no store and is not restarted."""
        if not self.maildir:
            return False
        self.stop()
        self.maildir = os.path.join(WORK, f"{self.base}-{tag}")
        self.start()
        return True


class SmtpSink(Server):
    name = "smtp-sink"

    def argv(self):
        return ["taskset", "-c", str(SERVER_CORE), "smtp-sink", "-u", "nobody", "-m", "15000",
                self.addr(), "4096"]

    def start(self):
        self.cmd = " ".join(self.argv())
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(WORK, "smtp-sink.log"), "a"))
        self.pid = self.proc.pid
        remember(self.proc)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError("smtp-sink did not greet")


class Postfix(Server):
    name = "postfix"

    def __init__(self):
        super().__init__()
        self.dir = os.path.join(WORK, "postfix")

    def write_config(self):
        os.makedirs(os.path.join(self.dir, "queue"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        shutil.chown(os.path.join(self.dir, "data"), "postfix")
        subst = {"@DIR@": self.dir, "@PORT@": str(self.port), "@ADDR@": self.addr(),
                 "@PROCS@": str(max(300, POSTFIX_IDLE_CONNS + 50))}
        for name in ("main.cf", "master.cf"):
            with open(os.path.join(HERE, name + ".in")) as f:
                text = f.read()
            for k, v in subst.items():
                text = text.replace(k, v)
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)

    def master_pid(self):
        try:
            with open(os.path.join(self.dir, "queue", "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def start(self):
        self.write_config()
        self.cmd = (f"taskset -c {SERVER_CORE} postfix -c {self.dir} start  "
                    f"(config: benches/compare/main.cf.in, master.cf.in)")
        subprocess.run(["postfix", "-c", self.dir, "stop"], capture_output=True)
        r = subprocess.run(["taskset", "-c", str(SERVER_CORE), "postfix", "-c", self.dir, "start"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("postfix start failed: " + r.stderr.strip())
        for _ in range(50):
            self.pid = self.master_pid()
            if self.pid and proc_stat(self.pid):
                break
            time.sleep(0.1)
        remember(self.pid)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError("private postfix did not greet")

    def stored(self):
        n = 0
        for _, _, files in os.walk(os.path.join(self.dir, "queue", "hold")):
            n += len(files)
        return n

    def fresh_store(self, tag):
        """Restart with an empty queue of its own (see the module docs)."""
        self.stop()
        self.dir = os.path.join(WORK, f"postfix-{tag}")
        self.start()
        return True

    def stop(self):
        if self.pid is None:
            return
        pid = self.pid
        subprocess.run(["postfix", "-c", self.dir, "stop"], capture_output=True)
        for _ in range(50):
            if proc_stat(pid) is None:
                break
            time.sleep(0.1)
        else:
            kill_pid(pid, signal.SIGKILL)
        self.pid = None


def make_server(name, idle=False):
    if name == "ringmx-discard":
        return Ringmx("discard")
    if name == "ringmx-maildir":
        return Ringmx("maildir", "maildir-idle" if idle else "maildir")
    if name == "ringmx-syncfs":
        return Ringmx("maildir", "maildir-syncfs", name="ringmx-syncfs", extra=["--batch-syncfs"])
    if name == "smtp-sink":
        return SmtpSink()
    if name == "postfix":
        return Postfix()
    raise SystemExit(f"unknown server {name}")


# ---------------------------------------------------------------- clients

def pick(d, *paths):
    """First present value among dotted paths in a nested dict."""
    for p in paths:
        cur = d
        ok = True
        for k in p.split("."):
            if isinstance(cur, dict) and k in cur:
                cur = cur[k]
            else:
                ok = False
                break
        if ok and cur is not None:
            return cur
    return None


def loadgen_figures(j):
    """ringmx-loadgen's --json (loadgen/src/report.rs) -> the figures used here. Messages count
    when their 250 arrives, also in sessions the end of the run cut short, so they match the
    server CPU taken over the client's whole life."""
    phases = {p.get("name"): p for p in j.get("phases", [])}
    sess = phases.get("session", {})
    return dict(accepted=pick(j, "counts.messages_accepted"), elapsed=pick(j, "elapsed_s"),
                rate=pick(j, "throughput.messages_per_s"),
                sessions_rate=pick(j, "throughput.sessions_per_s"),
                sessions_ok=pick(j, "counts.sessions_ok"),
                p50_us=sess.get("p50_us") if sess.get("count") else None,
                p99_us=sess.get("p99_us") if sess.get("count") else None,
                p999_us=sess.get("p999_us") if sess.get("count") else None,
                errors=pick(j, "errors_total"),
                error_kinds={e.get("kind"): e.get("count") for e in j.get("errors", [])},
                generator_cpu_us=pick(j, "generator_cpu_us_per_message"),
                # Only with --spin: how often the machine stopped the polling client.
                client_stalls=(pick(j, "stalls_over_1ms"), pick(j, "stall_longest_ms"))
                if j.get("spin") else None)


def run_client(argv, timeout):
    """Run the client pinned to CLIENT_CORE; returns (rc, wall_s, cpu_s, stdout, stderr)."""
    t0 = time.monotonic()
    p = subprocess.Popen(["taskset", "-c", str(CLIENT_CORE)] + argv, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    remember(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_pid(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    wall = time.monotonic() - t0
    # The child has been reaped by communicate(); its CPU comes from RUSAGE_CHILDREN deltas, which
    # the caller takes around this call.
    return p.returncode, wall, out.decode(errors="replace"), err.decode(errors="replace")


def children_cpu_s():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


SOURCE_COUNTS = {"a": 20000, "b": 50000, "c": 4000}
SOURCE_SLOW = {"postfix": 0.1, "ringmx-maildir": 0.5, "ringmx-syncfs": 0.5}


def client_argv(server, shape, jsonfile, rate=None, duration=None):
    sh = SHAPES[shape]
    if CLIENT == "smtp-source":
        n = int(SOURCE_COUNTS[shape] * SOURCE_SLOW.get(server.name, 1.0) * (0.2 if QUICK else 1))
        argv = ["smtp-source", "-s", str(sh["conns"]), "-m", str(n), "-l", str(sh["size"]),
                "-f", "sender@example.com", "-t", "rcpt@example.net"]
        if sh["mps"] > 1:
            argv.append("-d")
        return argv + [server.addr()], n
    argv = [LOADGEN, "--target", server.addr(), "--messages-per-session", str(sh["mps"]),
            "--size", str(sh["size"]), "--threads", "1", "--timeout", "30",
            "--from", "sender@example.com", "--to", "rcpt@example.net", "--json", jsonfile]
    if rate is None:
        argv += ["--connections", str(sh["conns"]), "--duration", f"{duration or DURATION:g}"]
    else:
        argv += ["--rate", f"{rate:.0f}", "--duration", f"{duration or OPEN_DURATION:g}"]
        if OPEN_SPIN:
            argv.append("--spin")
    return argv, None


class FsyncCounter:
    """perf stat on the server process: fsyncs through io_uring and through system calls."""

    def __init__(self, pid, out):
        self.out = out
        self.proc = None
        if not PERF:
            return
        argv = ["taskset", "-c", str(CLIENT_CORE), "perf", "stat", "-x", ",", "-o", out,
                "-e", "io_uring:io_uring_submit_req", "--filter", "opcode == 3",
                "-e", "io_uring:io_uring_submit_req",
                "-e", "syscalls:sys_enter_fsync", "-e", "syscalls:sys_enter_fdatasync",
                "-e", "syscalls:sys_enter_syncfs",
                "-p", str(pid)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        remember(self.proc)
        time.sleep(0.3)  # let perf attach before the client starts

    def result(self):
        if self.proc is None:
            return None
        kill_pid(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_pid(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        vals = []
        try:
            with open(self.out) as f:
                for line in f:
                    parts = line.strip().split(",")
                    if len(parts) > 2 and ("io_uring" in line or "sys_enter" in line):
                        try:
                            vals.append(int(parts[0]))
                        except ValueError:
                            vals.append(None)
        except OSError:
            return None
        if len(vals) < 5 or None in vals:
            return None
        return dict(ring_fsync=vals[0], ring_ops=vals[1], sys_fsync=vals[2] + vals[3] + vals[4])


def steal_cell(r):
    """One repetition's p99 next to the time the hypervisor took from each core meanwhile, and
    what the stall probe saw on each core just before."""
    s = r.get("steal_ms") or (0.0, 0.0)
    p99 = r.get("p99_us")
    cell = (f"{p99 / 1000:.1f}" if p99 else "-") + f" ({s[0]:.0f} / {s[1]:.0f}"
    probe = r.get("stalls")
    if probe and all(probe):
        cell += (f"; {probe[0]['over_1ms']} / {probe[1]['over_1ms']} stalls, "
                 f"{max(probe[0]['longest_ms'], probe[1]['longest_ms']):.1f} ms")
    during = r.get("client_stalls")
    if during and None not in during:
        cell += f"; client {during[0]} stalls, {during[1]:.1f} ms"
    return cell + ")"


def set_sched(root, policy):
    """Puts every thread of root's process tree at SCHED_FIFO (policy "fifo") or back at
    SCHED_OTHER; returns how many threads were changed."""
    n = 0
    for pid in tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tids:
            try:
                if policy == "fifo":
                    os.sched_setscheduler(int(t), os.SCHED_FIFO, os.sched_param(FIFO_PRIO))
                else:
                    os.sched_setscheduler(int(t), os.SCHED_OTHER, os.sched_param(0))
                n += 1
            except OSError:
                pass  # a thread that has just exited
    return n


def probe_stalls():
    """Runs benches/compare/stalls.py on the server's and the client's core at once (with
    nothing else of ours running); returns its figures for each core, or None for a failed one."""
    if STALL_PROBE_S <= 0:
        return None
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stalls.py")
    procs = [subprocess.Popen(["taskset", "-c", str(core), sys.executable, script,
                               str(STALL_PROBE_S)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
             for core in (SERVER_CORE, CLIENT_CORE)]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=STALL_PROBE_S + 30)
            out.append(json.loads(text))
        except (subprocess.TimeoutExpired, ValueError):
            kill_pid(p.pid, signal.SIGKILL)
            out.append(None)
    return tuple(out)


def fresh_store(server, tag, shape, rate=None):
    """A durable server gets an empty store before each run, then WARMUP_S seconds of the run's
    own load that nothing measures (see the module docs). False if it could not be restarted."""
    if not hasattr(server, "fresh_store"):
        return True
    try:
        if not server.fresh_store(tag):
            return True
    except (RuntimeError, OSError) as e:
        log(f"SKIP {server.name} run {tag}: restart on a fresh store failed: {e}")
        return False
    if WARMUP_S > 0 and CLIENT == "loadgen":
        jf = os.path.join(WORK, f"{server.name}-{tag}-warmup.json")
        argv, _ = client_argv(server, shape, jf, rate, duration=WARMUP_S)
        rc, _, _, err = run_client(argv, WARMUP_S + 90)
        if rc != 0:
            log(f"{server.name} {tag}: warm-up client exited {rc}: {err[-300:]}")
    return True


def steal_over(r):
    """The steal of run `r` on its worse core, in ms, if it is more than STEAL_MAX_PCT of the
    run's wall time; else None."""
    worst = max(r.get("steal_ms") or (0.0, 0.0))
    return worst if worst > STEAL_MAX_PCT / 100 * 1000 * (r.get("wall_s") or 0) else None


def measure_steady(server, shape, rep, store_tag, rate=None, sched="other"):
    """`measure` after `fresh_store`, again (with another fresh store) while the run lost more
    than STEAL_MAX_PCT of its time to steal, at most STEAL_RETRIES more times. The result
    carries `tries`, the runs it took, and `steal_dropped`, the steal of the ones left out.
    None when the server could not be given its fresh store."""
    dropped = []
    for attempt in range(STEAL_RETRIES + 1):
        tag = store_tag if attempt == 0 else f"{store_tag}-t{attempt}"
        if not fresh_store(server, tag, shape, rate=rate):
            return None
        r = measure(server, shape, rep, rate=rate, sched=sched)
        worst = steal_over(r)
        if worst is None or attempt == STEAL_RETRIES:
            r.update(tries=attempt + 1, steal_dropped=dropped)
            return r
        dropped.append(round(worst))
        log(f"{server.name} {shape}{f' open {rate:.0f}/s' if rate else ''} r{rep}: "
            f"{worst:.0f} ms of steal in {r['wall_s']:.1f} s (over {STEAL_MAX_PCT:g}%): "
            "measuring again")


def measure(server, shape, rep, rate=None, sched="other"):
    tag = (f"{server.name}-{shape}{f'-open{rate:.0f}' if rate else ''}"
           f"{'-' + sched if sched != 'other' else ''}-r{rep}")
    jf = os.path.join(WORK, f"{tag}.json")
    if os.path.exists(jf):
        os.unlink(jf)
    argv, n_fixed = client_argv(server, shape, jf, rate)
    timeout = (OPEN_DURATION if rate else DURATION) + 90
    fc = FsyncCounter(server.pid, os.path.join(WORK, f"{tag}.perf")) \
        if server.name in MAILDIR_SERVERS else None
    stalls = probe_stalls() if rate else None
    stored0 = server.stored()
    la, bb = loadavg(), busy_builders()
    c0 = children_cpu_s()
    s0 = tree_cpu_s(server.pid)
    k0 = core_busy_s(SERVER_CORE)
    st0 = (steal_s(SERVER_CORE), steal_s(CLIENT_CORE))
    if sched != "other":
        changed = set_sched(server.pid, sched)
        if not changed:
            log(f"{tag}: could not set {sched} scheduling on the server")
    rc, wall, out, err = run_client(argv, timeout)
    time.sleep(0.3)  # let the server finish the last QUIT/close
    if sched != "other":
        set_sched(server.pid, "other")
    s1 = tree_cpu_s(server.pid)
    k1 = core_busy_s(SERVER_CORE)
    st1 = (steal_s(SERVER_CORE), steal_s(CLIENT_CORE))
    c1 = children_cpu_s()
    fs = fc.result() if fc else None
    stored = server.stored()
    if stored is not None:
        stored -= stored0
    r = dict(server=server.name, shape=shape, rep=rep, rc=rc, wall_s=wall,
             server_cpu_s=s1 - s0, client_cpu_s=c1 - c0, loadavg=la, builders=bb,
             # Share of the server's core used by anything but the server (others' builds).
             foreign_core_pct=max(0.0, 100 * ((k1 - k0) - (s1 - s0)) / (wall + 0.3)),
             builders_after=busy_builders(), stored=stored, open_rate=rate,
             steal_ms=(1000 * (st1[0] - st0[0]), 1000 * (st1[1] - st0[1])), stalls=stalls,
             open_sched=sched if rate else None,
             cmd=" ".join(shlex.quote(a) for a in ["taskset", "-c", str(CLIENT_CORE)] + argv))
    if CLIENT == "smtp-source":
        r.update(accepted=n_fixed if rc == 0 else 0, elapsed=wall, p50_us=None, p99_us=None,
                 errors=None if rc == 0 else 1)
    else:
        try:
            with open(jf) as f:
                j = json.load(f)
            r.update(loadgen_figures(j))
        except (OSError, ValueError) as e:
            r.update(accepted=0, error=f"no JSON from loadgen ({e}); stderr: {err[-400:]}")
    acc = r.get("accepted") or 0
    el = r.get("elapsed") or wall
    r["msgs_per_s"] = r.get("rate") or (acc / el if el else 0)
    r["cpu_us_per_msg"] = 1e6 * r["server_cpu_s"] / acc if acc else None
    r["client_cpu_us_per_msg"] = 1e6 * r["client_cpu_s"] / acc if acc else None
    if fs and acc:
        r["fsyncs_per_msg"] = (fs["ring_fsync"] + fs["sys_fsync"]) / acc
        r["ring_ops_per_msg"] = fs["ring_ops"] / acc
        r["fsync_raw"] = fs
    if rc not in (0, None) and CLIENT != "smtp-source":
        r["stderr_tail"] = err[-400:]
    log(f"{tag}: {acc} msgs, {r['msgs_per_s']:.0f} msg/s, cpu/msg "
        f"{r['cpu_us_per_msg'] or 0:.1f} us, client {r['client_cpu_us_per_msg'] or 0:.1f} us, "
        f"p50 {r.get('p50_us')} p99 {r.get('p99_us')} us, stored {stored}, rc {rc}, "
        f"load {la:.1f}, builders {bb}, others on core {SERVER_CORE} "
        f"{r['foreign_core_pct']:.0f}%, steal {r['steal_ms'][0]:.0f}/{r['steal_ms'][1]:.0f} ms"
        + (f", probe stalls >1 ms {stalls[0]['over_1ms']}/{stalls[1]['over_1ms']} "
           f"(longest {stalls[0]['longest_ms']}/{stalls[1]['longest_ms']} ms)"
           if stalls and all(stalls) else "")
        + (f", client stalls during the run {r['client_stalls'][0]} "
           f"(longest {r['client_stalls'][1]} ms)"
           if r.get("client_stalls") and None not in r["client_stalls"] else "")
        + (f", fsyncs/msg {r['fsyncs_per_msg']:.3f}" if r.get("fsyncs_per_msg") else "")
        + (f"  ERR {r.get('error')}" if r.get("error") else ""))
    return r


def hold_client(port, n):
    argv = ["taskset", "-c", str(CLIENT_CORE), sys.executable, os.path.join(HERE, "hold.py"),
            "127.0.0.1", str(port), str(n), "120"]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    remember(p)
    return p


def measure_idle(name, rep):
    server = make_server(name, idle=True)
    n = POSTFIX_IDLE_CONNS if name == "postfix" else IDLE_CONNS
    server.start()
    try:
        time.sleep(1.0)
        base = tree_rss_kib(server.pid)
        base_pss = tree_pss_kib(server.pid)
        h = hold_client(server.port, n)
        line = h.stdout.readline().decode().split()
        greeted = int(line[1]) if len(line) == 3 else 0
        failed = int(line[2]) if len(line) == 3 else n
        time.sleep(1.0)
        held = tree_rss_kib(server.pid)
        held_pss = tree_pss_kib(server.pid)
        h.stdin.close()
        h.wait(timeout=30)
    finally:
        server.stop()
    per = (held - base) / greeted if greeted else None
    per_pss = (held_pss - base_pss) / greeted if greeted else None
    log(f"{name}-d-r{rep}: {greeted} held ({failed} failed), RSS {base} -> {held} KiB, "
        f"{per if per is None else round(per, 2)} KiB/conn (PSS {per_pss if per_pss is None else round(per_pss, 2)})")
    return dict(server=name, shape="d", rep=rep, conns=greeted, failed=failed, base_kib=base,
                held_kib=held, kib_per_conn=per, pss_kib_per_conn=per_pss, cmd=server.cmd)


# ---------------------------------------------------------------- statistics and report

def med_range(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def fmt(mr, nd=0, unit=""):
    if mr is None:
        return "n/a"
    m, lo, hi = mr
    f = f"{{:.{nd}f}}"
    if len(set([round(lo, 6), round(hi, 6)])) == 1 or REPS == 1:
        return f.format(m) + unit
    return f"{f.format(m)}{unit} ({f.format(lo)}-{f.format(hi)})"


def ratio_of(results, shape, name, key):
    """Median over repetitions of figure(server) / figure(smtp-sink) in the same repetition."""
    rs = []
    for rep in range(REPS):
        a = [r.get(key) for r in results if r["server"] == name and r["shape"] == shape
             and r["rep"] == rep]
        b = [r.get(key) for r in results if r["server"] == "smtp-sink" and r["shape"] == shape
             and r["rep"] == rep]
        if a and b and a[0] and b[0]:
            rs.append(a[0] / b[0])
    return med_range(rs)


def fig(results, shape, name, key):
    return med_range([r.get(key) for r in results if r["server"] == name and r["shape"] == shape])


def versions():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return "?"
    cpu = sh("lscpu | sed -n 's/^Model name: *//p'")
    mem = sh("free -g | awk '/Mem:/{print $2}'")
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{os.cpu_count()} vCPU {cpu}, {mem} GiB "
                f"RAM, {sh('uname -r')}, {sh('. /etc/os-release; echo $PRETTY_NAME')}",
        disk=sh(f"df -hT {shlex.quote(WORK)} | awk 'NR==2{{print $1\" \"$2}}'"),
        ringmx=sh(f"cd {shlex.quote(ROOT)} && git describe --always --dirty"),
        rustc=sh("rustc --version"),
        postfix=sh("postconf -d -h mail_version"),
        perf=sh("perf --version") if PERF else "not used",
        python=sys.version.split()[0],
    )


def report(results, idle, opens, started_at, commands, exit_lines):
    v = versions()
    L = []
    A = L.append
    A(f"Generated by `benches/compare.sh` ({'QUICK=1, ' if QUICK else ''}{REPS} repetition(s), "
      f"{DURATION:g} s per closed-loop run, client: "
      f"{'ringmx-loadgen' if CLIENT == 'loadgen' else 'Postfix smtp-source (stand-in)'}) "
      f"on {v['date']}, {time.time() - started_at:.0f} s in all.")
    if NOTE:
        A("")
        A(NOTE)
    A("")
    A(f"- Machine: {v['machine']}; store and Postfix queue on {v['disk']}.")
    A(f"- Versions: ringmx {v['ringmx']}, {v['rustc']}, Postfix {v['postfix']}, {v['perf']}, "
      f"Python {v['python']}.")
    la = [r["loadavg"] for r in results] or [0]
    bb = [max(r["builders"], r.get("builders_after", 0)) for r in results] or [0]
    busy = sum(1 for b in bb if b)
    fc = [r["foreign_core_pct"] for r in results] or [0]
    A(f"- Conditions: server on core {SERVER_CORE}, client on core {CLIENT_CORE}; other users' "
      f"processes took {statistics.median(fc):.0f}% (median; range {min(fc):.0f}-{max(fc):.0f}%) "
      f"of the server's core during the runs; 1-min load "
      f"average {min(la):.1f}-{max(la):.1f} during the runs; compiler processes of other "
      f"users were running during {busy} of {len(bb)} runs (max {max(bb)} at once)"
      + (" -- figures are noisy, CPU per message less so than messages/s."
         if busy else "."))
    runs = results + opens
    again = [r for r in runs if r.get("tries", 1) > 1]
    left = [r for r in runs if steal_over(r) is not None]
    A(f"- Steal: a run that lost more than {STEAL_MAX_PCT:g}% of its time to the hypervisor on "
      f"either core was measured again, up to {STEAL_RETRIES} more time(s) (`STEAL_MAX_PCT`, "
      f"`STEAL_RETRIES`): {len(again)} of {len(runs)} closed- and open-loop runs were, "
      f"{sum(len(r.get('steal_dropped', [])) for r in runs)} runs left out"
      + (f" (their steal {min(d for r in again for d in r['steal_dropped'])}-"
         f"{max(d for r in again for d in r['steal_dropped'])} ms)" if again else "")
      + f"; {len(left)} run(s) in the tables still had more than that.")
    A("")
    A("Figures are the median of the repetitions with the range in brackets; `x sink` is the "
      "median of the per-repetition ratios to smtp-sink's figure. CPU is the server's process "
      "tree (utime+stime), so it excludes the kernel work done on the client's core for "
      "loopback delivery; p50/p99 are whole-session latencies measured by the client "
      "(closed loop).")
    A("")
    A("| shape | server | msg/s | x sink | server CPU us/msg | x sink | p50 ms | p99 ms | "
      "x sink (p99) | client CPU us/msg |")
    A("|---|---|---|---|---|---|---|---|---|---|")
    for shape in ("a", "b", "c"):
        for name in SERVERS:
            rows = [r for r in results if r["server"] == name and r["shape"] == shape]
            if not rows:
                continue
            ms = lambda k: fig(results, shape, name, k)
            p50 = med_range([r["p50_us"] / 1000 for r in rows if r.get("p50_us") is not None])
            p99 = med_range([r["p99_us"] / 1000 for r in rows if r.get("p99_us") is not None])
            A(f"| {SHAPES[shape]['desc']} | {LABEL[name]} | {fmt(ms('msgs_per_s'))} | "
              f"{fmt(ratio_of(results, shape, name, 'msgs_per_s'), 2)} | "
              f"{fmt(ms('cpu_us_per_msg'), 1)} | "
              f"{fmt(ratio_of(results, shape, name, 'cpu_us_per_msg'), 2)} | "
              f"{fmt(p50, 2)} | {fmt(p99, 2)} | "
              f"{fmt(ratio_of(results, shape, name, 'p99_us'), 2)} | "
              f"{fmt(ms('client_cpu_us_per_msg'), 1)} |")
    if idle:
        A(f"| (d) idle connections | | | | | | | | | |")
        sink = {r["rep"]: r["kib_per_conn"] for r in idle if r["server"] == "smtp-sink"}
        for name in SERVERS:
            rows = [r for r in idle if r["server"] == name]
            if not rows:
                continue
            per = med_range([r["kib_per_conn"] for r in rows])
            rat = med_range([r["kib_per_conn"] / sink[r["rep"]] for r in rows
                             if sink.get(r["rep"]) and r["kib_per_conn"] is not None])
            A(f"| (d) {rows[0]['conns']} idle connections | {LABEL[name]} | RSS/conn "
              f"{fmt(per, 2, ' KiB')} | {fmt(rat, 3)} | baseline RSS "
              f"{fmt(med_range([r['base_kib'] for r in rows]), 0, ' KiB')}, held "
              f"{fmt(med_range([r['held_kib'] for r in rows]), 0, ' KiB')} | PSS/conn "
              f"{fmt(med_range([r.get('pss_kib_per_conn') for r in rows]), 2, ' KiB')} | | | | |")
    A("")
    fs = [r for r in results if r.get("fsyncs_per_msg") is not None]
    if fs:
        A("Fsyncs per accepted message, ringmx maildir (perf stat on the server: io_uring FSYNC "
          "submissions + fsync/fdatasync/syncfs syscalls; ring ops = all io_uring submissions):")
        A("")
        A("| shape | server | fsyncs/msg | io_uring ops/msg | stored files = accepted? |")
        A("|---|---|---|---|---|")
        for shape, name in [(sh, n) for sh in ("a", "b", "c") for n in MAILDIR_SERVERS]:
            rows = [r for r in fs if r["shape"] == shape and r["server"] == name]
            if rows:
                ok = all(r.get("stored") == r.get("accepted") for r in rows)
                A(f"| {SHAPES[shape]['desc']} | {LABEL[name]} | "
                  f"{fmt(med_range([r['fsyncs_per_msg'] for r in rows]), 3)} | "
                  f"{fmt(med_range([r['ring_ops_per_msg'] for r in rows]), 1)} | "
                  f"{'yes' if ok else 'NO: ' + str([(r.get('stored'), r.get('accepted')) for r in rows])} |")
        A("")
    if exit_lines:
        A("ringmx exit metrics lines (whole server lifetime):")
        A("")
        A("```")
        L.extend(exit_lines)
        A("```")
        A("")
    if opens:
        A(f"Open loop (`--rate` = a fraction of the server's closed-loop session rate in shape "
          f"(a); {OPEN_DURATION:g} s per run; latency from the scheduled start; shape (a) "
          f"messages; " + ("the client busy-polls (`--spin`), so its CPU column is its whole core "
                           "spread over the sessions, not its work)." if OPEN_SPIN else
                           "client CPU shows how busy the one client core was).")
          + " Steal is the time the hypervisor did not run that virtual core while it had work "
          "(/proc/stat); a server or client descheduled for 100 ms stalls every session in flight "
          "for that long."
          + (f" Before each run a thread spun alone on each core for {STALL_PROBE_S:g} s "
             "(`benches/compare/stalls.py`): the cell gives how often it was stopped for more "
             "than 1 ms (server / client core) and its longest stop, the floor under any tail "
             "measured here." if STALL_PROBE_S > 0 else "")
          + (" During the run, the spinning client counts the same for itself (\"client N "
             "stalls, longest\")." if OPEN_SPIN else "")
          + (f" Rows marked \"server at SCHED_FIFO\" are runs at the target's rate with every "
             f"thread of a non-durable server's process tree at SCHED_FIFO priority {FIFO_PRIO} "
             "for the run (the client stays at SCHED_OTHER), so that the machine's other "
             "processes run only while the server waits (`OPEN_SCHED` in run.py)."
             if "fifo" in OPEN_SCHEDS else "")
          + ":")
        A("")
        A("| server | fraction | rate (sessions/s) | achieved msg/s | p50 ms | p99 ms | p99/p50 | "
          "server CPU us/msg | client CPU us/msg | each repetition: p99 ms (steal ms on server / client core"
          + ("; probe stalls > 1 ms on server / client core, longest" if STALL_PROBE_S > 0 else "")
          + ("; client stalls > 1 ms during the run, longest" if OPEN_SPIN else "")
          + ") | errors |")
        A("|---|---|---|---|---|---|---|---|---|---|---|")
        for sched, name, frac in [(sc, n, f) for sc in OPEN_SCHEDS for f in OPEN_FRACTIONS
                                  for n in SERVERS]:
            rows = [r for r in opens if r["server"] == name and r.get("open_fraction") == frac
                    and r["open_sched"] == sched]
            if not rows:
                continue
            q = med_range([r["p99_us"] / r["p50_us"] for r in rows
                           if r.get("p50_us") and r.get("p99_us")])
            A(f"| {LABEL[name]}{SCHED_LABEL[sched]} | {frac:g} | {rows[0]['open_rate']:.0f} | "
              f"{fmt(med_range([r['msgs_per_s'] for r in rows]))} | "
              f"{fmt(med_range([r['p50_us'] / 1000 for r in rows if r.get('p50_us')]), 2)} | "
              f"{fmt(med_range([r['p99_us'] / 1000 for r in rows if r.get('p99_us')]), 2)} | "
              f"{fmt(q, 2)} | {fmt(med_range([r.get('cpu_us_per_msg') for r in rows]), 1)} | "
              f"{fmt(med_range([r.get('client_cpu_us_per_msg') for r in rows]), 1)} | "
              f"{'; '.join(steal_cell(r) for r in rows)} | "
              f"{sum((r.get('errors') or 0) for r in rows)} |")
        A("")
    # Targets of issue 4.
    A("Targets (issue 4), from the medians above:")
    A("")
    A("| target | limit | measured | verdict |")
    A("|---|---|---|---|")

    def verdict(val, limit, le=True):
        if val is None:
            return "n/a ", "not measured"
        ok = val <= limit if le else val >= limit
        return (f"{val:.3g}", "met" if ok else
                f"missed by {(val / limit if le else limit / val):.2f}x")

    for shape, lim in (("a", 0.6), ("b", 0.7), ("c", 0.15)):
        m = ratio_of(results, shape, "ringmx-discard", "cpu_us_per_msg")
        val, ver = verdict(m[0] if m else None, lim)
        A(f"| CPU/msg, discard vs smtp-sink, {SHAPES[shape]['desc']} | <= {lim}x | {val}x | {ver} |")
    for name in MAILDIR_SERVERS:
        a = fig(results, "b", name, "msgs_per_s")
        b = fig(results, "b", "postfix", "msgs_per_s")
        val, ver = verdict(a[0] / b[0] if a and b and b[0] else None, 10, le=False)
        A(f"| msg/s vs private Postfix, (b), {LABEL[name]} | >= 10x | {val}x | {ver} |")
    for name in ("ringmx-discard", "ringmx-maildir"):
        per = med_range([r["kib_per_conn"] for r in idle if r["server"] == name])
        val, ver = verdict(per[0] if per else None, 2.0)
        A(f"| RSS per idle connection, {LABEL[name]} | <= 2 KiB | {val} KiB | {ver} |")
    for sched in OPEN_SCHEDS:
        for name in ("ringmx-discard", *MAILDIR_SERVERS):
            q = med_range([r["p99_us"] / r["p50_us"] for r in opens
                           if r["server"] == name and r.get("p50_us") and r.get("p99_us")
                           and r.get("open_fraction") == 0.5 and r["open_sched"] == sched])
            if sched != "other" and not q:
                continue
            val, ver = verdict(q[0] if q else None, 3.0)
            A(f"| open loop p99/p50, {LABEL[name]}{SCHED_LABEL[sched]} | <= 3x | {val}x | {ver} |")
    A("")
    A("Commands (each server alone on core 0 while measured, idle when not measured; the "
      "durable servers are started again before each run with an empty store of their own "
      f"(STORE-SHAPE-rREP) and given {WARMUP_S:g} s of the run's load unmeasured, the others "
      "are started once; shape (d) uses a freshly started server and "
      "`benches/compare/hold.py`):")
    A("")
    A("```")
    for c in commands:
        A(c)
    A("```")
    text = "\n".join(L) + "\n"
    begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
    old = open(OUT).read() if os.path.exists(OUT) else "# Benchmarks\n\n"
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(OUT, "w") as f:
        f.write(new)
    print(text)


# ---------------------------------------------------------------- main

def postfix_dirs():
    """The private Postfix's configuration directories: the first one and one per run."""
    return sorted(d for d in glob.glob(os.path.join(WORK, "postfix")) +
                  glob.glob(os.path.join(WORK, "postfix-*")) if os.path.isdir(d))


def store_dirs():
    out = []
    if "ringmx-maildir" in SERVERS:
        out += [d for d in glob.glob(os.path.join(WORK, "maildir*"))
                if not os.path.basename(d).startswith("maildir-syncfs")]
    if "ringmx-syncfs" in SERVERS:
        out += glob.glob(os.path.join(WORK, "maildir-syncfs*"))
    if "postfix" in SERVERS:
        # The first instance's directory keeps its configuration; the per-run ones go whole.
        out += [os.path.join(d, "queue") if os.path.basename(d) == "postfix" else d
                for d in postfix_dirs()]
    return sorted(d for d in out if os.path.exists(d))


def delete_stores():
    """Delete the stores (the private Postfix must be stopped), sync, and note the time.

    Why the time matters: on ext4 without a journal (this VM's root file system), creating a
    file scans past every inode of its group freed in the last 60 s, or 360 s while the inode
    table block is dirty (fs/ext4/ialloc.c: find_inode_bit() checks recently_deleted() only when
    there is no journal, and falls back to such an inode only after scanning the whole group). Emptying the maildir between runs
    halved the next run's durable rate and put ext4's inode search at the top of the profile.
    So nothing is deleted while measuring: the stores grow during a run and are deleted after
    it, and a run that starts within FS_SETTLE_S of a deletion waits before creating files."""
    victims = store_dirs()
    if not victims:
        return
    for d in postfix_dirs():
        subprocess.run(["postfix", "-c", d, "stop"], capture_output=True)
    log("deleting stores: " + ", ".join(victims))
    for v in victims:
        shutil.rmtree(v, ignore_errors=True)
    subprocess.run(["sync"])
    with open(LAST_DELETE, "w") as f:
        f.write(f"{time.time()}\n")


def last_delete():
    try:
        with open(LAST_DELETE) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return 0.0


def main():
    os.makedirs(WORK, exist_ok=True)
    os.sched_setaffinity(0, {CLIENT_CORE})
    started_at = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # compare.sh starts this in the background, where SIGINT arrives ignored; take it back so
    # Ctrl-C stops a run cleanly (and children such as perf do not inherit SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    servers = []
    results, idle, opens, commands, exit_lines = [], [], [], [], []
    try:
        if CLIENT == "loadgen" and not os.access(LOADGEN, os.X_OK):
            raise SystemExit(f"{LOADGEN} missing: build it, or run with CLIENT=smtp-source")
        closed = [s for s in SHAPES_SEL if s in SHAPES]
        # Left over by an interrupted run or KEEP_STORES=1.
        delete_stores()
        if "d" in SHAPES_SEL:
            for rep in range(REPS):
                for name in SERVERS:
                    if name == "ringmx-syncfs":
                        continue  # the same binary and memory as ringmx-maildir when idle
                    try:
                        r = measure_idle(name, rep)
                    except (RuntimeError, OSError, ValueError) as e:
                        log(f"SKIP {name} (d): {e}")
                        continue
                    idle.append(r)
            commands.append(f"# client, shape (d)\ntaskset -c {CLIENT_CORE} python3 "
                            f"benches/compare/hold.py 127.0.0.1 PORT N 120   "
                            f"(N = {IDLE_CONNS}; {POSTFIX_IDLE_CONNS} for the private Postfix)")
        if closed or "open" in SHAPES_SEL:
            wait = last_delete() + FS_SETTLE_S - time.time()
            if wait > 0 and (set(SERVERS) & {*MAILDIR_SERVERS, "postfix"}):
                log(f"waiting {wait:.0f} s for ext4 to stop skipping the inodes freed by the "
                    f"last deletion of stores (see delete_stores)")
                time.sleep(wait)
            for name in SERVERS:
                s = make_server(name)
                try:
                    s.start()
                except (RuntimeError, OSError) as e:
                    log(f"SKIP {name}: {e}")
                    continue
                servers.append(s)
                commands.append(f"# {LABEL[name]}\n{s.cmd}")
            for rep in range(REPS):
                for shape in closed:
                    for s in servers:
                        if not s.alive():
                            log(f"{s.name} is not running any more; skipped")
                            continue
                        r = measure_steady(s, shape, rep, f"{shape}-r{rep}")
                        if r is None:
                            continue
                        results.append(r)
                        if rep == 0 and s is servers[0]:
                            commands.append(f"# client, shape {shape} (here against {s.name})\n"
                                            + r["cmd"])
            if "open" in SHAPES_SEL and CLIENT == "loadgen":
                for s in servers:
                    if s.name == "postfix" or not s.alive():
                        continue
                    mx = fig(results, "a", s.name, "sessions_rate") or \
                        fig(results, "a", s.name, "msgs_per_s")
                    if not mx:
                        continue
                    runs = [(sched, frac) for sched in OPEN_SCHEDS
                            for frac in (OPEN_FRACTIONS if sched == "other" else [0.5])
                            if sched == "other" or s.name not in MAILDIR_SERVERS]
                    for sched, frac in runs:
                        for rep in range(REPS):
                            r = measure_steady(s, "a", rep, f"open{frac:g}{sched}-r{rep}",
                                               rate=mx[0] * frac, sched=sched)
                            if r is None:
                                continue
                            r["open_fraction"] = frac
                            opens.append(r)
                            if (rep == 0 and s is servers[0] and frac == OPEN_FRACTIONS[0]
                                    and sched == OPEN_SCHEDS[0]):
                                commands.append("# client, open loop\n" + r["cmd"])
            for s in servers:
                s.stop()
                if isinstance(s, Ringmx):
                    exit_lines += [f"{s.name}: {l}" for l in s.exit_lines]
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as e:  # keep cleaning up the others
                log(f"stopping {s.name}: {e}")
        for p in STARTED:
            if p.poll() is None:
                kill_pid(p.pid)
        with open(os.path.join(WORK, "results.json"), "w") as f:
            json.dump(dict(results=results, idle=idle, open=opens), f, indent=1)
    report(results, idle, opens, started_at, commands, exit_lines)
    if not KEEP_STORES:
        delete_stores()


if __name__ == "__main__":
    main()
