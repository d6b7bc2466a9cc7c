# shellcheck shell=bash
# Shared plumbing for the scripts that run a throwaway background service (scripts/etcd.sh,
# scripts/s3.sh) and install system packages (scripts/setup.sh). Sourced, not run:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/service.sh"
#
# The sourcing script defines `say` (prints one line to stderr with its own prefix, such as
# "[etcd]"); every message here goes through it. Nothing here changes shell options: the
# scripts run with `set -euo pipefail`.

# Installs Debian/Ubuntu packages with apt-get (through sudo when not root). Without apt-get,
# says "apt-get not found: <hint>, then rerun" and exits 1.
#   apt_install HINT PACKAGE...
apt_install() {
  local hint="$1"
  shift
  if ! command -v apt-get >/dev/null 2>&1; then
    say "apt-get not found: $hint, then rerun"
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@"
}

# Prints the pid recorded in PIDFILE and succeeds when that process is alive; fails (prints
# nothing) when there is no pid file or its process is gone.
#   service_running_pid PIDFILE
service_running_pid() {
  local pidfile="$1"
  if [ -f "$pidfile" ]; then
    local pid
    pid="$(cat "$pidfile")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      echo "$pid"
      return 0
    fi
  fi
  return 1
}

# Waits, polling every 0.2 s, for a service just started in the background (its pid in
# PIDFILE) to pass the health check HEALTH (a command or function name, run without
# arguments). Returns 0 once it does, after saying "NAME is healthy (pid N)". When the process
# exits first, says so with the last 20 lines of LOG and exits 1. When TIMEOUT_S seconds pass,
# says so with the last 20 lines of LOG, runs ON_TIMEOUT (a command or function name, such as
# the script's `down`) and exits 1.
#   service_wait_healthy NAME PIDFILE LOG TIMEOUT_S HEALTH ON_TIMEOUT
service_wait_healthy() {
  local name="$1" pidfile="$2" log="$3" timeout_s="$4" health="$5" on_timeout="$6"
  for _ in $(seq 1 $((timeout_s * 5))); do
    if "$health"; then
      say "$name is healthy (pid $(cat "$pidfile"))"
      return 0
    fi
    if ! service_running_pid "$pidfile" >/dev/null; then
      say "$name exited during start; last lines of $log:"
      tail -n 20 "$log" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
  say "$name did not become healthy within $timeout_s s; last lines of $log:"
  tail -n 20 "$log" >&2 || true
  "$on_timeout"
  exit 1
}

# Stops the service whose pid is in PIDFILE: SIGTERM, up to TIMEOUT_S seconds (polling every
# 0.1 s) for it to exit, then SIGKILL; removes PIDFILE afterwards. When it is not running,
# says "no NAME started by this script is running on port PORT" and leaves PIDFILE alone.
#   service_stop NAME PIDFILE TIMEOUT_S PORT
service_stop() {
  local name="$1" pidfile="$2" timeout_s="$3" port="$4"
  local pid
  if pid="$(service_running_pid "$pidfile")"; then
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((timeout_s * 10))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) did not stop in $timeout_s s; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  else
    say "no $name started by this script is running on port $port"
  fi
}

# The `status` verb: says "NAME (pid N) is healthy on ENDPOINT[ DETAIL]" when the process in
# PIDFILE runs and passes the health check HEALTH (a command or function name); otherwise
# says "not running on ENDPOINT" and exits 1.
#   service_status NAME PIDFILE HEALTH ENDPOINT [DETAIL]
service_status() {
  local name="$1" pidfile="$2" health="$3" endpoint="$4" detail="${5:-}"
  local pid
  if pid="$(service_running_pid "$pidfile")" && "$health"; then
    say "$name (pid $pid) is healthy on $endpoint${detail:+ $detail}"
  else
    say "not running on $endpoint"
    exit 1
  fi
}
