#!/bin/bash
# On the CUDA machine, from a clean copy of the repository: pip install . (non-editable, CUDA kernels
# built at install) into a fresh directory (--target; torch, transformers and triton are the
# machine's, which has no internet), then the CUDA kernel tests against the installed package, run
# from a directory outside the source tree. Log to $OUT/gpu-install.log.
# Usage: OUT=/tmp/out bash benchmarks/gpu_install_check.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
LOG=$OUT/gpu-install.log
{
  echo "# commit $(cat .commit 2>/dev/null): OUT=\$OUT bash benchmarks/gpu_install_check.sh"
  nvidia-smi -L; g++ --version | head -1; nvcc --version | tail -2 | head -1
  python3 -c "import torch, setuptools; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'setuptools', setuptools.__version__)"
  rm -rf /tmp/cqsite /tmp/cqtests
  t0=$(date +%s)
  CODEQUANT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")" \
    MAX_JOBS=8 python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/cqsite . 2>&1 | grep -iv "deprecat\|license\|^ *$\|\*\*\*\|!!" | tail -25
  echo "pip install . took $(( $(date +%s) - t0 )) s"
  mkdir /tmp/cqtests && cp -r tests /tmp/cqtests/  # the package tests/ (its files import tests.helpers)
  cd /tmp/cqtests
  export PYTHONPATH=/tmp/cqsite
  python3 -c "
import codequant
from codequant.kernels.gpu import cuda_gemv, _cq_gemv
assert codequant.__file__.startswith('/tmp/cqsite/'), codequant.__file__
assert cuda_gemv.load() is _cq_gemv, 'not the extension built at install'
print('installed:', codequant.__file__); print('CUDA extension built at install:', _cq_gemv.__file__)"
  # the CUDA extension and dispatch tests (the Triton tests of tests/kernels/test_gpu.py take 5 minutes and do not use the extension)
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rf --tb=line tests/kernels/test_cuda.py tests/kernels/test_dispatch.py 2>&1 | tail -15
} 2>&1 | tee $LOG
