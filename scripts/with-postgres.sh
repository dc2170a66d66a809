#!/usr/bin/env bash
# Runs a command beside a throwaway PostgreSQL server on loopback (the search tests use it):
#   bash scripts/with-postgres.sh .venv/bin/python -m pytest -q
# initdb's a cluster into a temporary directory, starts it on a free port of 127.0.0.1, exports
# CNNLAB_TEST_POSTGRES=postgresql://cnnlab:PASSWORD@127.0.0.1:PORT/postgres, runs the command, then
# stops the server and deletes the cluster; exits with the command's status. PostgreSQL refuses to
# run as root, so under root the server runs as the postgres user (Debian's package creates it).
# When no server can start, the command runs without the variable (the tests that need it fail in CI).
set -uo pipefail
bindir=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  if [ -x "$d/initdb" ]; then bindir="$d"; break; fi
done
if [ -z "$bindir" ] && command -v initdb >/dev/null 2>&1; then bindir="$(dirname "$(command -v initdb)")"; fi

as_server() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  [ -n "$bindir" ] || { echo "note: PostgreSQL is not installed (Debian: apt-get install postgresql)"; return 1; }
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "note: running as root and there is no postgres user to run the server as"; return 1
  fi
  dir="$(mktemp -d "${TMPDIR:-/tmp}/cnnlab-postgres.XXXXXX")" || return 1
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  password="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
  printf '%s\n' "$password" > "$dir/pw"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$dir"
  as_server "$bindir/initdb" -D "$dir/data" -U cnnlab --pwfile="$dir/pw" --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 > "$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log"; return 1; }
  as_server "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir" start > /dev/null \
    || { cat "$dir/server.log"; return 1; }
  export CNNLAB_TEST_POSTGRES="postgresql://cnnlab:$password@127.0.0.1:$port/postgres"
  echo "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') for the tests on 127.0.0.1:$port"
}

stop() {
  if [ -n "${dir:-}" ] && [ -d "$dir/data" ]; then
    as_server "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop > /dev/null 2>&1
  fi
  [ -n "${dir:-}" ] && rm -rf "$dir"
}

dir=""
trap stop EXIT
start || echo "note: no PostgreSQL server for the tests; those that need one fail in CI"
"$@"
