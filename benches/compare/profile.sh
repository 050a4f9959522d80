#!/usr/bin/env bash
# Profile ringmx under one shape of benches/compare.sh: the server pinned to core 0 under
# `perf record -g`, ringmx-loadgen pinned to core 1, then the hottest symbols.
#
#   benches/compare/profile.sh [discard|maildir] [a|b|c] [SECS]
#
# Uses the release binaries compare.sh built (target/cmp/release; the release profile keeps
# debug line info, so symbols resolve). Writes WORK/profile-STORE-SHAPE.{data,txt}.
# EXTRA="--batch-syncfs" passes more flags to the server.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cmp}
BIN=${BIN_DIR:-$CARGO_TARGET_DIR/release}
WORK=${WORK:-$CARGO_TARGET_DIR/compare}
STORE=${1:-discard}
SHAPE=${2:-a}
SECS=${3:-8}
mkdir -p "$WORK"
case $SHAPE in
    a) ARGS=(--connections 50 --messages-per-session 1 --size 1024) ;;
    b) ARGS=(--connections 50 --messages-per-session 50 --size 1024) ;;
    c) ARGS=(--connections 20 --messages-per-session 1 --size 102400) ;;
    *) echo "shape a, b or c" >&2; exit 2 ;;
esac
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SPEC=discard
if [[ $STORE == maildir ]]; then
    # Deleting many files and then creating many more in the same ext4 group within a minute
    # makes ext4 (without a journal) scan past the freed inodes: wait that out (see run.py).
    if [[ -d $WORK/profile-maildir ]]; then
        rm -rf "$WORK/profile-maildir"
        sync
        echo "profile.sh: waiting 65 s after deleting the last profile's maildir" >&2
        sleep 65
    fi
    SPEC=maildir:$WORK/profile-maildir
fi
OUTP=$WORK/profile-$STORE-$SHAPE
SERVER=
PERFPID=
cleanup() {
    [[ -n $PERFPID ]] && kill -INT "$PERFPID" 2>/dev/null && wait "$PERFPID" 2>/dev/null || true
    [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
taskset -c 0 "$BIN/ringmx" serve --listen "127.0.0.1:$PORT" --workers 1 --store "$SPEC" ${EXTRA:-} \
    --hostname bench.localdomain --max-connections-per-ip 15000 --shutdown-grace 2 \
    >"$OUTP.server.log" 2>&1 &
SERVER=$!
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
taskset -c 1 perf record -F 999 --call-graph "${CALLGRAPH:-dwarf,16384}" -o "$OUTP.data" -p "$SERVER" \
    2>"$OUTP.perf.log" &
PERFPID=$!
sleep 0.5
taskset -c 1 "$BIN/ringmx-loadgen" --target "127.0.0.1:$PORT" "${ARGS[@]}" --threads 1 \
    --duration "$SECS" --json "$OUTP.json" >"$OUTP.loadgen.txt" 2>&1 || true
kill -INT "$PERFPID"
wait "$PERFPID" 2>/dev/null || true
PERFPID=
{
    echo "# ringmx --store $SPEC, shape ($SHAPE), ${SECS}s; loadgen report:"
    sed -n '1,40p' "$OUTP.loadgen.txt"
    echo
    echo "# self time (no children), top symbols"
    perf report -i "$OUTP.data" --no-children --stdio --percent-limit 0.7 -g none \
        --sort dso,symbol 2>/dev/null | grep -v '^$' | head -60
    echo
    echo "# by shared object"
    perf report -i "$OUTP.data" --no-children --stdio -g none --sort dso 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | head -15
    echo
    echo "# inclusive (children), top entries"
    perf report -i "$OUTP.data" --children --stdio --percent-limit 3 -g none \
        --sort symbol 2>/dev/null | grep -v '^$' | head -60
} >"$OUTP.txt"
cat "$OUTP.txt"
