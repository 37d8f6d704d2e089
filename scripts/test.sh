#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine with Rust (rustup) installed:
# installs what the tests need that cargo does not (the wasm32-wasip2
# target; Node.js, npm, openssl and systemd-analyze from Debian packages
# when missing; the npm test peers; a PostgreSQL server, or a throwaway one),
# then `cargo test` over the workspace.
# Tests build the example and hostile plugins themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi

# Node.js runs the test peers; openssl makes their certificates;
# systemd-analyze checks the example unit; swaks, curl and python3 (smtplib)
# are the SMTP clients the listener tests submit with.
missing=()
for tool in node:nodejs npm:npm openssl:openssl systemd-analyze:systemd swaks:swaks curl:curl python3:python3; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
  else
    echo "missing: ${missing[*]} — install these packages, then run this again" >&2
    exit 1
  fi
fi

# The PostgreSQL server the outbox's second backend is tested against: the
# one running here, or a throwaway cluster for this run.
source scripts/postgres-for-tests.sh

# The real protocol peers the tests talk to (smtp-server, oidc-provider),
# pinned by tests/peers/package-lock.json.
npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error

# --all-targets also builds and smoke-runs the benches (a few iterations),
# so they cannot rot; doctests need their own pass.
cargo test --workspace --all-targets --locked "$@"
cargo test --workspace --doc --locked "$@"

# A short fuzzing run of every target (README, "Fuzzing").
./scripts/fuzz.sh 15
