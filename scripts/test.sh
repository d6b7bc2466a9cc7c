#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the store conformance suite, and the end-to-end
# tests that start real coordinator and worker processes on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "[test] building the trainyard binary (the end-to-end tests run it as real processes)" >&2
cargo build --bin trainyard

if cargo nextest --version >/dev/null 2>&1; then
  echo "[test] cargo nextest run --workspace" >&2
  cargo nextest run --workspace --no-fail-fast "$@"
else
  echo "[test] cargo test --workspace" >&2
  cargo test --workspace --no-fail-fast "$@"
fi
