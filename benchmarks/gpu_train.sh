#!/usr/bin/env bash
# The end-to-end training benchmark on one GPU, as one command that ends in well under 10
# minutes (a lease is ~15 minutes of device time and starts bare):
#   1. tests/test_gpu.py, whole, on the current defaults;
#   2. bench_train.py side by side (TRL default / precompute / no grad ckpt, plain loop,
#      dpo_fast, dpo_fast + grad ckpt) on a randomly initialised Llama-3.2-1B-shaped model
#      (V = 128,256), bf16 autocast over fp32 weights, 2,048 tokens per sequence, 4 pairs per
#      step: tokens/s, peak GPU memory (torch.cuda.max_memory_allocated), MFU against the bf16
#      matmul rate measured in the same run;
#   3. the longest sequence one step of TRL default and of dpo_fast fits in.
# Results land in benchmarks/results/train_cuda*.{json,md,png}, tarred into $OUT/results.tar.
#
# The GPU machine lacks TRL, datasets and a few pure-Python packages: carry them as wheels
# (fetch once here with `bash benchmarks/gpu_train.sh --fetch-wheels`, then name .whl in the
# device run's carry list).
#
#   bash benchmarks/gpu_train.sh [--fetch-wheels] [stage ...]   stages: tests train fit
#   (ARCH=qwen2.5-1.5b, SEQ=4096, STEPS=... override the shape)
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  for w in trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 \
           jsonargparse==4.53.0 docstring-parser==0.18.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$w" || exit 1
  done
  ls -la .whl
  exit 0
fi
# The stages live in gpu_session.sh (wheel install, logging, the results tarball).
exec bash benchmarks/gpu_session.sh env ${*:-tests train fit}
