#!/bin/bash
# One device call: build the CUDA kernels, test them at real sizes, benchmark. Results to $OUT,
# every step's log appended to $OUT/run.log.
# Usage (repository root, on the CUDA machine): OUT=/tmp/out bash benchmarks/run_gpu_device.sh [steps]
# steps: any of build tests decode bench gputests probe e2e compile w4a4 router profile (default: all but compile, w4a4,
# router and profile, in that order); $E2E_ARGS: more gpu-e2e options; $PROFILE_ARGS: --no-bf16, --fused-only or none;
# w4a4 compares with the build of the csrc directory in $BASELINE when set ($W4A4_ARGS: more probe options)
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
LOG=$OUT/run.log
STEPS=${*:-build tests decode bench gputests probe e2e}
nvidia-smi -L | tee -a $LOG
for s in $STEPS; do
  echo "=== $s" >> $LOG
  case $s in
    build) python3 -c "
import time, torch; t = time.time()
from codequant.kernels.gpu import cuda_gemv
print('ext', cuda_gemv.load(verbose=False), 'build s', round(time.time() - t, 1))" 2>&1 | tail -5 | tee -a $LOG ;;
    tests) timeout 300 python3 -m pytest -rf --tb=line tests/kernels/test_cuda.py tests/kernels/test_cuda_router.py tests/kernels/test_cuda_qkv.py 2>&1 | tail -60 | tee -a $LOG ;;
    decode) timeout 200 python3 -m benchmarks gpu-decode --out $OUT $SWEEP 2>&1 | tee -a $LOG ;;
    bench) timeout ${BENCH_S:-300} python3 -m benchmarks gpu --out $OUT 2>&1 | tee -a $LOG ;;
    gputests) timeout 400 python3 -m pytest -rf --tb=line tests/kernels/test_gpu.py 2>&1 | tail -20 | tee -a $LOG ;;
    compile) timeout 300 python3 -m pytest -rf --tb=short -p no:warnings tests/integration/test_compile.py 2>&1 | tail -40 | tee -a $LOG ;;
    probe) timeout 200 python3 -m benchmarks gpu-probe-read --out $OUT 2>&1 | tail -5 | tee -a $LOG ;;
    w4a4) timeout 300 python3 -m benchmarks gpu-probe-w4a4 ${BASELINE:+--baseline $BASELINE} $W4A4_ARGS --out $OUT 2>&1 | tee -a $LOG ;;
    e2e) timeout ${E2E_S:-400} python3 -m benchmarks gpu-e2e --out $OUT $E2E_ARGS 2>&1 | tail -40 | tee -a $LOG ;;
    router) timeout 200 python3 -m benchmarks gpu-router --out $OUT 2>&1 | tee -a $LOG ;;
    profile) timeout 400 python3 -m benchmarks gpu-profile-e2e $PROFILE_ARGS 2>&1 | tee -a $LOG ;;
  esac
done
