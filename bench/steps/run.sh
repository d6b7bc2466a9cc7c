#!/usr/bin/env bash
# One training step of every paper model, Trainyard (candle, jobs/benches/steps.rs) against
# the same model in PyTorch (bench/steps/torch_steps.py): same sizes, loss, optimizer and
# batch (each job's quick preset), same threads (RAYON_NUM_THREADS=n for ours,
# torch.set_num_threads(n) for PyTorch). Prints one table: model, batch, threads, ours ms,
# PyTorch ms, ratio (ours / PyTorch) and whether it is within 1.5x.
#
#   bench/steps/run.sh                   # all models, 1 and 2 threads, 3 rounds
#
# Settings (environment): STEPS_THREADS (1,2), STEPS_MODELS (all: resnet,odenet,cnf,planar,
# latent_ode,rnn,gmdgm,m2,cnn,dbvae), STEPS_WARMUP (3), STEPS_ITERS (11 samples),
# STEPS_BUDGET_S (10: a model stops sampling after this once it has 5 samples), ROUNDS (3),
# BENCH_VENV (target/bench-venv).
#
# Every round runs, model by model, ours then PyTorch, so each pair is measured within
# seconds of each other on a shared machine; a figure is the median step time of a run,
# and the table takes, for each side, the best (lowest) median over the rounds. All rounds'
# raw figures are kept in target/bench-steps/*.jsonl. PyTorch comes from PyPI into a
# virtual environment under target/, made once by bench/torch-venv.sh (see there).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=$PWD/target/bench-steps
THREADS=${STEPS_THREADS:-1,2}
MODELS=${STEPS_MODELS:-resnet,odenet,cnf,planar,latent_ode,rnn,gmdgm,m2,cnn,dbvae}
export STEPS_WARMUP=${STEPS_WARMUP:-3}
export STEPS_ITERS=${STEPS_ITERS:-11}
export STEPS_BUDGET_S=${STEPS_BUDGET_S:-10}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT"

# shellcheck source=../torch-venv.sh
source bench/torch-venv.sh
ensure_torch

say "building the Rust benchmark"
cargo bench -p trainyard-jobs --bench steps --no-run >/dev/null 2>&1 ||
    cargo bench -p trainyard-jobs --bench steps --no-run
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
OURS=$OUT/ours-$RUN_ID.jsonl
THEIRS=$OUT/torch-$RUN_ID.jsonl
LOADS=$OUT/load-$RUN_ID.txt
: >"$OURS"
: >"$THEIRS"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), \
load average $(awk '{print $1" "$2" "$3}' /proc/loadavg) before the run, $(date -u +%Y-%m-%dT%H:%MZ)" |
    tee "$LOADS"

n_x=""
for round in $(seq "$ROUNDS"); do
    for t in ${THREADS//,/ }; do
        for m in ${MODELS//,/ }; do
            say "round $round/$ROUNDS, $t thread(s): $m (ours, then PyTorch; load $(awk '{print $1}' /proc/loadavg))"
            RAYON_NUM_THREADS=$t STEPS_MODELS=$m STEPS_JSON=$OURS \
                cargo bench -q -p trainyard-jobs --bench steps >&2
            if [ -z "$n_x" ] && [[ $m == gmdgm || $m == m2 ]]; then
                n_x=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get("n_x"): print(r["n_x"]); break' "$OURS")
            fi
            OMP_NUM_THREADS=$t "$VENV/bin/python" bench/steps/torch_steps.py --threads "$t" \
                --models "$m" --warmup "$STEPS_WARMUP" --iters "$STEPS_ITERS" \
                --budget "$STEPS_BUDGET_S" --n-x "${n_x:-0}" --json "$THEIRS" 2>&1 |
                grep -v -e "Failed to initialize NumPy" -e "_conversion_method_template" >&2
        done
    done
    echo "round $round: load average $(awk '{print $1" "$2" "$3}' /proc/loadavg) at $(date -u +%H:%M:%SZ)" |
        tee -a "$LOADS"
done

python3 - "$OURS" "$THEIRS" "$MODELS" <<'PY'
import json, sys
ours_f, theirs_f, models = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
def best(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        key = (r["model"], r["threads"])
        out.setdefault(key, []).append(r)
    return {k: min(v, key=lambda r: r["median_ms"]) | {"rounds": len(v)} for k, v in out.items()}
ours, theirs = best(ours_f), best(theirs_f)
fmt_nfe = lambda r: "-" if r.get("nfe") is None else f"{r['nfe']:.0f}"
print()
print("| model | batch | threads | ours ms | PyTorch ms | ratio | within 1.5x | NFE ours / PyTorch |")
print("|---|---:|---:|---:|---:|---:|:---:|---:|")
for t in sorted({k[1] for k in ours}):
    for m in models:
        a, b = ours.get((m, t)), theirs.get((m, t))
        if not a or not b:
            continue
        ratio = a["median_ms"] / b["median_ms"]
        nfe = "-" if a.get("nfe") is None else f"{fmt_nfe(a)} / {fmt_nfe(b)}"
        print(f"| {m} | {a['batch']} | {t} | {a['median_ms']:.1f} | {b['median_ms']:.1f} | "
              f"{ratio:.2f} | {'yes' if ratio <= 1.5 else 'no'} | {nfe} |")
print()
print(f"best of {max(r['rounds'] for r in ours.values())} rounds' medians per side; raw: {ours_f}, {theirs_f}")
PY
echo "load average after the run: $(awk '{print $1" "$2" "$3}' /proc/loadavg)"
