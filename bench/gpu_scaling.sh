#!/usr/bin/env bash
# nanogpt-char data-parallel scaling on 1, 2 and 4 GPUs: weak (64 sequences per GPU) and
# strong (64 in all) throughput over 300 steps, and full runs at a global batch of 64 to
# validation <= 1.47.  Usage: CORPUS=input.txt OUT=logs bash bench/gpu_scaling.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
mlx() { local name=$1; shift; echo "== $name: $*"; python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1300; }
for n in 1 2 4; do mlx "weak-$n" --processes "$n" --set batch_size=$((64 * n)) --stop-after 300; done
for n in 2 4; do mlx "strong-$n" --processes "$n" --stop-after 300; done
for n in 2 4; do mlx "strong-$n-full" --processes "$n"; done
