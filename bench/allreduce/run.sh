#!/usr/bin/env bash
# All-reduce bus bandwidth: PyTorch's Gloo backend (torch.distributed, CPU) and Trainyard's
# ring (shared memory on one host, and TCP alone), same sizes, rank counts and iterations,
# in one run; prints the combined table with each figure's ratio to Gloo and to memcpy.
#
#   bench/allreduce/run.sh            # sizes 1,16,64 MiB; 2 and 4 ranks
#
# Settings (environment): ALLREDUCE_SIZES_MIB (1,16,64), ALLREDUCE_RANKS (2,4),
# ALLREDUCE_WARMUP (3), ALLREDUCE_ITERS (1:40,16:15,64:8), ROUNDS (2: Gloo then ours, each
# round its own table), BENCH_VENV (target/bench-venv).
#
# PyTorch comes from PyPI into a virtual environment under target/ (ignored by git), made
# once and reused, by bench/torch-venv.sh (shared with bench/steps/run.sh): first the
# CPU-only wheel index; where that host is unreachable, PyPI's torch without its
# dependencies plus its pure-Python ones, if that imports; else PyPI's torch with all its
# dependencies (the CUDA libraries, several GB, used only to load torch).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${BENCH_VENV:-target/bench-venv}
OUT=$PWD/target/bench-allreduce
export ALLREDUCE_SIZES_MIB=${ALLREDUCE_SIZES_MIB:-1,16,64}
export ALLREDUCE_RANKS=${ALLREDUCE_RANKS:-2,4}
export ALLREDUCE_WARMUP=${ALLREDUCE_WARMUP:-3}
export ALLREDUCE_ITERS=${ALLREDUCE_ITERS:-1:40,16:15,64:8}
mkdir -p "$OUT"

# shellcheck source=../torch-venv.sh
TORCH_CHECK="import torch, torch.distributed as dist
assert dist.is_gloo_available()
torch.ones(4).add_(1)"
source bench/torch-venv.sh

ensure_torch

echo "machine: $(nproc) cores, $(awk '{print $1" "$2" "$3}' /proc/loadavg) load average before the run, $(date -u +%Y-%m-%dT%H:%MZ)"
say "building the Rust benchmark"
nice cargo bench -p trainyard-collective --bench allreduce --no-run >/dev/null 2>&1 ||
    nice cargo bench -p trainyard-collective --bench allreduce --no-run

# Gloo then ours, ROUNDS times: on a shared machine the load changes from minute to
# minute, so every table compares figures measured within about a minute of each other.
ROUNDS=${ROUNDS:-2}
for round in $(seq "$ROUNDS"); do
    say "round $round of $ROUNDS: PyTorch Gloo"
    "$VENV/bin/python" bench/allreduce/gloo.py "$OUT/gloo-$round.json" \
        --sizes-mib "$ALLREDUCE_SIZES_MIB" --ranks "$ALLREDUCE_RANKS" \
        --warmup "$ALLREDUCE_WARMUP" --iters "$ALLREDUCE_ITERS" 2>&1 |
        grep -v -e "Failed to initialize NumPy" -e "_conversion_method_template" >&2
    say "round $round of $ROUNDS: Trainyard ring"
    echo
    echo "Round $round ($(date -u +%H:%M:%SZ), load average $(awk '{print $1}' /proc/loadavg)):"
    GLOO_RESULTS="$OUT/gloo-$round.json" cargo bench -q -p trainyard-collective --bench allreduce |
        tee "$OUT/table-$round.md"
done
echo "load average after the run: $(awk '{print $1" "$2" "$3}' /proc/loadavg)"
