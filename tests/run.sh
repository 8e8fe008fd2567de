#!/usr/bin/env bash
# Runs every test of the project on a fresh machine.
#
# Needs: the Rust toolchain, Node.js 20 with npm. Chromium is installed from Debian if missing
# (the demo page's browser test). PostgreSQL is used at 127.0.0.1:5432 when it
# answers; otherwise a private cluster is created in a temporary directory on a free port (the
# Debian packages are installed first if missing; SYNCHRONY_TEST_PRIVATE_PG=1 forces this path).
# Redis likewise: 127.0.0.1:6379 when it answers, else a private redis-server on a free port
# (SYNCHRONY_TEST_PRIVATE_REDIS=1 forces it). Everything started here is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="$(mktemp -d)"
# Every test that cannot run here records why (synchrony_tests::skip); the list is printed last.
export SYNCHRONY_TEST_SKIPS="$work/skipped"
: > "$SYNCHRONY_TEST_SKIPS"
report_skips() {
  if [ -s "$SYNCHRONY_TEST_SKIPS" ]; then
    printf '==> SKIPPED (%s), each saying why:\n' "$(wc -l < "$SYNCHRONY_TEST_SKIPS")" >&2
    sed 's/^/    /' "$SYNCHRONY_TEST_SKIPS" >&2
  else
    printf '==> skipped: nothing\n' >&2
  fi
}
cleanup() {
  report_skips
  if [ -n "${PRIVATE_PGDATA:-}" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PRIVATE_PGDATA" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "${PRIVATE_REDIS_PID:-}" ]; then
    kill "$PRIVATE_REDIS_PID" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

log() { printf '==> %s\n' "$*" >&2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ensure_apt() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

start_private_postgres() {
  command -v pg_ctlcluster >/dev/null 2>&1 || ensure_apt postgresql
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
  PRIVATE_PGDATA="$work/pgdata"
  mkdir -p "$PRIVATE_PGDATA" && chown postgres "$work" "$PRIVATE_PGDATA"
  local port; port="$(free_port)"
  runuser -u postgres -- "$PG_BIN/initdb" -D "$PRIVATE_PGDATA" -A trust -U postgres >/dev/null
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PRIVATE_PGDATA" -w -l "$work/pg.log" \
    -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c fsync=on" start >/dev/null
  export SYNCHRONY_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  log "private PostgreSQL on port $port"
}

if [ "${SYNCHRONY_TEST_PRIVATE_PG:-}" = 1 ]; then
  start_private_postgres  # forces the path a machine without PostgreSQL takes
elif [ -z "${SYNCHRONY_TEST_POSTGRES_URL:-}" ]; then
  if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 -U postgres; then
    export SYNCHRONY_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/postgres"
  else
    start_private_postgres
  fi
fi

start_private_redis() {
  command -v redis-server >/dev/null 2>&1 || ensure_apt redis-server
  local port; port="$(free_port)"
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$work" \
    >"$work/redis.log" 2>&1 &
  PRIVATE_REDIS_PID=$!
  for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  export SYNCHRONY_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
  log "private Redis on port $port"
}

if [ "${SYNCHRONY_TEST_PRIVATE_REDIS:-}" = 1 ]; then
  start_private_redis
elif [ -z "${SYNCHRONY_TEST_REDIS_URL:-}" ]; then
  if command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    export SYNCHRONY_TEST_REDIS_URL="redis://127.0.0.1:6379/0"
  else
    start_private_redis
  fi
fi

# The storage-outage tests stop and start a PostgreSQL cluster of their own.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ensure_apt postgresql

log "installing the JavaScript test clients and the load harness's peer servers (npm ci)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
(cd loadtest/peers && npm ci --no-audit --no-fund --loglevel=error)

log "installing the Python test tools (jwcrypto mints encrypted tokens) in target/py"
if ! target/py/bin/python -c 'import jwcrypto, prometheus_client' >/dev/null 2>&1; then
  python3 -m venv target/py 2>/dev/null || { ensure_apt python3-venv && python3 -m venv target/py; }
  target/py/bin/pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt
fi
export SYNCHRONY_TEST_PYTHON="$PWD/target/py/bin/python"

log "building"
cargo build --workspace --bins --locked

# The demo page's browser test drives Debian's Chromium.
command -v chromium >/dev/null 2>&1 || ensure_apt chromium
# The cluster tests put Debian's nginx in front of the nodes (its service is not started:
# the tests run their own instance on a free port).
command -v nginx >/dev/null 2>&1 || ensure_apt nginx-light
# The multicast and partition tests build network namespaces with iproute2's `ip`.
command -v ip >/dev/null 2>&1 || ensure_apt iproute2

log "building and testing the TypeScript client (client-js) and the demo page against the engine"
(cd client-js && npm ci --no-audit --no-fund --loglevel=error && npm run build && npm run check:demo && npm test)

log "running the Rust tests"
cargo test --workspace --locked --no-fail-fast
