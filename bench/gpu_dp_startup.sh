#!/usr/bin/env bash
# Where a 2-GPU run's start-up goes: bench/dp_startup.py (the group, the compiled step and
# the loop, each rank already in step), twice (cold, then warm caches); bench/dp_probe.py
# on 2 ranks and on 1 (each rank's own clock from process start through 100 real steps);
# then the preset through train_preset.py --processes 2, logging every 5 steps.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_dp_startup.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
export PYTHONFAULTHANDLER=1  # a rank that crashes prints its Python stack
launch=(python3 -c "import sys, mlx._distributed_utils.launch as l; n = sys.argv[1]; sys.argv = ['mlx.launch', '-n', n, '--backend', 'nccl', '--', *sys.argv[2:]]; l.main()")
run() { local name=$1; shift; echo "== $name: $*"; timeout "$T" "$@" >"$out/$name.log" 2>&1; echo "rc $?"; tail -4 "$out/$name.log" | cut -c1-1500; }
T=300 run startup-cold "${launch[@]}" 2 python3 bench/dp_startup.py
T=120 run startup-warm "${launch[@]}" 2 python3 bench/dp_startup.py
T=120 run probe-2 "${launch[@]}" 2 python3 bench/dp_probe.py --corpus "$corpus" --out "$out/probe-2"
T=120 run probe-1 python3 bench/dp_probe.py --corpus "$corpus" --out "$out/probe-1"
for i in 1 2; do T=200 run preset-2-$i python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char --processes 2 \
  --every-log --set log_interval=5 --set batch_size=128 --set eval_interval=50 --set max_iters=2500 \
  --set learning_rate=1.4e-3 --set min_lr=1.4e-4 --stop-after 150; done
