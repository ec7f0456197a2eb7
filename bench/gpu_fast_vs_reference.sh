#!/usr/bin/env bash
# nanogpt-char-fast against the PyTorch reference (nanoGPT's recipe, bench/torch_gpu.py) on
# one GPU, to the first estimate at or below 1.47, both estimating every 100 steps on 40
# batches. Both sides are warmed first (MLX's kernel caches by 100 steps of the preset's
# own schedule; torch.compile's by one whole run), then ROUNDS rounds alternate them.
# Usage: CORPUS=input.txt OUT=logs ROUNDS=3 bash bench/gpu_fast_vs_reference.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
rounds=${ROUNDS:-3}
mlx() { local name=$1; shift; echo "== $name"; timeout 200 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char-fast "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1500; }
ref() { local name=$1; echo "== $name"; timeout 200 python3 bench/torch_gpu.py --corpus "$corpus" --preset nanogpt-char >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1500; }
mlx fast-warm --stop-after 100
ref torch-warm
for r in $(seq "$rounds"); do
  mlx "fast-$r"
  ref "torch-$r"
done
