#!/usr/bin/env bash
# Side-by-side relay benchmark against emailproxy (email-oauth2-proxy from
# PyPI, installed into a venv here): SMTP clients through emailproxy, the
# same through sendbox's listener, and HTTP clients through a webhook-bridge
# route, all relaying to the same XOAUTH2 SMTP peer. Prints msg/s, time to
# answer and each ratio to emailproxy.
#   ./scripts/bench-smtp-relay.sh [--messages 1000] [--clients 3] [--runs 3]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sendbox-target}"
venv="$CARGO_TARGET_DIR/bench-venv"
if [ ! -x "$venv/bin/emailproxy" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "emailproxy==2026.7.3"
fi
npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error
cargo build --release --locked -p sendbox
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked --target wasm32-wasip2 \
  --manifest-path plugins/Cargo.toml --target-dir "$CARGO_TARGET_DIR/wasm-plugins"
exec python3 bench/smtp_relay.py --sendbox "$CARGO_TARGET_DIR/release/sendbox" \
  --emailproxy "$venv/bin/emailproxy" \
  --plugin "$CARGO_TARGET_DIR/wasm-plugins/wasm32-wasip2/release/webhook_bridge.wasm" "$@"
