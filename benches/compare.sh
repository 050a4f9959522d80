#!/usr/bin/env bash
# Side-by-side comparison of ringmx with Postfix on 127.0.0.1 (issue 4), in one command:
#
#   benches/compare.sh            # 3 repetitions, ~10-15 minutes (up to 3x that when runs
#                                 # lose time to steal and are measured again); writes BENCHMARKS.md
#   QUICK=1 benches/compare.sh    # 1 repetition, shorter runs, fewer idle connections
#
# It installs Postfix (for smtp-sink and the private durable instance) if missing, builds ringmx
# and ringmx-loadgen in release mode, then runs benches/compare/run.py, which measures
#   servers: ringmx --store discard, ringmx maildir, Postfix smtp-sink, a private Postfix
#            instance holding every message in its own queue (benches/compare/*.cf.in);
#   shapes:  (a) 1 KB, one message per session, 50 sessions; (b) 50 x 1 KB per session, 50
#            sessions; (c) 100 KB, 20 sessions; (d) 10,000 idle connections; plus an open-loop run
#            at half and a quarter of the closed-loop session rate;
# with each server pinned to core 0 and the client to core 1, and writes the table to
# BENCHMARKS.md (between the compare:begin/end markers).
#
# Knobs (environment): QUICK=1, REPS=N, DURATION=SECS, IDLE_CONNS=N, SERVERS=a,b (ringmx-discard,
# ringmx-maildir,smtp-sink,postfix), SHAPES=a,b,c,d,open, CLIENT=smtp-source (Postfix's client
# instead of ringmx-loadgen), NO_BUILD=1, CARGO_TARGET_DIR, OUT=file, NOTE="text for the report",
# OPEN_FRACTIONS=0.5,0.25, OPEN_SCHED=other,fifo (also run the target's rate with the
# non-durable servers' threads at SCHED_FIFO; the default is "other"), KEEP_STORES=1 (keep the
# stored messages), STEAL_MAX_PCT=5 and STEAL_RETRIES=2 (a run that lost more than that share of
# its time to steal on either core is measured again, at most that many times), FS_SETTLE_S=360
# (how long after deleting stores file creation is measured again: see delete_stores in run.py).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Paths given relative to where the script was started from; absolute from here on, because the
# private Postfix needs absolute queue and log paths (with relative ones `postfix start` exits 1
# without a word, and the durable reference goes missing from the table).
for v in CARGO_TARGET_DIR BIN_DIR WORK OUT; do
    if [[ -n ${!v:-} ]]; then
        export "$v=$(realpath -m -- "${!v}")"
    fi
done
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cmp}
export BIN_DIR=${BIN_DIR:-$CARGO_TARGET_DIR/release}
export WORK=${WORK:-$CARGO_TARGET_DIR/compare}
mkdir -p "$WORK"

say() { echo "compare.sh: $*" >&2; }

# --- clean-up: everything started here, by PID, whatever way the script ends ------------------
PIDFILE=$WORK/pids
: >"$PIDFILE"
RUNNER_PID=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $RUNNER_PID ]] && kill -0 "$RUNNER_PID" 2>/dev/null; then
        kill "$RUNNER_PID" 2>/dev/null || true
        wait "$RUNNER_PID" 2>/dev/null || true
    fi
    # The private Postfix instances (the first one, and one per run, each with its own queue)
    # are stopped through their own command (master is not our child).
    for pdir in "$WORK"/postfix "$WORK"/postfix-*; do
        if [[ -f $pdir/main.cf ]]; then
            postfix -c "$pdir" stop >/dev/null 2>&1 || true
        fi
    done
    # Anything run.py started and left behind: only if the PID still runs the program we started
    # (a PID may have been reused by someone else's process since).
    if [[ -s $PIDFILE ]]; then
        while read -r pid comm; do
            [[ -n $pid ]] || continue
            now=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
            case $now in
                ringmx|ringmx-loadgen|smtp-sink|smtp-source|perf|python3|taskset)
                    [[ $now == "$comm" || $comm == taskset ]] && kill "$pid" 2>/dev/null || true ;;
            esac
        done <"$PIDFILE"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- install what is missing -------------------------------------------------------------------
apt_install() {
    # Another user may hold the dpkg lock (installing at the same time): wait and retry.
    local tries=0
    until DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" </dev/null; do
        tries=$((tries + 1))
        if ((tries > 30)); then say "apt-get install $* keeps failing"; return 1; fi
        say "apt-get busy or failed; retrying in 5 s ($tries)"
        sleep 5
    done
}
need_pkgs=()
command -v smtp-sink >/dev/null && command -v smtp-source >/dev/null && command -v postfix >/dev/null \
    || need_pkgs+=(postfix)
command -v perf >/dev/null || need_pkgs+=(linux-perf)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
command -v python3 >/dev/null || need_pkgs+=(python3)
if ((${#need_pkgs[@]})); then
    say "installing ${need_pkgs[*]}"
    # Keep the system mail service from starting: policy-rc.d refuses service starts while we
    # install (only created if there is none; removed again afterwards).
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
        apt_update_tries=0
        until apt-get update -q; do
            apt_update_tries=$((apt_update_tries + 1))
            ((apt_update_tries > 30)) && break
            sleep 5
        done
    fi
    apt_install "${need_pkgs[@]}" || apt_install linux-perf || true
    [[ -n $made_policy ]] && rm -f "$policy"
fi
command -v smtp-sink >/dev/null || { say "smtp-sink not installed"; exit 1; }

# --- build ---------------------------------------------------------------------------------------
if [[ ${NO_BUILD:-0} != 1 ]]; then
    say "building ringmx and ringmx-loadgen (release) into $CARGO_TARGET_DIR"
    cargo build --release -q -p ringmx -p ringmx-loadgen
fi

# --- limits --------------------------------------------------------------------------------------
# 10,000 idle connections need more descriptors than the usual 1024 (server and holder alike).
hard=$(ulimit -Hn)
want=20000
[[ $hard != unlimited && $hard -lt $want ]] && want=$hard
ulimit -n "$want"
if (($(ulimit -n) < ${IDLE_CONNS:-10000} + 100)); then
    export IDLE_CONNS=$(($(ulimit -n) - 200))
    say "open-file limit $(ulimit -n): shape (d) holds $IDLE_CONNS connections"
fi

# --- measure -------------------------------------------------------------------------------------
python3 "$ROOT/benches/compare/run.py" &
RUNNER_PID=$!
wait "$RUNNER_PID"
