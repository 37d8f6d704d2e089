#!/usr/bin/env bash
# The webhook targets of DESIGN.md measured as its table states them: the
# real `sendbox run` binary, loaded by `wrk` (a separate process, 2 threads)
# at 16 and 64 connections. The committed route runs webhook-bridge on an
# Alertmanager payload (every request its own groupKey, so every request
# commits a new row, fsync on); the baseline is the same server's
# `GET /healthz` (no plugin, no commit). Runs alternate; prints req/s, p50
# and p99 of each, the ratio, and the medians at 64 connections.
#   ./scripts/bench-webhook-wrk.sh [--runs 3] [--seconds 8] [--binary PATH]
# --binary measures that `sendbox` (say, an earlier release's, kept aside)
# instead of building this checkout's.
# Needs wrk (Debian's package: apt-get install wrk).
# The account's rate limit holds delivery back during the runs, so they
# measure the webhook path alone, as `cargo bench --bench webhook` does.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
seconds=8
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="${2:-}"; shift 2 ;;
    --seconds) seconds="${2:-}"; shift 2 ;;
    --binary) binary="${2:-}"; shift 2 ;;
    *) echo "unknown argument '$1': --runs N, --seconds N, --binary PATH" >&2; exit 2 ;;
  esac
done
[ -z "$binary" ] || [ -x "$binary" ] || { echo "--binary: '$binary' is not an executable file" >&2; exit 2; }
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "--runs takes a whole number, not '$runs'" >&2; exit 2; }
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "--seconds takes a whole number, not '$seconds'" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sendbox-target}"
if [ -z "$binary" ]; then
  cargo build --release --locked -p sendbox
  binary="$CARGO_TARGET_DIR/release/sendbox"
fi
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked --target wasm32-wasip2 \
  --manifest-path plugins/Cargo.toml --target-dir "$CARGO_TARGET_DIR/wasm-plugins"

work=$(mktemp -d)
daemon=""
trap '[ -n "$daemon" ] && kill "$daemon" 2>/dev/null; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/sendbox.toml" <<EOF
[daemon]
listen = "127.0.0.1:$port"
store = "$work/var/sendbox.db"
cache_dir = "$work/var/cache"

[accounts.local]
provider = "file"
mailbox = "sendbox@localhost"
dir = "$work/var/mail"
rate_per_minute = 1

[plugins.webhook-bridge]
wasm = "$CARGO_TARGET_DIR/wasm-plugins/wasm32-wasip2/release/webhook_bridge.wasm"
account = "local"

[plugins.webhook-bridge.config]
to = "oncall@example.com"

[plugins.webhook-bridge.webhook]
path = "/hooks/alerts"
unauthenticated = true
EOF
"$binary" run --config "$work/sendbox.toml" > "$work/daemon.log" 2>&1 &
daemon=$!
until grep -q "sendbox ready" "$work/daemon.log" 2>/dev/null; do
  kill -0 "$daemon" 2>/dev/null || { cat "$work/daemon.log" >&2; echo "sendbox did not start" >&2; exit 1; }
  sleep 0.2
done
base="http://127.0.0.1:$port"
export ALERT="$PWD/plugins/webhook-bridge/samples/alert.json"
lua="$PWD/bench/wrk_alert_post.lua"

# One wrk run: prints "req/s p50_ms p99_ms errors".
measure() { # conns secs url [lua]
  local out
  if [ -n "${4:-}" ]; then
    out=$(wrk -t2 -c"$1" -d"$2"s --latency -s "$4" "$3")
  else
    out=$(wrk -t2 -c"$1" -d"$2"s --latency "$3")
  fi
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /Requests\/sec/ { rps = $2 }
    /Non-2xx|Socket errors/ { bad = 1 }
    END { printf "%.0f %.2f %.2f %d\n", rps, p50, p99, bad }' <<<"$out"
}

measure 64 2 "$base/hooks/alerts" "$lua" > /dev/null # warm-up
echo "sendbox run + wrk -t2 (same 2 cores): the committed webhook-bridge route and GET /healthz of the same server"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
ratios=() rates=() p99s=()
for run in $(seq "$runs"); do
  for conns in 16 64; do
    read -r brps bp50 bp99 bbad < <(measure "$conns" "$seconds" "$base/healthz")
    read -r crps cp50 cp99 cbad < <(measure "$conns" "$seconds" "$base/hooks/alerts" "$lua")
    [ "$bbad$cbad" = "00" ] || { echo "errors or non-2xx answers in run $run at $conns connections" >&2; exit 1; }
    [ "$brps" -gt 0 ] && [ "$crps" -gt 0 ] || { echo "wrk got no answers in run $run at $conns connections (see $work/daemon.log)" >&2; exit 1; }
    ratio=$(python3 -c "print(f'{$crps / $brps:.2f}')")
    printf '  run %d, %2d connections  GET /healthz %7d req/s p50 %6.2f ms p99 %6.2f ms   committed %6d req/s p50 %6.2f ms p99 %6.2f ms   ratio %s\n' \
      "$run" "$conns" "$brps" "$bp50" "$bp99" "$crps" "$cp50" "$cp99" "$ratio"
    if [ "$conns" = 64 ]; then ratios+=("$ratio"); rates+=("$crps"); p99s+=("$cp99"); fi
  done
done
median() { # format values...
  local format="$1"; shift
  printf '%s\n' "$@" | sort -g | awk -v f="$format" '{ v[NR] = $1 } END { printf f, (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo "  at 64 (medians of $runs runs): committed $(median %.0f "${rates[@]}") req/s (target ≥ 10,000), p99 $(median %.2f "${p99s[@]}") ms (target ≤ 10 ms), $(median %.2f "${ratios[@]}") of GET /healthz"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
