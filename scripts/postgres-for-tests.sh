# Sourced by scripts/test.sh: makes sure DATABASE_URL names a PostgreSQL
# server the tests may create databases on.
#
# - DATABASE_URL already set: used as it is.
# - A server answering at localhost:5432 as `postgres` (trust auth, as
#   Debian's package sets up for local connections): used.
# - Neither (or SENDBOX_TEST_THROWAWAY_PG=1): a throwaway cluster is
#   created in a temporary folder, on a free port, for this run only; it is
#   stopped and removed when the script exits.
#
# Debian's `postgresql` is installed first if missing.

pg_answers() { psql "$1" -Atqc 'SELECT 1' >/dev/null 2>&1; }

# Debian's binaries are needed even beside a running server: some tests
# start servers of their own (one that restarts, one with TLS).
if ! command -v psql >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "missing: Debian's postgresql (psql, initdb) — install it, then run this again" >&2
    exit 1
  fi
fi

if [ -n "${DATABASE_URL:-}" ]; then
  pg_answers "$DATABASE_URL" || { echo "DATABASE_URL is set but no server answers there" >&2; exit 1; }
elif [ "${SENDBOX_TEST_THROWAWAY_PG:-0}" != 1 ] && pg_answers postgres://postgres@localhost:5432/postgres; then
  export DATABASE_URL=postgres://postgres@localhost:5432/postgres
else
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  pg_dir=$(mktemp -d /tmp/sendbox-test-pg.XXXXXX)
  pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # PostgreSQL refuses to run as root: the cluster belongs to `postgres`
  # (created by the Debian package) when this runs as root.
  pg_as=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$pg_dir" postgres
    chown postgres "$pg_dir"
    pg_as=(runuser -u postgres --)
  fi
  "${pg_as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
    -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1" start >/dev/null
  stop_throwaway_pg() {
    "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  }
  trap stop_throwaway_pg EXIT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
  echo "started a throwaway PostgreSQL for this run at $DATABASE_URL"
fi
