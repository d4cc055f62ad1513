#!/usr/bin/env bash
# Everything one GPU lease should run, in one command (a lease is short and starts bare):
# carried benchmark peers (.whl/, see docs/design.md), the GPU tests, the kernel breakdown
# and the side-by-side benchmarks. Logs and result files go to $OUT (default /tmp/gpu_out).
#
#   bash benchmarks/gpu_session.sh [stage ...]     stages: env tests kernels rows sweep logprobs dpo
#                                                   train fit (the training benchmark: gpu_train.sh)
#                                                   dist (torchrun x1: ddp / fsdp2 on nccl)
#                                                   fsdp (torchrun x1, fsdp2 + bf16 mixed
#                                                   precision, +- cpu offload, llama-1b)
#                                                   long (bench_long.py: 2k / 8k / 32k-token
#                                                   pairs, segments vs dense mask vs no
#                                                   sharing vs TRL, bf16, llama-1b, MFU)
#                                                   dropin (bench_train.py: TRL vs the
#                                                   dpo_fast.trl drop-in, bf16, llama-1b)
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DPO_FAST_TEST_GPU=1
stages=${*:-env tests kernels logprobs dpo}

run() {  # run NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, show its tail
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  echo "--- rc=$? ($(date +%T))"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}

for s in $stages; do
  case $s in
    env) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
         python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" ;;
    tests) run tests "${T_TESTS:-240}" python3 -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py ;;
    kernels) run kernels "${T_KERNELS:-150}" sh -c "python3 benchmarks/bench_gpu_kernels.py --dtypes bfloat16 --shapes smol,llama && python3 benchmarks/bench_gpu_kernels.py --dtypes float32 --shapes smol" ;;
    rows) run rows "${T_ROWS:-120}" python3 benchmarks/bench_gpu_kernels.py --dtypes bfloat16 --shapes smol,llama --row-sweep "$OUT/row_config.env"
          [ -s "$OUT/row_config.env" ] && . "$OUT/row_config.env" && cat "$OUT/row_config.env" ;;
    sweep) run sweep "${T_SWEEP:-300}" python3 benchmarks/bench_gpu_kernels.py --dtypes bfloat16 --shapes smol,llama --sweep --sweep-budget "${SWEEP_BUDGET:-40}" --json "$OUT/sweep.json" ;;
    logprobs) run logprobs "${T_LOGPROBS:-200}" python3 benchmarks/bench_logprobs.py --device cuda --dtype bfloat16 --shapes smol,llama ${LOGPROBS_METHODS:+--methods $LOGPROBS_METHODS}
              ;;
    dpo|dpo0) run $s "${T_DPO:-200}" python3 benchmarks/bench_dpo_loss.py --device cuda --dtype bfloat16 --pairs 4 --seq 1024 --dim 4096 --vocab 128256 --prompt-len "$([ $s = dpo0 ] && echo 0 || echo 256)" --methods "${DPO_METHODS:-naive,dpo_fast,dpo_fast-scratch,liger+ref,liger-noref,cce}" ;;
    train) run train "${T_TRAIN:-240}" python3 benchmarks/bench_train.py --device cuda \
             --precision bf16 --arch "${ARCH:-llama-1b}" --synthetic "${SEQ:-2048}" \
             --prompt-share 0.5 --steps "${STEPS:-8}" --warmup 3 --batch-size 4 --threads 8 \
             --name "train_cuda_${ARCH:-llama-1b}" --workdir /tmp/bench_train ;;
    dropin) run dropin "${T_DROPIN:-300}" python3 benchmarks/bench_train.py --device cuda \
             --precision bf16 --arch "${ARCH:-llama-1b}" --synthetic "${SEQ:-2048}" \
             --prompt-share 0.5 --steps "${STEPS:-8}" --warmup 3 --batch-size 4 --threads 8 \
             --cases trl_default trl_precompute dropin dropin_packed dpo_fast \
             --name "dropin_cuda_${ARCH:-llama-1b}" --workdir /tmp/bench_dropin ;;
    fit) run fit "${T_FIT:-150}" python3 benchmarks/bench_train.py --device cuda \
           --precision bf16 --arch "${ARCH:-llama-1b}" --max-fit 8192 16384 32768 65536 \
           --threads 8 --name "train_cuda_${ARCH:-llama-1b}_maxfit" --workdir /tmp/bench_train ;;
    dist) run dist "${T_DIST:-200}" python3 benchmarks/gpu_dist.py --device cuda --out /tmp/gpu_dist ;;
    fsdp) run fsdp "${T_FSDP:-420}" python3 benchmarks/gpu_fsdp.py --device cuda --arch "${ARCH:-llama-1b}" --seq "${SEQ:-1024}" --steps "${STEPS:-6}" --workdir /tmp/gpu_fsdp ;;
    long) run long "${T_LONG:-540}" python3 benchmarks/bench_long.py --device cuda --precision bf16 \
            --arch "${ARCH:-llama-1b}" --synthetic --lengths ${LONG_LENGTHS:-2048 8192 32768} \
            --cases dpo_fast dpo_fast_mask dpo_fast_noshare trl_default --threads 8 \
            --name "long_cuda_${ARCH:-llama-1b}" --workdir /tmp/bench_long ;;
    quick) run quick "${T_QUICK:-120}" python3 -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py -k "${QUICK_K:-oracle and triton-bfloat16 or fused_loss_vs_unfused and triton-bfloat16 or many_chunks or deterministic}" ;;
    *) echo "unknown stage $s" ;;
  esac
done
# Result tables in one file (a lease returns few files).
tar -cf "$OUT/results.tar" benchmarks/results/*cuda* 2>/dev/null && echo "results.tar: $(tar -tf "$OUT/results.tar" | tr '\n' ' ')"
