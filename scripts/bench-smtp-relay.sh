#!/usr/bin/env bash
# Side-by-side SMTP relay benchmark: sendbox's listener vs emailproxy
# (email-oauth2-proxy from PyPI, installed into a venv here), both relaying
# to the same XOAUTH2 SMTP peer. Prints msg/s, time to 250 and the ratio.
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
exec python3 bench/smtp_relay.py --sendbox "$CARGO_TARGET_DIR/release/sendbox" \
  --emailproxy "$venv/bin/emailproxy" "$@"
