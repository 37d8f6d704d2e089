#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for SECONDS each (default 20), starting
# from the corpus in fuzz/corpus/TARGET; new inputs go to a temporary folder,
# crashes to fuzz/artifacts/TARGET. Exits non-zero on the first crash.
#
#   ./scripts/fuzz.sh          # the short run CI does
#   ./scripts/fuzz.sh 3600     # an hour per target, before a release
#
# libFuzzer needs coverage instrumentation; on a stable toolchain that is
# allowed with RUSTC_BOOTSTRAP=1 (no sanitizer: Rust is memory safe, and
# the targets assert sendbox's own invariants).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
# Instrumented builds are kept apart from the normal ones.
export CARGO_TARGET_DIR="${SENDBOX_FUZZ_TARGET_DIR:-$HOME/.cache/sendbox-fuzz-target}"

cd fuzz
cargo fuzz build --sanitizer none -O
targets=(config webhook_request outcome message submitted_message)
for target in "${targets[@]}"; do
  scratch="$(mktemp -d)"
  mkdir "$scratch/new"
  # A folder git keeps only with files in it; libFuzzer needs it to exist.
  mkdir -p "corpus/$target"
  echo "fuzzing $target for ${seconds}s"
  log="$scratch/log"
  status=0
  cargo fuzz run --sanitizer none -O "$target" "$scratch/new" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked|==[0-9]+== ERROR" "$log" || true
  if [ "$status" != 0 ]; then
    tail -40 "$log" >&2 || true
    echo "fuzz target $target failed (exit $status); the input is in fuzz/artifacts/$target" >&2
    exit 1
  fi
  rm -rf "$scratch"
done
echo "fuzzing: ${#targets[@]} passed, 0 failed"
