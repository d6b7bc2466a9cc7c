#!/usr/bin/env bash
# Installs the system packages Trainyard's build needs, when they are missing, and says so.
#
# - protoc with the protobuf well-known types (Debian/Ubuntu: protobuf-compiler, libprotobuf-dev):
#   the proto crate's build script compiles proto/trainyard/v1/*.proto with it.
#
# Safe to run again: it does nothing when everything is present.
set -euo pipefail

say() { echo "[setup] $*" >&2; }

# shellcheck source=SCRIPTDIR/lib/service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service.sh"

need_apt=()
if ! command -v protoc >/dev/null 2>&1; then
  need_apt+=(protobuf-compiler)
fi
if [ ! -f /usr/include/google/protobuf/descriptor.proto ]; then
  need_apt+=(libprotobuf-dev)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing ${need_apt[*]} (protoc and the protobuf well-known types, needed to build the gRPC API)"
  apt_install "install protoc (>= 3.15) and the protobuf include files by hand" \
    protobuf-compiler libprotobuf-dev
else
  say "protoc and the protobuf well-known types are installed"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  say "cargo-nextest not found: tests will run with plain 'cargo test' (install it with 'cargo install cargo-nextest --locked' for faster runs)"
fi
