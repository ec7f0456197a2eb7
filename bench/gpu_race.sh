#!/usr/bin/env bash
# nanogpt-char on NVIDIA GPUs: the project against the PyTorch reference on one GPU, then
# data-parallel scaling over 1, 2 and 4 GPUs (weak: 64 sequences per GPU; strong: 64 in
# all), and the wall time to validation loss <= 1.47 for each GPU count.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_race.sh [single|scaling|all]
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
what=${1:-all}
gpus=$(python3 -c 'import mlx.core as mx; print(mx.cuda.device_count() if hasattr(mx.cuda, "device_count") else 1)' 2>/dev/null || echo 1)
mlx() { local name=$1; shift; echo "== $name: $*"; python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log"; }
if [ "$what" = single ] || [ "$what" = all ]; then
  mlx mlx-1gpu-full
  echo "== pytorch reference"; python3 bench/torch_gpu.py --corpus "$corpus" --preset nanogpt-char >"$out/torch.log" 2>&1; tail -1 "$out/torch.log"
fi
if [ "$what" = scaling ] || [ "$what" = all ]; then
  for n in 1 2 4; do
    mlx "weak-$n" --processes "$n" --set batch_size=$((64 * n)) --stop-after 300
    mlx "strong-$n" --processes "$n" --stop-after 300
  done
  for n in 2 4; do mlx "weak-$n-full" --processes "$n" --set batch_size=$((64 * n)); done
fi
