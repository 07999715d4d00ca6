#!/usr/bin/env bash
# #11 target benchmark cells in priority order, one process, one thread, resumable (bench_target.py skips
# rows already in the JSONL). Run from the repository root:
#   nohup bash benchmarks/run_target_grid.sh > runs/target_grid.log 2>&1 &
set -u
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
B="$PY benchmarks/bench_target.py --models resnet56 vgg16"
V="uniform alloc-recon-cv blocks mixed tp-magnitude tp-taylor"  # blocks / mixed: ResNet-56 only (skipped on VGG)
# the library's default mixed mode (cross-fitted ranking, default signal) at the K=1 cells that exist
$PY benchmarks/bench_target.py --models resnet56 --targets 0.5 --ks 1 --seeds 0 1 2 --variants mixed
$B --targets 0.5 --ks 5 --seeds 0 1 2 --variants $V              # (a) FLOPs 0.5, K=5
$B --targets latency:0.5 --ks 1 --seeds 0 1 2 --variants $V      # (b) latency 0.5, K=1
$B --targets 0.3 --ks 1 --seeds 0 1 2 --variants $V              # (c) FLOPs 0.3, K=1 (the rest)
$B --targets 0.3 --ks 5 --seeds 0 1 2 --variants $V              # (d) FLOPs 0.3, K=5
