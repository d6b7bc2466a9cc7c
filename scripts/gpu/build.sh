#!/usr/bin/env bash
# Builds the `cuda` binary of trainyard on a machine WITHOUT a GPU, for scripts/gpu/check.sh
# to run on the GPU machine (which has no Rust toolchain): see docs/gpu.md.
#
#   scripts/gpu/build.sh        # -> gpu-dist/trainyard.gz (git-ignored; carry it)
#
# Steps: the CUDA 13.0 toolchain from PyPI plus a link-only CUDA_HOME (once, under $ROOT, with
# the shared recipe shared/gpu/setup_toolchain.sh), `cargo build --release --features cuda`
# into a separate target folder (the normal target/ is left alone), strip, `ldd -r` check,
# gzip -9. About 25 minutes from clean on 2 cores (13 of them candle's CUDA kernels, which
# stay cached in $CARGO_TARGET_DIR).
#
# Environment: ROOT (toolchain folder, default /tmp/cuda), CARGO_TARGET_DIR (default
# /work/cuda-target), SHARED_GPU (the shared recipe, default ../shared/gpu from the
# repository root), REAL_LIBS=1 (check the binary against the real CUDA/NCCL libraries of
# PyTorch 2.11, installed once from PyPI) or LDD_LIBS (folders, ':'-separated, that hold them).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
ROOT=${ROOT:-/tmp/cuda}
SHARED_GPU=${SHARED_GPU:-$REPO/../shared/gpu}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/cuda-target}
DIST=$REPO/gpu-dist

say() { echo "build.sh: $*" >&2; }

cargo fetch --locked >/dev/null 2>&1 || cargo fetch
if [ ! -x "$ROOT/cudaroot/bin/nvcc" ]; then
  [ -x "$SHARED_GPU/setup_toolchain.sh" ] || { say "no toolchain under $ROOT and no $SHARED_GPU/setup_toolchain.sh"; exit 2; }
  CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)
  say "setting up the CUDA 13.0 toolchain under $ROOT (once)"
  ROOT="$ROOT" CUDARC_SRC="$CUDARC_SRC" "$SHARED_GPU/setup_toolchain.sh"
fi
export CUDA_HOME=$ROOT/cudaroot PATH=$ROOT/cudaroot/bin:$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000

say "cargo build --release -p trainyard-cli --features cuda (target dir $CARGO_TARGET_DIR)"
start=$(date +%s)
cargo build --release -p trainyard-cli --features cuda
say "built in $(( $(date +%s) - start ))s"

BIN=$CARGO_TARGET_DIR/release/trainyard
mkdir -p "$DIST"
strip -o "$DIST/trainyard" "$BIN"

# Every library the binary needs must be one the GPU machine has (run_on_gpu.sh points the
# loader at the PyTorch venv's nvidia/cu13/lib and nvidia/nccl/lib; libcuda.so.1 is the driver's).
# `ldd -r` here: libcuda.so.1 is stood in for by a stub defining the driver symbols the binary
# imports (the real one comes with the driver there); the CUDA libraries are the real ones of
# the versions PyTorch 2.11 ships when REAL_LIBS=1 installed them (pip wheels under
# $ROOT/ldd-venv, about 1 GB) or LDD_LIBS names folders holding them, else the link-only stubs.
say "needed libraries:"
readelf -d "$DIST/trainyard" | awk '/NEEDED/ {print "  " $NF}' >&2
if [ "${REAL_LIBS:-0}" = 1 ] && [ ! -d "$ROOT/ldd-venv" ]; then
  say "installing the real CUDA 13 / NCCL 2.28 libraries for the ldd check into $ROOT/ldd-venv"
  python3 -m venv "$ROOT/ldd-venv"
  "$ROOT/ldd-venv/bin/pip" install -q --no-deps nvidia-nccl-cu13==2.28.9 nvidia-curand==10.4.0.35 \
    nvidia-cublas==13.1.0.3 nvidia-cuda-runtime==13.0.96
fi
if [ -z "${LDD_LIBS:-}" ]; then
  LDD_LIBS=$(ls -d "$ROOT"/ldd-venv/lib/python3*/site-packages/nvidia/cu13/lib \
    "$ROOT"/ldd-venv/lib/python3*/site-packages/nvidia/nccl/lib 2>/dev/null | paste -sd: || true)
fi
LDD_DIR=$(mktemp -d)
trap 'rm -rf "$LDD_DIR"' EXIT
nm -D --undefined-only "$DIST/trainyard" | awk '{print $2}' | sed 's/@.*//' | grep -E '^cu[A-Z]' \
  | sort -u | awk '{print "void " $1 "(void){}"}' > "$LDD_DIR/libcuda.c"
gcc -shared -fPIC -o "$LDD_DIR/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$LDD_DIR/libcuda.c"
for lib in libnccl.so.2 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
  found=""
  IFS=: read -ra dirs <<< "${LDD_LIBS:-}"
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ -e "$d/$lib" ] && { found=$d/$lib; break; }
  done
  if [ -n "$found" ]; then
    ln -sf "$found" "$LDD_DIR/$lib"; say "ldd: $lib = $(readlink -f "$found")"
  else
    ln -sf "$CUDA_HOME/lib/${lib%%.so*}.so" "$LDD_DIR/$lib"; say "ldd: $lib = link-only stub"
  fi
done
if LD_LIBRARY_PATH=$LDD_DIR ldd -r "$DIST/trainyard" 2>&1 | grep -E "not found|undefined symbol"; then
  say "ldd -r: missing libraries or symbols (above)"; exit 1
fi
say "ldd -r: nothing missing"

gzip -9 -c "$DIST/trainyard" > "$DIST/trainyard.gz.tmp"
mv "$DIST/trainyard.gz.tmp" "$DIST/trainyard.gz"
rm -f "$DIST/trainyard"
say "$DIST/trainyard.gz: $(du -h "$DIST/trainyard.gz" | cut -f1) ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo '+changes'))"
