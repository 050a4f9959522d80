#!/usr/bin/env python3
"""The file system's own price of a Maildir delivery on this machine: the floor under any
durable figure of benches/compare.sh.

Delivers COUNT messages of SIZE bytes into DIR the way a Maildir writer must, with plain system
calls and nothing else: open(tmp/NAME, O_CREAT|O_EXCL), write, close, rename(tmp/NAME,
new/NAME). No fsync, no syncfs: durability only adds to this. Prints one JSON object: the
kernel and user CPU per message (getrusage), the mean wall time of each call, and messages/s.
Run it pinned to the server's core, on the file system the store uses, into a fresh directory
(a directory that already holds many files costs more per file, as in a long comparison):

    taskset -c 0 python3 benches/compare/fsfloor.py target/cmp/compare/floor 20000

With BATCH, messages are made durable the way `ringmx serve --batch-syncfs` does it, BATCH at a
time: create and write the batch's files (kept open), syncfs, fsync(new/) (the device flush),
close and rename them all, fsync(new/) again; the wall time of each step per batch is printed
too. That is the least a group commit of BATCH messages costs on this disk with nothing else
running, one batch after another.

Python adds about a microsecond per call to the wall times; the kernel CPU is the kernel's.
The directory is left in place: deleting many files makes the next creations on ext4 without a
journal scan past the freed inodes for minutes (see BENCHMARKS.md), so delete it when no
measurement follows.

usage: fsfloor.py DIR COUNT [SIZE [BATCH]]
"""
import ctypes
import json
import os
import resource
import sys
import time


def msg_name(pid, i):
    """The i-th message's name, in ringmx's Maildir convention."""
    return f"{int(time.time())}.M{i % 1000000:06d}P{pid}Q{i}W0.bench.localdomain"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    d, count = sys.argv[1], int(sys.argv[2])
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 1400
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    body = b"x" * size
    with os.scandir(os.path.join(d, "new")) as it:
        before = sum(1 for _ in it)
    if batch > 0:
        return batched(d, count, body, batch, before)
    pid = os.getpid()
    t_open = t_write = t_close = t_rename = 0.0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for i in range(count):
        name = msg_name(pid, i)
        tmp = os.path.join(d, "tmp", name)
        a = time.perf_counter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        b = time.perf_counter()
        os.write(fd, body)
        c = time.perf_counter()
        os.close(fd)
        e = time.perf_counter()
        os.rename(tmp, os.path.join(d, "new", name))
        f = time.perf_counter()
        t_open += b - a
        t_write += c - b
        t_close += e - c
        t_rename += f - e
    wall = time.perf_counter() - start
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    us = 1e6 / count
    print(json.dumps({
        "messages": count,
        "size": size,
        "msgs_per_s": round(count / wall),
        "kernel_cpu_us_per_msg": round((r1.ru_stime - r0.ru_stime) * us, 1),
        "user_cpu_us_per_msg": round((r1.ru_utime - r0.ru_utime) * us, 1),
        "wall_us": {"open": round(t_open * us, 1), "write": round(t_write * us, 1),
                    "close": round(t_close * us, 1), "rename": round(t_rename * us, 1)},
        "files_in_new_at_start": before,
    }))


def batched(d, count, body, batch, before):
    libc = ctypes.CDLL(None, use_errno=True)
    new_dir = os.open(os.path.join(d, "new"), os.O_RDONLY | os.O_DIRECTORY)
    pid = os.getpid()
    steps = dict.fromkeys(("create_write", "syncfs", "flush", "close_rename", "dir_fsync"), 0.0)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    done = batches = 0
    while done < count:
        n = min(batch, count - done)
        names = [msg_name(pid, done + i) for i in range(n)]
        t = [time.perf_counter()]
        fds = []
        for name in names:
            fd = os.open(os.path.join(d, "tmp", name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.write(fd, body)
            fds.append(fd)
        t.append(time.perf_counter())
        if libc.syncfs(new_dir) != 0:
            sys.exit(f"syncfs: {os.strerror(ctypes.get_errno())}")
        t.append(time.perf_counter())
        os.fsync(new_dir)
        t.append(time.perf_counter())
        for fd, name in zip(fds, names):
            os.close(fd)
            os.rename(os.path.join(d, "tmp", name), os.path.join(d, "new", name))
        t.append(time.perf_counter())
        os.fsync(new_dir)
        t.append(time.perf_counter())
        for k, (a, b) in zip(steps, zip(t, t[1:])):
            steps[k] += b - a
        done += n
        batches += 1
    wall = time.perf_counter() - start
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    us = 1e6 / count
    print(json.dumps({
        "messages": count,
        "size": len(body),
        "batch": batch,
        "msgs_per_s": round(count / wall),
        "kernel_cpu_us_per_msg": round((r1.ru_stime - r0.ru_stime) * us, 1),
        "user_cpu_us_per_msg": round((r1.ru_utime - r0.ru_utime) * us, 1),
        "wall_us_per_batch": {k: round(v * 1e6 / batches) for k, v in steps.items()},
        "files_in_new_at_start": before,
    }))


if __name__ == "__main__":
    main()
