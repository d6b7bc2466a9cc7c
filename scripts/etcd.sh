#!/usr/bin/env bash
# A throwaway single-member etcd for the tests and for `--store etcd://...` by hand.
#
#   scripts/etcd.sh up     installs etcd if missing, starts one member, waits until it is
#                          healthy, prints `export TRAINYARD_ETCD_ENDPOINTS=...` on stdout
#   scripts/etcd.sh down   stops it and removes its data
#   scripts/etcd.sh status says whether it runs
#
# What it does:
# - When `etcd` or `etcdctl` is missing, installs the Debian/Ubuntu packages `etcd-server`
#   and `etcd-client` with apt-get (with sudo when not root), and says so. It does not
#   enable the packaged systemd service for you; on Debian that service may start a
#   default member on 2379/2380, which this one does not collide with.
# - Starts one member on 127.0.0.1, client port 23790 and peer port 23800 (override with
#   TRAINYARD_ETCD_CLIENT_PORT / TRAINYARD_ETCD_PEER_PORT), data and log under
#   ${TMPDIR:-/tmp}/trainyard-etcd-<client port>/, in the background (pid file there).
# - `up` is idempotent: a member already healthy on that port is reused.
# - Logs go to stderr, so `eval "$(scripts/etcd.sh up)"` exports the variable.
set -euo pipefail

say() { echo "[etcd] $*" >&2; }

# shellcheck source=SCRIPTDIR/lib/service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service.sh"

CLIENT_PORT="${TRAINYARD_ETCD_CLIENT_PORT:-23790}"
PEER_PORT="${TRAINYARD_ETCD_PEER_PORT:-23800}"
ENDPOINT="http://127.0.0.1:${CLIENT_PORT}"
BASE="${TMPDIR:-/tmp}/trainyard-etcd-${CLIENT_PORT}"
PIDFILE="${BASE}/etcd.pid"
LOG="${BASE}/etcd.log"

install_etcd() {
  if command -v etcd >/dev/null 2>&1 && command -v etcdctl >/dev/null 2>&1; then
    return
  fi
  say "etcd or etcdctl not found: installing etcd-server and etcd-client with apt-get"
  apt_install "install etcd (>= 3.4, server and etcdctl) by hand" etcd-server etcd-client
}

healthy() {
  ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINT" --dial-timeout=1s --command-timeout=2s \
    endpoint health >/dev/null 2>&1
}

up() {
  install_etcd
  if healthy; then
    say "an etcd member is already healthy on $ENDPOINT; reusing it"
    echo "export TRAINYARD_ETCD_ENDPOINTS=$ENDPOINT"
    return
  fi
  if pid="$(service_running_pid "$PIDFILE")"; then
    say "etcd (pid $pid) from an earlier run is not healthy; stopping it"
    down
  fi
  rm -rf "${BASE}/data"
  mkdir -p "$BASE"
  say "starting etcd $(etcd --version 2>/dev/null | head -n1 | awk '{print $3}') on $ENDPOINT (peer port $PEER_PORT, data in $BASE/data, log $LOG)"
  nohup etcd \
    --name trainyard-test \
    --data-dir "${BASE}/data" \
    --listen-client-urls "$ENDPOINT" \
    --advertise-client-urls "$ENDPOINT" \
    --listen-peer-urls "http://127.0.0.1:${PEER_PORT}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${PEER_PORT}" \
    --initial-cluster "trainyard-test=http://127.0.0.1:${PEER_PORT}" \
    --initial-cluster-state new \
    --initial-cluster-token "trainyard-test-${CLIENT_PORT}" \
    --logger zap --log-outputs "$LOG" \
    >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  # Up to 20 s; on a timeout it is stopped (`down`) and this exits 1.
  service_wait_healthy etcd "$PIDFILE" "$LOG" 20 healthy down
  echo "export TRAINYARD_ETCD_ENDPOINTS=$ENDPOINT"
}

down() {
  service_stop etcd "$PIDFILE" 5 "$CLIENT_PORT"
  rm -rf "$BASE"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) service_status etcd "$PIDFILE" healthy "$ENDPOINT" ;;
  *)
    echo "usage: scripts/etcd.sh up|down|status" >&2
    exit 2
    ;;
esac
