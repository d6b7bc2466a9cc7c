#!/usr/bin/env bash
# promtool, for the metrics tests (`promtool check metrics` on every /metrics scrape).
#
#   scripts/promtool.sh install   installs promtool when it is not on PATH
#
# Debian/Ubuntu ship promtool only inside the `prometheus` package (the server, its web UI
# and JavaScript dependencies: ~19 MB download, ~96 MB installed, and a systemd service).
# This takes just the binary: `apt-get download prometheus` (no install, no service, no
# dependencies), then `promtool` is extracted from the .deb into PROMTOOL_DIR (default
# /usr/local/bin as root, else ~/.local/bin) and the .deb is deleted. Without apt-get, it
# says how to install promtool by hand and exits 1.
set -euo pipefail

say() { echo "[promtool] $*" >&2; }

install_promtool() {
  if command -v promtool >/dev/null 2>&1; then
    say "promtool is installed: $(promtool --version 2>&1 | head -n1)"
    return
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "apt-get not found: install promtool (https://prometheus.io/download/, in the prometheus tarball) on PATH by hand, then rerun"
    exit 1
  fi
  local dir="${PROMTOOL_DIR:-}"
  if [ -z "$dir" ]; then
    if [ "$(id -u)" -eq 0 ]; then dir=/usr/local/bin; else dir="$HOME/.local/bin"; fi
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  local tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  say "promtool not found: extracting it from the Debian package prometheus into $dir"
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    $sudo apt-get update -q >&2
    (cd "$tmp" && apt-get download prometheus >&2)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  mkdir -p "$dir"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$dir/promtool"
  say "installed $("$dir/promtool" --version 2>&1 | head -n1) as $dir/promtool"
  case ":$PATH:" in
    *":$dir:"*) ;;
    *) say "note: $dir is not on PATH; add it (the metrics tests look for promtool there)" ;;
  esac
}

case "${1:-}" in
  install) install_promtool ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
