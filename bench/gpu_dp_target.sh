#!/usr/bin/env bash
# nanogpt-char to validation <= 1.47 on 1, 2 and 4 GPUs at 64 sequences per GPU (weak
# scaling), the schedule shortened in proportion to the global batch (max_iters 5000/N,
# estimates every 100/N steps) at two peak learning rates per GPU count.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_dp_target.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
mlx() { local name=$1; shift; echo "== $name: $*"; timeout 240 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1400; }
mlx warmup --stop-after 100            # pays MLX's kernel compilation; its caches are then warm
mlx dp-1 --processes 1
for spec in "2 1.4e-3" "2 2e-3" "4 2e-3" "4 3e-3"; do
  set -- $spec
  n=$1 lr=$2
  mlx "dp-$n-lr$lr" --processes "$n" --set batch_size=$((64 * n)) --set max_iters=$((5000 / n)) \
    --set eval_interval=$((100 / n)) --set learning_rate="$lr" --set min_lr="$(python3 -c "print($lr / 10)")"
done
