#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine with Rust (rustup) installed:
# installs what the tests need that cargo does not (the wasm32-wasip2
# target; Node.js, npm, openssl, systemd-analyze and strace from Debian packages
# when missing; the npm test peers; componentize-py and componentize-js for
# the Python and JavaScript plugins;
# a PostgreSQL server, or a throwaway one),
# then `cargo test` over the workspace.
# Tests build the example and hostile plugins themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi

# Node.js runs the test peers; openssl makes their certificates;
# systemd-analyze checks the example unit; swaks, curl and python3 (smtplib)
# are the SMTP clients the listener tests submit with; strace shows which
# call makes the outbox's commits durable.
missing=()
for tool in node:nodejs npm:npm openssl:openssl systemd-analyze:systemd swaks:swaks curl:curl python3:python3 strace:strace; do
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

# componentize-py builds the Python plugins the tests run: pinned, in a
# virtualenv outside the clone so CI runs reuse it.
COMPONENTIZE_PY_VERSION=0.25.1
py_env="${SENDBOX_PYTHON_ENV:-$HOME/.cache/sendbox-python}"
if ! "$py_env/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv
    else
      echo "missing: python3-venv — install it, then run this again" >&2
      exit 1
    fi
  fi
  python3 -m venv "$py_env"
  "$py_env/bin/pip" install -q --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi
export SENDBOX_COMPONENTIZE_PY="$py_env/bin/componentize-py"

# The PostgreSQL server the outbox's second backend is tested against: the
# one running here, or a throwaway cluster for this run.
source scripts/postgres-for-tests.sh

# The real protocol peers the tests talk to (smtp-server, oidc-provider),
# pinned by tests/peers/package-lock.json.
npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error
# componentize-js builds the JavaScript plugins the tests run, pinned by
# tests/toolchains/package-lock.json.
npm ci --prefix tests/toolchains --no-audit --no-fund --loglevel=error

# --all-targets also builds and smoke-runs the benches (a few iterations),
# so they cannot rot; doctests need their own pass.
cargo test --workspace --all-targets --locked "$@"
cargo test --workspace --doc --locked "$@"

# A short fuzzing run of every target (README, "Fuzzing").
./scripts/fuzz.sh 15
