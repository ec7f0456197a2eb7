#!/usr/bin/env bash
# GPU: which variant of a preset's recipe reaches validation 1.47 in the fewest steps?
# Steps to 1.47 for variants of a preset's recipe, PAR runs at a time on one GPU (the
# step counts, losses and early stops do not depend on what else runs; the wall times
# do, so time the chosen recipe alone afterwards). Each line of LIST is a name and its
# `--set` overrides, e.g. `m1500-d0.1 max_iters=1500 dropout=0.1`. On an 80 GB H100, 4
# nanogpt-char runs at a time ran out of GPU memory (each MLX process keeps its own buffer
# cache); 2 at a time did not.
# PRESET (default nanogpt-char-fast) is the recipe the variants change, EXTRA overrides
# applied to every variant before its own (e.g. "max_iters=5000 dropout=0.2"); LIMIT the
# seconds per run (default 400). bench/sweeps/recipes.txt holds nanogpt-char's four recipes.
# Usage: CORPUS=input.txt OUT=logs LIST=bench/sweeps/muon-wave2.txt PAR=2 bash bench/gpu_recipe_sweep.sh
#        CORPUS=input.txt OUT=logs LIST=bench/sweeps/recipes.txt PRESET=nanogpt-char bash bench/gpu_recipe_sweep.sh
set -u
case "${1:-}" in -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
if [ -z "${LIST:-}" ]; then echo "error: LIST is not set (a file of 'name FIELD=VALUE ...' lines); see --help" >&2; exit 2; fi
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
preset=${PRESET:-nanogpt-char-fast}
par=${PAR:-2}
limit=${LIMIT:-400}
extra=${EXTRA:-}
one() {
  local name=$1; shift
  local sets=()
  for kv in $extra "$@"; do sets+=(--set "$kv"); done
  timeout "$limit" python3 bench/train_preset.py --corpus "$corpus" --preset "$preset" "${sets[@]}" \
    >"$out/sweep-$name.log" 2>&1
  python3 - "$name" "$out/sweep-$name.log" <<'PY'
import json, sys
name, path = sys.argv[1:]
last = open(path).read().strip().splitlines()[-1:] or [""]
try:
    r = json.loads(last[0])
except json.JSONDecodeError:
    print(f"{name}: no result ({last[0][:200]})"); raise SystemExit
hit = r["first_at_target"]
print(f"{name}: first<=1.47 {hit['step'] if hit else None} best {r['best_est_val_loss']} "
      f"at {r['best_step']} full {r['full_val_loss']} steps {r['steps']} "
      f"early {r['stopped_early']} {r['seconds']} s", flush=True)
PY
}
export -f one
export out corpus preset limit extra
grep -v '^\s*#' "$LIST" | grep -v '^\s*$' | xargs -P "$par" -L 1 bash -c 'one "$@"' _
