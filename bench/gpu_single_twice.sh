#!/usr/bin/env bash
# One GPU, each side twice in a row: the first run pays the kernel compilation (MLX's
# NVRTC kernels, torch.compile), the second finds both compilers' caches warm.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_single_twice.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
for i in 1 2; do
  echo "== mlx run $i"; python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char >"$out/mlx-$i.log" 2>&1; tail -1 "$out/mlx-$i.log" | cut -c1-1200
  echo "== torch run $i"; python3 bench/torch_gpu.py --corpus "$corpus" --preset nanogpt-char >"$out/torch-$i.log" 2>&1; tail -1 "$out/torch-$i.log" | cut -c1-420
done
