#!/usr/bin/env bash
# CPU per message of ringmx-loadgen vs Postfix smtp-source, both against Postfix smtp-sink on
# 127.0.0.1. smtp-sink is pinned to core 0, the client to core 1 (taskset). CPU is the client's
# own user+system time (getrusage of the child), divided by the messages it sent. Median of RUNS.
#
# Shapes: (a) one 1 KB message per session, 50 sessions in parallel;
#         (b) 50 x 1 KB messages per session, 50 sessions in parallel.
# Needs: smtp-sink and smtp-source (Debian package postfix; the mail system need not run), python3,
# taskset, and a release build of ringmx-loadgen (LOADGEN=path, default target/release or
# $CARGO_TARGET_DIR/release). Usage: loadgen/bench-vs-smtp-source.sh [MESSAGES] [RUNS]
# Extra ringmx-loadgen flags (e.g. --batch 0) can be given in LOADGEN_ARGS.
set -euo pipefail

MESSAGES=${1:-20000}
RUNS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOADGEN=${LOADGEN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringmx-loadgen}
[ -x "$LOADGEN" ] || { echo "build it first: cargo build --release -p ringmx-loadgen ($LOADGEN missing)" >&2; exit 1; }
command -v smtp-sink >/dev/null && command -v smtp-source >/dev/null || {
  echo "smtp-sink/smtp-source missing: DEBIAN_FRONTEND=noninteractive apt-get install -y postfix" >&2; exit 1; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SINK_USER=$( [ "$(id -u)" = 0 ] && echo "-u nobody" || echo "" )
# -m 1000: connection cap above our 50; 1024: listen backlog.
taskset -c 0 smtp-sink $SINK_USER -m 1000 127.0.0.1:$PORT 1024 &
SINK=$!
trap 'kill $SINK 2>/dev/null || true' EXIT
sleep 0.5

# Runs "$@" pinned to core 1 and prints its user+system CPU seconds.
cpu_of() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys
r = subprocess.run(["taskset", "-c", "1"] + sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
if r.returncode != 0:
    sys.exit("failed: %s: %s" % (" ".join(sys.argv[1:]), r.stderr.decode()[-500:]))
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print("%.6f" % (ru.ru_utime + ru.ru_stime))
PY
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

us_per_msg() { awk -v s="$1" -v m="$2" 'BEGIN {printf "%.1f", s * 1e6 / m}'; }

run_shape() {
  local name=$1 per_session=$2
  local sessions=$(( MESSAGES / per_session ))
  local lg=() ss=()
  for i in $(seq "$RUNS"); do
    lg+=("$(cpu_of "$LOADGEN" --target 127.0.0.1:$PORT --connections 50 --sessions $sessions \
      --messages-per-session $per_session --size 1024 --timeout 30 ${LOADGEN_ARGS:-})")
    if [ "$per_session" = 1 ]; then
      ss+=("$(cpu_of smtp-source -s 50 -m $MESSAGES -l 1024 127.0.0.1:$PORT)")
    else
      # smtp-source -d keeps one connection for all of a session's messages; 50 sessions of
      # per_session messages each is -s 50 -m 50*per_session, repeated to reach MESSAGES.
      local reps=$(( MESSAGES / (50 * per_session) ))
      ss+=("$(python3 - "$reps" "$per_session" "$PORT" <<'PY'
import resource, subprocess, sys
reps, per, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for _ in range(reps):
    subprocess.run(["taskset", "-c", "1", "smtp-source", "-d", "-s", "50", "-m", str(50 * per), "-l", "1024",
                    "127.0.0.1:" + port], check=True, stdout=subprocess.DEVNULL)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print("%.6f" % (ru.ru_utime + ru.ru_stime))
PY
)")
    fi
  done
  local lg_med ss_med
  lg_med=$(printf '%s\n' "${lg[@]}" | median)
  ss_med=$(printf '%s\n' "${ss[@]}" | median)
  local lg_us ss_us
  lg_us=$(us_per_msg "$lg_med" "$MESSAGES")
  ss_us=$(us_per_msg "$ss_med" "$MESSAGES")
  echo "$name: ringmx-loadgen ${lg_us} µs/msg (runs: ${lg[*]} s), smtp-source ${ss_us} µs/msg (runs: ${ss[*]} s), ratio $(awk -v a="$lg_us" -v b="$ss_us" 'BEGIN {printf "%.2f", a / b}')"
}

echo "messages per run: $MESSAGES, runs: $RUNS, smtp-sink on core 0 port $PORT, clients on core 1, ringmx-loadgen flags: ${LOADGEN_ARGS:-(defaults)}"
run_shape "(a) 1 x 1 KB per session, 50 sessions" 1
run_shape "(b) 50 x 1 KB per session, 50 sessions" 50
