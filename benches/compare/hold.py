#!/usr/bin/env python3
"""Idle-connection holder for shape (d) of benches/compare.sh.

Opens N TCP connections to HOST:PORT, reads each server's 220 greeting (so the server has
accepted the connection and set up its session), prints "ready OK FAILED" on stdout, then holds
every connection open, sending nothing, until stdin closes or SECS seconds pass. It stops by
itself, so a crashed orchestrator never leaves it running for long.

usage: hold.py HOST PORT N [SECS]
"""
import errno
import os
import selectors
import socket
import sys
import time


def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    secs = float(sys.argv[4]) if len(sys.argv) > 4 else 120.0
    deadline = time.monotonic() + secs
    sel = selectors.DefaultSelector()
    socks = []
    greeted = 0
    failed = 0
    pending = {}
    # Connect in batches so the listen backlog never overflows (a dropped SYN costs a 1 s retry).
    batch = 256
    i = 0
    while (i < n or pending) and time.monotonic() < deadline:
        while i < n and len(pending) < batch:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((host, port))
            except BlockingIOError:
                pass
            except OSError:
                failed += 1
                s.close()
                i += 1
                continue
            pending[s.fileno()] = [s, b""]
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
            i += 1
        for key, _ in sel.select(timeout=1.0):
            s, buf = pending[key.fd]
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                failed += 1
                sel.unregister(s)
                del pending[key.fd]
                continue
            buf += data
            pending[key.fd][1] = buf
            # A greeting may be multi-line; its last line is "220 " (a space after the code).
            lines = buf.split(b"\r\n")
            if any(l.startswith(b"220 ") for l in lines[:-1]):
                greeted += 1
                sel.unregister(s)
                del pending[key.fd]
            elif any(l[:1] in (b"4", b"5") for l in lines[:-1]):
                failed += 1
                sel.unregister(s)
                del pending[key.fd]
    failed += len(pending)
    print(f"ready {greeted} {failed}", flush=True)
    # Hold until told to stop (stdin closes) or the deadline passes.
    sel2 = selectors.DefaultSelector()
    sel2.register(sys.stdin, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel2.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if not os.read(0, 4096):
                break
    for s in socks:
        try:
            s.close()
        except OSError as e:
            if e.errno != errno.EBADF:
                raise


if __name__ == "__main__":
    main()
