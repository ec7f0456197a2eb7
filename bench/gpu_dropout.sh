#!/usr/bin/env bash
# One GPU: the CUDA backend's dropout kernel against MLX's Bernoulli masks (the reference
# backend): the kernel's tests, the step taken apart by bench/gpu_step_anatomy.py on each
# backend, nanogpt-char to its early stop on each (twice on the kernel: the first run
# compiles), and the PyTorch reference, in one call on one machine.
# Usage: CORPUS=input.txt OUT=logs bash bench/gpu_dropout.sh
set -u
out=${OUT:-.}
corpus=${CORPUS:-input.txt}
python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py >"$out/test-ops-cuda.log" 2>&1
tail -3 "$out/test-ops-cuda.log"
for backend in cuda reference; do
  echo "== anatomy, $backend"
  SHAKESPEARE_GPT_OPS=$backend python3 bench/gpu_step_anatomy.py --batches 64 >"$out/anatomy-$backend.log" 2>&1
  tail -1 "$out/anatomy-$backend.log" | cut -c1-1500
done
run() { local name=$1 backend=$2; echo "== $name"; SHAKESPEARE_GPT_OPS=$backend timeout 200 python3 bench/train_preset.py --corpus "$corpus" --preset nanogpt-char >"$out/$name.log" 2>&1; tail -1 "$out/$name.log" | cut -c1-1500; }
run mlx-cuda-1 cuda
run mlx-cuda-2 cuda
run mlx-reference reference
echo "== torch"; timeout 150 python3 bench/torch_gpu.py --corpus "$corpus" --preset nanogpt-char >"$out/torch.log" 2>&1; tail -1 "$out/torch.log" | cut -c1-600
