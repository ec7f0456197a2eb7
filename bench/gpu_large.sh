#!/usr/bin/env bash
# The gpt2-char preset (GPT-2 small's blocks, 85M parameters, context 256) on 1, 2 and 4
# GPUs at 64 sequences per GPU (weak scaling), 100 steps each (the figure: steps 80 to 100) with no estimates before the
# end: throughput per GPU count. The first run also pays MLX's kernel compilation.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_large.sh [GPU counts, default "1 2 4"]
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
counts=${1:-1 2 4}
mlx() { local name=$1; shift; echo "== $name: $*"; timeout 300 python3 bench/train_preset.py --corpus "$corpus" --preset gpt2-char "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1000; }
mlx large-warmup --stop-after 20 --set log_interval=10
for n in $counts; do
  mlx "large-$n" --processes "$n" --set batch_size=$((64 * n)) --set log_interval=20 \
    --set eval_interval=1000 --set checkpoint_interval=1000 --stop-after 100
done
