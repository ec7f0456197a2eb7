#!/usr/bin/env bash
# Seed-preset quality sweep and generation speed on the lent GPU (see docs/BENCHMARKS.md).
# Run from the project root after `source .gpu-b/install.sh`; logs go to ${OUT:-.}.
set -u
out=${OUT:-.}
corpus=${CORPUS:-.gpu-b/input.txt}
run() { local name=$1; shift; echo "== $name: $*"; python3 bench/train_preset.py --corpus "$corpus" "$@" 2>&1 | tee "$out/$name.log" | tail -1; }
run seed-d0.1-lr1e-3 --preset seed
run seed-d0-lr1e-3 --preset seed --set dropout=0.0
run seed-d0-lr2e-3 --preset seed --set dropout=0.0 --set learning_rate=2e-3 --set min_lr=2e-4
run seed-d0-lr3e-3 --preset seed --set dropout=0.0 --set learning_rate=3e-3 --set min_lr=3e-4
run seed-d0.05-lr3e-3 --preset seed --set dropout=0.05 --set learning_rate=3e-3 --set min_lr=3e-4
for p in seed nanogpt-char; do python3 bench/generate_speed.py --preset $p --tokens 1000 | tee "$out/gen-$p.log"; done
