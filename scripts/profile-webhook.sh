#!/usr/bin/env bash
# Where a webhook request's CPU goes: runs one route of the webhook bench
# (committed, unique or bare) alone at 64 connections, records it with `perf` (call graphs,
# after a warm-up), and prints each owner's share of the samples and its
# microseconds per request (bench/perf_owners.py). With --idle it records
# the scheduler instead (`perf sched`, all cores) and prints where the idle
# CPU time went: with nothing to run, or while a thread of the bench was
# ready and queued on the other core (bench/idle_while_runnable.py).
#   ./scripts/profile-webhook.sh [committed|unique|bare] [--seconds 5] [--idle]
# (`unique`: the committed route with every alert its own idempotency key)
# Needs perf (Debian's linux-perf) and a PostgreSQL server, as the bench does
# (scripts/postgres-for-tests.sh finds or starts one).
set -euo pipefail
cd "$(dirname "$0")/.."
route=committed
seconds=5
idle=false
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="${2:-}"; shift 2 || shift ;;
    --idle) idle=true; shift ;;
    -*) echo "unknown option $1 (--seconds N, --idle)" >&2; exit 2 ;;
    *) route="$1"; shift ;;
  esac
done
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "--seconds takes a whole number of seconds, not '$seconds'" >&2; exit 2; }
case "$route" in committed|unique|bare) ;; *) echo "route: committed, unique or bare, not $route" >&2; exit 2 ;; esac
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sendbox-target}"
source scripts/postgres-for-tests.sh

exe=$(cargo bench --locked -p sendbox --bench webhook --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "webhook" and m.get("executable"):
        print(m["executable"])')
[ -x "$exe" ] || { echo "the webhook bench did not build: cargo bench -p sendbox --bench webhook --no-run" >&2; exit 1; }

out=$(mktemp -d)
bench=""
# Whatever happens, the bench does not outlive the script.
trap '[ -n "$bench" ] && kill "$bench" 2>/dev/null; rm -rf "$out"' EXIT
warmup=6
(cd crates/sendbox && exec "$exe" --bench --only "$route" --secs $((warmup + seconds + 3))) > "$out/bench.txt" &
bench=$!
# The route is loaded once the bench says so (its first run on a machine
# builds the example plugins first); then a warm-up, then record.
until grep -q "ready:" "$out/bench.txt" 2>/dev/null; do
  kill -0 "$bench" 2>/dev/null || { cat "$out/bench.txt" >&2; echo "the bench stopped before its route was loaded" >&2; exit 1; }
  sleep 0.2
done
sleep "$warmup"
if $idle; then
  perf sched record -q -a -o "$out/sched.data" -- sleep "$seconds" 2>/dev/null
else
  perf record -q -F 499 --call-graph dwarf,16384 -p "$bench" -o "$out/perf.data" -- sleep "$seconds" 2>/dev/null
fi
wait "$bench"
bench=""
if $idle; then
  grep "CPU/req" "$out/bench.txt"
  perf sched timehist -i "$out/sched.data" 2>/dev/null | python3 bench/idle_while_runnable.py
  exit
fi
line=$(grep "CPU/req" "$out/bench.txt")
echo "$line"
cpu_us=$(sed -E 's/.*CPU\/req +([0-9.]+) µs.*/\1/' <<<"$line")
echo "(perf's unwinding adds to the CPU per request while it records)"
perf script -i "$out/perf.data" -F comm,tid,ip,sym 2>/dev/null | python3 bench/perf_owners.py --cpu-us "$cpu_us"
