#!/usr/bin/env bash
# nanogpt-char's recipe against three variants on one GPU, to the first estimate at or
# below 1.47: as shipped; attention_dropout=false (attention through MLX's fused kernel,
# dropout on the embeddings and residual branches only); optimizer=muon (BatchedMuon on
# the blocks' matrices); both. Each variant first trains its first 100 steps once (the
# same schedule) so that the measured runs find MLX's kernels compiled.
# Usage: CORPUS=input.txt OUT=logs [VARIANTS="base noattn muon both"] bash bench/gpu_recipes.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
variants=${VARIANTS:-base noattn muon both}
sets() {
  case $1 in
    base) ;;
    noattn) echo --set attention_dropout=false ;;
    muon) echo --set optimizer=muon ;;
    both) echo --set attention_dropout=false --set optimizer=muon ;;
  esac
}
mlx() { local name=$1; shift; echo "== $name: $*"; timeout 200 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char "$@" >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1400; }
for v in $variants; do mlx "warm-$v" $(sets "$v") --stop-after 100; done
for v in $variants; do mlx "run-$v" $(sets "$v"); done
