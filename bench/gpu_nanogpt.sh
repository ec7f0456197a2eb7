#!/usr/bin/env bash
# nanogpt-char quality runs on the lent GPU (see docs/BENCHMARKS.md).
# Run from the project root after `source .gpu-b/install.sh`; logs go to ${OUT:-.}.
set -u
out=${OUT:-.}
corpus=${CORPUS:-.gpu-b/input.txt}
run() { local name=$1; shift; echo "== $name: $*"; python3 bench/train_preset.py --corpus "$corpus" "$@" 2>&1 | tee "$out/$name.log" | tail -1; }
for p in seed nanogpt-char; do python3 bench/decode_floor.py --preset $p | tee "$out/floor-$p.log"; done
run nano-bf16-wd0.1 --preset nanogpt-char --set compute_dtype=bfloat16 --set eval_interval=100 --stop-after 3000
run nano-bf16-wd0.5 --preset nanogpt-char --set compute_dtype=bfloat16 --set eval_interval=100 --set weight_decay=0.5 --stop-after 3000
run nano-fp32-wd0.1 --preset nanogpt-char --set eval_interval=100 --stop-after 3000
