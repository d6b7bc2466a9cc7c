#!/usr/bin/env bash
# Shared by the benchmarks that compare against PyTorch (bench/allreduce, bench/steps):
# source it, set VENV (and optionally TORCH_CHECK, a Python snippet that must run for the
# install to count as working), then call `ensure_torch`.
#
# PyTorch comes from PyPI into a virtual environment under target/ (ignored by git), made
# once and reused: first the CPU-only wheel index; where that host is unreachable, PyPI's
# torch without its dependencies plus its pure-Python ones, if that imports; else PyPI's
# torch with all its dependencies (the CUDA libraries, several GB, used only to load torch).

VENV=${VENV:-${BENCH_VENV:-target/bench-venv}}
TORCH_CHECK=${TORCH_CHECK:-"import torch
torch.ones(4).add_(1)"}

say() { echo "$(basename "$0"): $*" >&2; }

torch_works() {
    "$VENV/bin/python" -c "$TORCH_CHECK" >/dev/null 2>&1
}

make_venv() {
    [ -x "$VENV/bin/python" ] && return 0
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        say "python3 -m venv failed; installing python3-venv with apt-get"
        apt-get install -y python3-venv >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y python3-venv >/dev/null; }
        python3 -m venv "$VENV"
    fi
}

install_torch() {
    local pip=("$VENV/bin/pip" install --disable-pip-version-check -q)
    say "installing PyTorch (CPU) from the CPU wheel index"
    if "${pip[@]}" --timeout 20 --retries 1 torch numpy \
        --index-url https://download.pytorch.org/whl/cpu 2>/dev/null && torch_works; then
        return 0
    fi
    say "CPU wheel index unreachable; PyPI's torch without its CUDA dependencies"
    "${pip[@]}" --no-deps torch
    "${pip[@]}" filelock typing-extensions sympy networkx jinja2 fsspec numpy
    if torch_works; then
        return 0
    fi
    say "that torch does not load without its CUDA libraries: installing them (several GB, once)"
    "${pip[@]}" torch
    torch_works || { say "PyTorch does not import; giving up"; exit 1; }
}

# Makes the virtual environment and installs PyTorch into it unless it already works.
ensure_torch() {
    make_venv
    torch_works || install_torch
    say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') in $VENV"
}
