#!/usr/bin/env bash
# A throwaway single-node S3 server (Garage) for the tests and for `--objects s3://...` by hand.
#
#   scripts/s3.sh up       builds Garage if missing, starts one node with a bucket and a key,
#                          waits until it answers, prints `export ...` lines on stdout
#   scripts/s3.sh down     stops it and removes its data
#   scripts/s3.sh stop     stops it but keeps its data (an outage, for tests)
#   scripts/s3.sh start    starts a stopped one again on the same data, waits until it
#                          answers, prints the same `export ...` lines
#   scripts/s3.sh status   says whether it runs
#   scripts/s3.sh install  only builds/installs Garage (CI runs this before the project's build)
#
# What it does:
# - When `garage --version` does not show 2.5.0 (looked up as $GARAGE_BIN, else on PATH, else
#   ~/.cargo/bin/garage), builds it from crates.io into ~/.cargo/bin (kept between runs):
#     CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install garage --version 2.5.0 --locked \
#       --no-default-features --features sqlite,bundled-libs
#   which takes 5-10 minutes on 2 cores (the S3 API is the same as a default build).
# - Starts `garage server --single-node --default-bucket` on 127.0.0.1: S3 API on port 39000,
#   RPC 39001, admin 39003 (override with TRAINYARD_S3_PORT / _RPC_PORT / _ADMIN_PORT), so
#   it does not collide with a default Garage on 3900-3903. Region `garage`, path-style
#   requests. Metadata, data, config and log under ${TMPDIR:-/tmp}/trainyard-s3-<port>/.
# - The bucket (`trainyard`, or TRAINYARD_S3_BUCKET) and a fixed test key pair exist from
#   the start (GARAGE_DEFAULT_* variables). The key is for this throwaway server only.
# - `up` is idempotent: a server already healthy on that port is reused.
# - Logs go to stderr, so `eval "$(scripts/s3.sh up)"` exports the variables:
#     TRAINYARD_S3_ENDPOINT, TRAINYARD_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
#     AWS_REGION, AWS_DEFAULT_REGION
#   after which `--objects s3://$TRAINYARD_S3_BUCKET/some/prefix` works, and the S3 tests
#   run instead of skipping.
set -euo pipefail

say() { echo "[s3] $*" >&2; }

# shellcheck source=SCRIPTDIR/lib/service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service.sh"

GARAGE_VERSION=2.5.0
PORT="${TRAINYARD_S3_PORT:-39000}"
RPC_PORT="${TRAINYARD_S3_RPC_PORT:-39001}"
ADMIN_PORT="${TRAINYARD_S3_ADMIN_PORT:-39003}"
BUCKET="${TRAINYARD_S3_BUCKET:-trainyard}"
ENDPOINT="http://127.0.0.1:${PORT}"
BASE="${TMPDIR:-/tmp}/trainyard-s3-${PORT}"
PIDFILE="${BASE}/garage.pid"
LOG="${BASE}/garage.log"
# A fixed key for this throwaway, loopback-only server (Garage key ids are GK + 24 hex digits).
ACCESS_KEY_ID="GK7472616e6e7961726474657374"
SECRET_ACCESS_KEY="7472616e7961726420746573742073656372657420666f72206761726167650a"

# The garage binary: $GARAGE_BIN, else the one on PATH, else ~/.cargo/bin/garage.
garage_bin() {
  if [ -n "${GARAGE_BIN:-}" ]; then
    echo "$GARAGE_BIN"
  elif command -v garage >/dev/null 2>&1; then
    command -v garage
  else
    echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage"
  fi
}

has_garage() {
  local bin
  bin="$(garage_bin)"
  [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$GARAGE_VERSION"
}

install_garage() {
  if has_garage; then
    return
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    say "garage $GARAGE_VERSION not found and cargo is missing: install the Rust toolchain, then rerun"
    exit 1
  fi
  local root="${CARGO_HOME:-$HOME/.cargo}"
  say "garage $GARAGE_VERSION not found: building it with cargo install into $root/bin (5-10 min on 2 cores, once)"
  local t0
  t0=$(date +%s)
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install garage --version "$GARAGE_VERSION" --locked \
    --no-default-features --features sqlite,bundled-libs --root "$root" >&2
  say "garage built in $(( $(date +%s) - t0 )) s"
  GARAGE_BIN="$root/bin/garage"
  export GARAGE_BIN
}

healthy() {
  # The admin API's /health answers 200 once the node serves requests (bash's /dev/tcp:
  # no curl needed).
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/${ADMIN_PORT} \
    && printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && head -n1 <&3" \
    2>/dev/null | grep -q ' 200 '
}

print_env() {
  cat <<ENV
export TRAINYARD_S3_ENDPOINT=$ENDPOINT
export TRAINYARD_S3_BUCKET=$BUCKET
export AWS_ACCESS_KEY_ID=$ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$SECRET_ACCESS_KEY
export AWS_REGION=garage
export AWS_DEFAULT_REGION=garage
ENV
}

up() {
  install_garage
  if healthy; then
    say "a Garage server is already healthy on $ENDPOINT; reusing it"
    print_env
    return
  fi
  if pid="$(service_running_pid "$PIDFILE")"; then
    say "garage (pid $pid) from an earlier run is not healthy; stopping it"
    down
  fi
  rm -rf "$BASE"
  mkdir -p "$BASE/meta" "$BASE/data"
  chmod 700 "$BASE"
  cat >"$BASE/garage.toml" <<TOML
metadata_dir = "$BASE/meta"
data_dir = "$BASE/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:${RPC_PORT}"
rpc_public_addr = "127.0.0.1:${RPC_PORT}"
rpc_secret = "$(printf '%064x' "$PORT")"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:${PORT}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:${ADMIN_PORT}"
TOML
  launch
}

# Starts garage on the config in $BASE and waits until it is healthy (prints the env).
launch() {
  local bin
  bin="$(garage_bin)"
  say "starting garage $GARAGE_VERSION on $ENDPOINT (rpc $RPC_PORT, admin $ADMIN_PORT, bucket $BUCKET, data in $BASE, log $LOG)"
  GARAGE_DEFAULT_ACCESS_KEY="$ACCESS_KEY_ID" \
    GARAGE_DEFAULT_SECRET_KEY="$SECRET_ACCESS_KEY" \
    GARAGE_DEFAULT_BUCKET="$BUCKET" \
    RUST_LOG="${RUST_LOG:-garage=warn}" \
    nohup "$bin" -c "$BASE/garage.toml" server --single-node --default-bucket \
    >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  # Up to 30 s; on a timeout it is stopped and its data removed (`down`), and this exits 1.
  service_wait_healthy garage "$PIDFILE" "$LOG" 30 healthy down
  print_env
}

# Stops the garage this script started on $PORT (its data stays): SIGKILL after 10 s.
stop_server() {
  service_stop garage "$PIDFILE" 10 "$PORT"
}

down() {
  stop_server
  rm -rf "$BASE"
}

# Starts a server stopped with `stop` again, on its data.
start() {
  if healthy; then
    say "garage is already healthy on $ENDPOINT"
    print_env
    return
  fi
  if [ ! -f "$BASE/garage.toml" ]; then
    say "no stopped server on port $PORT (no $BASE/garage.toml): use \`up\`"
    exit 1
  fi
  if service_running_pid "$PIDFILE" >/dev/null; then
    stop_server
  fi
  launch
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  stop) stop_server ;;
  start) start ;;
  install) install_garage ;;
  status) service_status garage "$PIDFILE" healthy "$ENDPOINT" "(bucket $BUCKET)" ;;
  *)
    echo "usage: scripts/s3.sh up|down|stop|start|status|install" >&2
    exit 2
    ;;
esac
