#!/usr/bin/env bash
# On the GPU machine (no Rust, no registries): point the dynamic loader at the CUDA 13 and NCCL
# libraries of the PyTorch venv there, check that nothing the binary needs is missing, then run
# it. Adapted from shared/gpu/run_on_gpu.sh: the gzipped binary is unpacked outside the
# repository (into $TRAINYARD_BIN_DIR), and `source`-ing this file with no arguments only sets
# up the environment (LD_LIBRARY_PATH, trainyard_unpack, trainyard_ldd_check).
#
# Usage: scripts/gpu/run_on_gpu.sh gpu-dist/trainyard.gz ARGS...
#        . scripts/gpu/run_on_gpu.sh   # then: BIN=$(trainyard_unpack gpu-dist/trainyard.gz)
SP=${TORCH_SP:-/opt/torch/.venv/lib/python3.12/site-packages}
if [ ! -d "$SP/nvidia" ]; then
  # another Python version in the venv: take whichever site-packages has nvidia/
  for d in /opt/torch/.venv/lib/python3*/site-packages; do [ -d "$d/nvidia" ] && SP=$d; done
fi
case ":${LD_LIBRARY_PATH:-}:" in
  *":$SP/nvidia/cu13/lib:"*) ;;
  *) export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
TRAINYARD_BIN_DIR=${TRAINYARD_BIN_DIR:-/tmp/trainyard-gpu-bin}

# Prints the path of the runnable binary for BIN (unpacking BIN.gz into $TRAINYARD_BIN_DIR).
trainyard_unpack() {
  local bin=$1
  case "$bin" in
    *.gz)
      mkdir -p "$TRAINYARD_BIN_DIR"
      local dst=$TRAINYARD_BIN_DIR/$(basename "${bin%.gz}")
      gzip -dc "$bin" > "$dst.tmp" && chmod +x "$dst.tmp" && mv "$dst.tmp" "$dst" || return 1
      echo "$dst" ;;
    *) echo "$bin" ;;
  esac
}

# Fails (listing them) when a library or symbol the binary needs is missing.
trainyard_ldd_check() {
  if ldd -r "$1" 2>&1 | grep -E "not found|undefined symbol"; then
    echo "run_on_gpu.sh: missing libraries or symbols (above); LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
    return 2
  fi
}

# Sourced: stop here.
(return 0 2>/dev/null) && return 0

set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 path/to/trainyard[.gz] ARGS..." >&2; exit 2; }
BIN=$(trainyard_unpack "$1"); shift
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
trainyard_ldd_check "$BIN"
exec "$BIN" "$@"
