#!/bin/bash
# One device call: build the CUDA decode kernel, check it, benchmark it (logs and results to $OUT).
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
python3 -c "
import time, torch; t = time.time()
from codequant.kernels.gpu import cuda_gemv
print('ext', cuda_gemv.load(verbose=True), 'build s', round(time.time() - t, 1))" > $OUT/build.log 2>&1
tail -3 $OUT/build.log
timeout 240 python3 -m pytest -q -rf tests/test_kernels_cuda.py 2>&1 | tail -40 | tee $OUT/test.log
timeout 100 python3 -m pytest -q -rf -x tests/test_kernels_gpu.py -k "test_linear_matches_reference and w4a16" 2>&1 | tail -8 | tee -a $OUT/test.log
timeout 300 python3 benchmarks/bench_gpu_decode.py --out $OUT ${SWEEP:---sweep} 2>&1 | tee $OUT/bench.log | grep -v sweep
