#!/usr/bin/env bash
# Data-parallel detail on 1, 2 and 4 GPUs: the step with each way of exchanging gradients
# (bench/dp_step.py), then nanogpt-char at a fixed global batch of 64 to validation <= 1.47.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_dp.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
launch() { python3 -c "import sys; from mlx._distributed_utils.launch import main; sys.argv = ['mlx.launch', *sys.argv[1:]]; main()" "$@"; }
python3 bench/dp_step.py --preset nanogpt-char | tee "$out/dp-step-1.log"
for n in 2 4; do launch -n "$n" --backend nccl --python python3 -- bench/dp_step.py --preset nanogpt-char | tee "$out/dp-step-$n.log"; done
for n in 2 4; do
  echo "== strong-$n-full"; python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char --processes "$n" >"$out/strong-$n-full.log" 2>&1; tail -1 "$out/strong-$n-full.log" | cut -c1-1300
done
