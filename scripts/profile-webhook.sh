#!/usr/bin/env bash
# Where a webhook request's CPU goes: runs one route of the webhook bench
# (committed, unique or bare) alone at 64 connections, records it with `perf` (call graphs,
# after a warm-up), and prints each owner's share of the samples and its
# microseconds per request (bench/perf_owners.py). With --idle it records
# the scheduler instead (`perf sched`, all cores) and prints where the idle
# CPU time went: with nothing to run, or while a thread of the bench was
# ready and queued on the other core (bench/idle_while_runnable.py). With
# --threads it reads each thread's scheduler counters instead
# (/proc/<pid>/task/<tid>/schedstat, no perf needed) and prints, per thread,
# its time on a core, its time ready but waiting for one, and its slices.
#   ./scripts/profile-webhook.sh [committed|unique|bare] [--seconds 5] [--idle | --threads]
# (`unique`: the committed route with every alert its own idempotency key)
# Needs perf (Debian's linux-perf; not for --threads) and a PostgreSQL
# server, as the bench does (scripts/postgres-for-tests.sh finds or starts
# one).
set -euo pipefail
cd "$(dirname "$0")/.."
route=committed
seconds=5
idle=false
threads=false
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="${2:-}"; shift 2 || shift ;;
    --idle) idle=true; shift ;;
    --threads) threads=true; shift ;;
    -*) echo "unknown option $1 (--seconds N, --idle, --threads)" >&2; exit 2 ;;
    *) route="$1"; shift ;;
  esac
done
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "--seconds takes a whole number of seconds, not '$seconds'" >&2; exit 2; }
case "$route" in committed|unique|bare) ;; *) echo "route: committed, unique or bare, not $route" >&2; exit 2 ;; esac
$idle && $threads && { echo "--idle and --threads are two different recordings: take one" >&2; exit 2; }
$threads || command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
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
# Each thread of the bench: tid, name, then its counters (ns on a core, ns
# ready and waiting for one, slices), sorted by tid for `join`.
schedstat() {
  for t in /proc/"$bench"/task/*; do
    printf '%s %s %s\n' "${t##*/}" "$(tr ' ' _ <"$t/comm")" "$(cat "$t/schedstat")"
  done 2>/dev/null | sort
}
if $threads; then
  schedstat >"$out/before"
  sleep "$seconds"
  schedstat >"$out/after"
elif $idle; then
  perf sched record -q -a -o "$out/sched.data" -- sleep "$seconds" 2>/dev/null
else
  perf record -q -F 499 --call-graph dwarf,16384 -p "$bench" -o "$out/perf.data" -- sleep "$seconds" 2>/dev/null
fi
wait "$bench"
bench=""
line=$(grep "CPU/req" "$out/bench.txt")
echo "$line"
if $threads; then
  # Threads that started or ended between the two readings are left out.
  join "$out/before" "$out/after" | awk -v s="$seconds" '
    { on = ($7 - $3) / 1e6 / s; ready = ($8 - $4) / 1e6 / s; slices = ($9 - $5) / s
      if (on < 1) next
      printf "  %-16s %6.0f ms/s on a core  %6.0f ms/s ready, waiting for one  %6.0f slices/s\n", $2, on, ready, slices
      tot_on += on; tot_ready += ready }
    END { printf "  %-16s %6.0f ms/s on a core  %6.0f ms/s ready, waiting for one\n", "all", tot_on, tot_ready }'
  exit
fi
if $idle; then
  perf sched timehist -i "$out/sched.data" 2>/dev/null | python3 bench/idle_while_runnable.py
  exit
fi
cpu_us=$(sed -E 's/.*CPU\/req +([0-9.]+) µs.*/\1/' <<<"$line")
echo "(perf's unwinding adds to the CPU per request while it records)"
perf script -i "$out/perf.data" -F comm,tid,ip,sym 2>/dev/null | python3 bench/perf_owners.py --cpu-us "$cpu_us"
