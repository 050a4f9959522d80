#!/usr/bin/env python3
"""How often this machine stops a thread that only wants to run: the noise floor under any
latency figure of benches/compare.sh.

Spins for SECS seconds reading the clock, and records every gap between two reads longer than
THRESHOLD_US (default 200). Such a gap is time the thread did not run although it was always
runnable: the hypervisor ran something else (steal), another task or a kernel thread had the
core, or an interrupt took long. A server that stalls for as long delays every session in
flight and every one due meanwhile, whatever its own code does. Run it pinned to the core to
probe, with nothing of ours on that core:

    taskset -c 0 python3 benches/compare/stalls.py 3

Prints one JSON object: seconds, gaps over 1 ms and over 5 ms, the longest gap and the sum of
all gaps over the threshold (ms), and the involuntary context switches (non-zero means another
task took the core; stalls without them came from the host or from interrupts).

usage: stalls.py SECS [THRESHOLD_US]
"""
import json
import sys
import time


def involuntary_switches():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def main():
    secs = float(sys.argv[1])
    threshold = float(sys.argv[2]) / 1e6 if len(sys.argv) > 2 else 200e-6
    now = time.perf_counter
    switches = involuntary_switches()
    gaps = []
    start = last = now()
    while last - start < secs:
        t = now()
        if t - last > threshold:
            gaps.append(t - last)
        last = t
    switches = involuntary_switches() - switches
    print(json.dumps(dict(
        secs=round(last - start, 3),
        over_1ms=sum(1 for g in gaps if g > 1e-3),
        over_5ms=sum(1 for g in gaps if g > 5e-3),
        longest_ms=round(1e3 * max(gaps, default=0.0), 2),
        total_ms=round(1e3 * sum(gaps), 1),
        involuntary_switches=switches,
    )))


if __name__ == "__main__":
    main()
