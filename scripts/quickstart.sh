#!/usr/bin/env bash
# Builds the example plugins and the sendbox binary, copies the plugins to
# var/plugins/, and starts the daemon with examples/quickstart.toml: a
# watched folder, two webhook routes and a schedule, writing every email as
# an .eml file under var/quickstart/mail/. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi

target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked -p sendbox

# `sendbox plugin build` puts each plugin's description (name, version, the
# config keys it reads) inside its component: `sendbox plugin inspect` shows it.
mkdir -p var/plugins var/quickstart/incoming var/quickstart/plugins.d
for p in file-alert webhook-bridge daily-digest; do
  CARGO_TARGET_DIR="$target/wasm-plugins" "$target/release/sendbox" plugin build "plugins/$p" \
    --out "var/plugins/${p//-/_}.wasm"
done

cat <<'MSG'

Try it (in another terminal):
  echo "region,orders" > var/quickstart/incoming/report.csv
  curl -s -X POST localhost:8025/hooks/alerts -H 'content-type: application/json' \
       -d @plugins/webhook-bridge/samples/alert.json
  ls var/quickstart/mail/
MSG
exec "$target/release/sendbox" --log info run --config examples/quickstart.toml
