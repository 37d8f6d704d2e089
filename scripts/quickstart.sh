#!/usr/bin/env bash
# Builds the example plugins and the sendbox binary, then runs each example
# plugin on its sample event, printing what it would send. Nothing is sent.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi

target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked --target wasm32-wasip2 \
  --manifest-path plugins/Cargo.toml --target-dir "$target/wasm-plugins"
cargo build --release --locked -p sendbox

wasm="$target/wasm-plugins/wasm32-wasip2/release"
for p in file-alert webhook-bridge daily-digest; do
  echo "== $p: plugins/$p/sample-event.json"
  "$target/release/sendbox" plugin run "$wasm/${p//-/_}.wasm" \
    --event "plugins/$p/sample-event.json" --config to=ops@example.com
done
