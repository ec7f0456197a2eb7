#!/usr/bin/env bash
# Weak scaling of the training loop itself: nanogpt-char at 64 sequences per GPU on 1 and
# N GPUs, 400 steps with no estimate in between (eval_interval 1000), every log interval
# of 50 steps printed; ROUNDS rounds, the first of which warms MLX's kernel caches for
# each layout (the same command). Throughput per interval is in the logs ("log STEP
# SECONDS s TOK tok/s").
# Usage: CORPUS=input.txt OUT=logs GPUS="1 2" ROUNDS=3 bash bench/gpu_dp_throughput.sh
set -u
export PYTHONFAULTHANDLER=1
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
gpus=${GPUS:-1 2}
rounds=${ROUNDS:-3}
for r in $(seq "$rounds"); do
  for n in $gpus; do
    name="tp-$n-$r"
    echo "== $name"
    timeout 200 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char --every-log \
      --processes "$n" --set batch_size=$((64 * n)) --set eval_interval=1000 --stop-after 400 \
      >"$out/$name.log" 2>&1
    grep "^log" "$out/$name.log" | tr '\n' ' ' | cut -c1-700; echo
  done
done
