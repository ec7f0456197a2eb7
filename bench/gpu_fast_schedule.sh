#!/usr/bin/env bash
# Muon with attention dropout off (bench/gpu_recipes.sh's "both") at shorter schedules and
# a higher Muon rate, to the first estimate at or below 1.47; each variant warmed first.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_fast_schedule.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
both="--set attention_dropout=false --set optimizer=muon"
declare -A extra=([m5000]="" [m2500]="--set max_iters=2500" [m2000]="--set max_iters=2000" [mlr03]="--set muon_learning_rate=0.03")
mlx() { local name=$1; shift; echo "== $name: $*"; timeout 150 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1400; }
for v in m5000 m2500 m2000 mlr03; do mlx "warm-$v" $both ${extra[$v]} --stop-after 100; done
for v in m2500 m2000 mlr03; do mlx "run-$v" $both ${extra[$v]}; done
