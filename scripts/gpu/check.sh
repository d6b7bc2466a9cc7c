#!/usr/bin/env bash
# The GPU check of a `cuda` build: runs ON the GPU machine, from the repository root, with the
# binary scripts/gpu/build.sh made (gpu-dist/trainyard.gz, git-ignored: the device call must
# carry it). Builds nothing. In one go, each step under a timeout (about 6 minutes at most):
#
#   1. unpack the binary outside the tree, `ldd -r` against the PyTorch venv's CUDA 13 and
#      NCCL libraries (scripts/gpu/run_on_gpu.sh);
#   2. `trainyard gpu-check`: GPUs seen, neural-ode step time CUDA vs CPU, 1-rank NCCL;
#   3. `trainyard run neural-ode --preset quick` on a local cluster whose worker offers the
#      real GPU (`--devices gpu:0 --device-kind gpu`): results table, wall time, GPU
#      utilisation sampled by nvidia-smi meanwhile.
#
# Everything goes to stdout and into $OUT (check.log, summary.txt, gpu-check.txt,
# run-neural-ode.txt, nvidia-smi*.txt/csv, ldd.txt). Exit 0 when every step passed.
# Knobs: TRAINYARD_GZ, GPU_CHECK_TIMEOUT (s, default 150), RUN_TIMEOUT (s, default 210),
# GPU_CHECK_ARGS (extra `gpu-check` flags), RUN_ARGS (extra `run` flags).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1

GZ=${TRAINYARD_GZ:-gpu-dist/trainyard.gz}
# NCCL says why, if it fails (on stderr, kept in gpu-check.stderr.txt)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-150}
RUN_TIMEOUT=${RUN_TIMEOUT:-210}
T0=$(date +%s)
SUMMARY=()
FAILED=0

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
record() { # step result seconds note
  SUMMARY+=("$(printf '%-16s %-5s %8ss  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = PASS ] || FAILED=1
}
finish() {
  {
    echo
    echo "== summary ($(( $(date +%s) - T0 ))s in all; $(hostname); $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    printf '%-16s %-5s %9s  %s\n' step result time note
    printf '%s\n' "${SUMMARY[@]}"
    if [ "$FAILED" = 0 ]; then echo "check.sh: PASS"; else echo "check.sh: FAIL"; fi
  } | tee "$OUT/summary.txt"
  exit "$FAILED"
}

echo "== machine"
date -u
uname -a
echo "cores: $(nproc)"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"

echo
echo "== 1. binary and libraries"
. scripts/gpu/run_on_gpu.sh
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if [ ! -f "$GZ" ]; then
  echo "no $GZ: build it with scripts/gpu/build.sh and carry gpu-dist"
  record ldd FAIL 0 "no $GZ"
  finish
fi
t=$(now)
if ! BIN=$(trainyard_unpack "$GZ"); then
  record ldd FAIL "$(secs "$t" "$(now)")" "cannot unpack $GZ"
  finish
fi
ls -l "$BIN"
ldd -r "$BIN" > "$OUT/ldd.txt" 2>&1
cat "$OUT/ldd.txt"
if ! trainyard_ldd_check "$BIN"; then
  record ldd FAIL "$(secs "$t" "$(now)")" "missing libraries (ldd.txt)"
  finish
fi
"$BIN" --version
record ldd PASS "$(secs "$t" "$(now)")" "all libraries found"

echo
echo "== 2. trainyard gpu-check (timeout ${GPU_CHECK_TIMEOUT}s)"
t=$(now)
# shellcheck disable=SC2086
timeout -k 10 "$GPU_CHECK_TIMEOUT" "$BIN" gpu-check ${GPU_CHECK_ARGS:-} \
  > "$OUT/gpu-check.txt" 2> "$OUT/gpu-check.stderr.txt"
rc=$?
cat "$OUT/gpu-check.txt"
tail -n 20 "$OUT/gpu-check.stderr.txt"
case $rc in
  0) record gpu-check PASS "$(secs "$t" "$(now)")" "all rows PASS" ;;
  124|137) record gpu-check FAIL "$(secs "$t" "$(now)")" "timed out after ${GPU_CHECK_TIMEOUT}s" ;;
  *) record gpu-check FAIL "$(secs "$t" "$(now)")" "exit $rc ($(grep -c '^FAIL' "$OUT/gpu-check.txt") failed rows)" ;;
esac

echo
echo "== 3. trainyard run neural-ode --preset quick on the GPU (timeout ${RUN_TIMEOUT}s)"
DATA=${RUN_DATA_DIR:-/tmp/trainyard-gpu-run}
rm -rf "$DATA"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 \
  > "$OUT/nvidia-smi-during-run.csv" 2>/dev/null &
SMI=$!
t=$(now)
# shellcheck disable=SC2086
timeout -k 15 "$RUN_TIMEOUT" "$BIN" run neural-ode --preset quick --devices gpu:0 \
  --device-kind gpu --data-dir "$DATA" ${RUN_ARGS:-} > "$OUT/run-neural-ode.txt" 2>&1
rc=$?
wall=$(secs "$t" "$(now)")
kill "$SMI" 2>/dev/null
wait "$SMI" 2>/dev/null
# the live progress lines are long; keep the log lines, the table and the verdict
grep -v '^\s*$' "$OUT/run-neural-ode.txt" | tail -n 40
echo "wall time: ${wall}s"
util=$(awk -F', ' 'NR > 1 { gsub(/ %/, "", $2); if ($2 + 0 > max) max = $2 + 0 } END { print max + 0 }' \
  "$OUT/nvidia-smi-during-run.csv" 2>/dev/null)
echo "peak GPU utilisation while running: ${util:-?}%"
mem=$(awk -F', ' 'NR > 1 { gsub(/ MiB/, "", $3); if ($3 + 0 > max) max = $3 + 0 } END { print max + 0 }' \
  "$OUT/nvidia-smi-during-run.csv" 2>/dev/null)
echo "peak GPU memory used while running: ${mem:-?} MiB"
on_gpu=no
grep -q "on cuda:0" "$OUT/run-neural-ode.txt" && on_gpu=yes
case $rc in
  0) if [ $on_gpu = yes ]; then
       record "run neural-ode" PASS "$wall" "job succeeded, trained on cuda:0, peak util ${util:-?}%, peak mem ${mem:-?} MiB"
     else
       record "run neural-ode" FAIL "$wall" "job succeeded but no 'on cuda:0' in its log: trained on the CPU?"
     fi ;;
  124|137) record "run neural-ode" FAIL "$wall" "timed out after ${RUN_TIMEOUT}s (on GPU: $on_gpu)" ;;
  *) record "run neural-ode" FAIL "$wall" "exit $rc (on GPU: $on_gpu)" ;;
esac
finish
