#!/usr/bin/env bash
# #11 target benchmark cells in priority order, one process, one thread, resumable (bench_target.py skips
# rows already in the JSONL); seed-major, so both models get each seed before the next. From the repo root:
#   nohup bash benchmarks/run_target_grid.sh > runs/target_grid.log 2>&1 &
set -u
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
V="uniform alloc-recon-cv blocks mixed tp-magnitude tp-taylor"  # blocks / mixed: ResNet-56 only (skipped on VGG)
cells() {  # target K: seeds 0, 1, 2, both models each
    for seed in 0 1 2; do
        for model in resnet56 vgg16; do
            $PY benchmarks/bench_target.py --models $model --targets "$1" --ks "$2" --seeds $seed --variants $V
        done
    done
}
# the library's default mixed mode (cross-fitted ranking, default signal) at the K=1 cells that exist
$PY benchmarks/bench_target.py --models resnet56 --targets 0.5 --ks 1 --seeds 0 1 2 --variants mixed
cells 0.5 5          # (a) FLOPs 0.5, K=5
cells latency:0.5 1  # (b) latency 0.5, K=1
cells 0.3 1          # (c) FLOPs 0.3, K=1 (the rest)
cells 0.3 5          # (d) FLOPs 0.3, K=5
cells latency:0.5 5  # (e) latency 0.5, K=5 (baselines and allocations at the timed target, crossdistill.calibrate)
