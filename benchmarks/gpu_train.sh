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
#   bash benchmarks/gpu_train.sh [--fetch-wheels] [stage ...]   stages: tests bench fit
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
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DPO_FAST_TEST_GPU=1
ARCH=${ARCH:-llama-1b}
SEQ=${SEQ:-2048}
stages=${*:-tests bench fit}

run() {  # run NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, show its tail
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  echo "--- rc=$? ($(date +%T))"
  tail -n "${TAIL:-40}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for s in $stages; do
  case $s in
    tests) run tests "${T_TESTS:-200}" python3 -m pytest -q -ra -p no:cacheprovider \
             tests/test_gpu.py ;;
    bench) run bench "${T_BENCH:-240}" python3 benchmarks/bench_train.py --device cuda \
             --precision bf16 --arch "$ARCH" --synthetic "$SEQ" --prompt-share 0.5 \
             --steps "${STEPS:-8}" --warmup 3 --batch-size 4 --threads 8 \
             --name "train_cuda_$ARCH" --workdir /tmp/bench_train ;;
    fit) run fit "${T_FIT:-150}" python3 benchmarks/bench_train.py --device cuda \
           --precision bf16 --arch "$ARCH" --max-fit 8192 16384 32768 65536 --threads 8 \
           --name "train_cuda_${ARCH}_maxfit" --workdir /tmp/bench_train ;;
    *) echo "unknown stage $s" ;;
  esac
done
# Result tables in one file (a lease returns at most 8 files).
tar -cf "$OUT/results.tar" benchmarks/results/train_cuda* 2>/dev/null \
  && echo "results.tar: $(tar -tf "$OUT/results.tar" | tr '\n' ' ')"
