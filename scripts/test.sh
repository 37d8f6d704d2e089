#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need that cargo does
# not (the wasm32-wasip2 target, the npm test peers), then `cargo test`
# over the workspace.
# Tests build the example and hostile plugins themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi

# The real protocol peers the tests talk to (smtp-server, oidc-provider),
# pinned by tests/peers/package-lock.json.
npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error

# --all-targets also builds and smoke-runs the benches (a few iterations),
# so they cannot rot; doctests need their own pass.
cargo test --workspace --all-targets --locked "$@"
cargo test --workspace --doc --locked "$@"
