#!/usr/bin/env bash
# Every --method of `crossdistill compress` on the shipped ResNet-56 and VGG-16 teachers
# (K=1, seed 0, structured keep 0.5, accuracy on the first 2000 test images).
# Log: benchmarks/results/cli_all_methods.log (one summary line per run).
set -euo pipefail
export COLUMNS=160
cd "$(dirname "$0")/.."
log=benchmarks/results/cli_all_methods.log
tmp=$(mktemp)
for model in resnet56 vgg16; do
  for method in nc ours ours-s l1 l1+bp fitnet fskd thinet cp; do
    out=$(mktemp -d)
    start=$(date +%s)
    crossdistill compress --teacher "teachers/${model}_fashion-mnist.safetensors" --k 1 --seed 0 \
      --method "$method" --prune structured --keep 0.5 --test-limit 2000 --no-latency --out "$out" >"$out.log" 2>&1
    acc=$(grep "Top-1 accuracy" "$out.log" | head -1 | tr -s " │" " ")
    took=$(grep -o "compressed in [0-9.]* s" "$out.log")
    echo "$model $method: exit 0, $took, run $(( $(date +%s) - start )) s, files: $(cd "$out" && ls | tr "\n" " ")| $acc" | tee -a "$tmp"
    rm -rf "$out" "$out.log"
  done
done
mv "$tmp" "$log"
