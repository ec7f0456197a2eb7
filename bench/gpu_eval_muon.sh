#!/usr/bin/env bash
# One GPU: nanogpt-char as shipped (cold, then warm compiler caches), the PyTorch reference
# twice, then the preset with Muon on the blocks' matrices at two learning rates, each
# reporting the wall time to its first estimate at or below 1.47.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_eval_muon.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
mlx() { local name=$1; shift; echo "== $name: $*"; timeout 200 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1500; }
torch() { echo "== $1"; timeout 120 python3 bench/torch_gpu.py --corpus "$corpus" --preset nanogpt-char >"$out/$1.log" 2>&1; tail -1 "$out/$1.log" | cut -c1-600; }
mlx mlx-cold
mlx mlx-warm
torch torch-1
torch torch-2
for lr in 0.02 0.05; do mlx "muon-$lr" --set optimizer=muon --set muon_learning_rate=$lr --stop-after 1800; done
