#!/usr/bin/env bash
# nanogpt-char to validation <= 1.47 on 1, 2 (and 4) GPUs at 64 sequences per GPU, as
# bench/gpu_dp_target.sh, but with MLX's kernel caches warmed for every layout first: a
# data-parallel step compiles kernels of its own (the gradient exchange changes what is
# fused), which a 1-GPU warm-up does not build. Each layout trains its run's first 100
# steps once (the same schedule, stopped at step 100: MLX writes the schedule's numbers
# into its fused kernels, so another schedule compiles other kernels), then the
# measured runs follow, ROUNDS times: 1 GPU as shipped, N GPUs with global batch 64N,
# max_iters 5000/N, estimates every 100/N steps on 40/N batches (the same 2,560 windows
# as one GPU's), peak learning rate LR_N (1.4e-3 for 2, 2e-3 for 4).
# Usage: CORPUS=input.txt OUT=logs GPUS="1 2 4" ROUNDS=2 bash bench/gpu_dp_warm.sh
set -u
export PYTHONFAULTHANDLER=1  # a rank that crashes prints its Python stack
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
gpus=${GPUS:-1 2 4}
rounds=${ROUNDS:-1}
mlx() { local name=$1; shift; echo "== $name: $*"; timeout 240 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char --every-log "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1400; }
layout() {  # the overrides for n GPUs
  local n=$1 lr
  case $n in 1) return ;; 2) lr=1.4e-3 ;; *) lr=2e-3 ;; esac
  echo --set batch_size=$((64 * n)) --set max_iters=$((5000 / n)) --set eval_interval=$((100 / n)) \
    --set eval_batches=$((40 / n)) \
    --set learning_rate=$lr --set min_lr=$(python3 -c "print($lr / 10)")
}
for n in $gpus; do mlx "warm-$n" --processes "$n" $(layout "$n") --stop-after 100; done
for r in $(seq "$rounds"); do
  for n in $gpus; do mlx "dp-$n-$r" --processes "$n" $(layout "$n"); done
done
