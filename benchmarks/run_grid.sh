#!/usr/bin/env bash
# The full grid of issue #12 (resumable: finished cells are skipped, rows from the earlier result
# files are reused where their settings did not change; see bench_accuracy.py):
# ResNet-56 and VGG-16 on Fashion-MNIST, K in {1,2,5,10}, seeds 0,1,2, structured keep 0.5,
# every method and each +mir refinement. Order: ResNet-56 (every seed, every K), then VGG-16 seed 0
# for every K, then VGG-16 seeds 1 and 2.
# Each step is its own python process, so it runs the code (and per-family defaults) of that moment.
#   nohup bash benchmarks/run_grid.sh > runs/grid.log 2>&1 &
# Stopped early: `bash benchmarks/run_grid.sh --reuse-only` copies the reusable rows of every cell
# (K=1/5 of seeds the run has not reached) without running anything; then
# python benchmarks/grid_table.py (README tables, plots).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
R=benchmarks/results
METHODS="l1 l1+bp nc ours ours-s mir nc+mir ours+mir ours-s+mir fitnet"
grid() {
  "$PY" benchmarks/bench_accuracy.py --ks 1 2 5 10 --prunes structured:0.5 \
    --out $R/accuracy_fashion-mnist_grid.jsonl \
    --reuse $R/accuracy_fashion-mnist.jsonl $R/accuracy_fashion-mnist_e2e.jsonl "$@" $EXTRA
}
EXTRA="${1:-}"  # e.g. --reuse-only / --dry-run
grid --models resnet56 --seeds 0 1 2 --methods $METHODS
grid --models vgg16 --seeds 0 --methods $METHODS
grid --models vgg16 --seeds 1 2 --methods $METHODS
echo GRID DONE
