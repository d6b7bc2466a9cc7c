#!/usr/bin/env bash
# Trains the Neural ODE paper's MNIST experiment on a one-machine Trainyard cluster:
# installs what the build needs, builds `trainyard`, and runs `trainyard run neural-ode`.
# Extra arguments go to `trainyard run`, e.g. `--preset paper` or `--set epochs=2`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "[run] building the trainyard binary" >&2
cargo build --bin trainyard
exec target/debug/trainyard run neural-ode "$@"
