"""Kernels for CUDA GPUs (the ``gpu`` backend family of the kernel table).

Importing this package registers, in the order the table tries them:

* linear: ``cuda_gemv`` (CUDA C++ decode kernels, M <= 16 rows, built on first use),
  ``prefill_fp8`` (more rows, W4A4 on FP8 tensor cores, under
  ``KernelOptions(gpu_w4a4_prefill="fp8")``), ``prefill`` (more rows: dequantize + cuBLAS,
  W4A16 and per-token W4A4), ``triton`` (W4A16 the others did not take);
* moe: ``cuda_moe`` (CUDA C++ fused MoE, up to ``cuda_gemv.MOE_MAX_SLOTS`` slots),
  ``triton`` (the fused Triton MoE).

Calls none of them supports (a W4A4 linear without the CUDA extension or with grouped
activations, activation widths other than 4 bits for Triton) run on the reference, logged.
It raises ImportError only when Triton is not importable. The Triton kernels also run under
``TRITON_INTERPRET=1`` on CPU tensors (how CI checks them, calling :mod:`.ops` directly);
importing this package defines them, so that switch must be set before (tests/conftest.py).
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here: no Triton, no GPU backend)

from ..dispatch import Op, register
from . import cuda_gemv, ops, prefill

register(Op.LINEAR, "cuda_gemv", cuda_gemv.run_linear, cuda_gemv.supports_linear, backend="gpu", device="cuda", priority=30,
         hadamard=True)
register(Op.LINEAR, "prefill_fp8", prefill.linear_fp8, prefill.supports_fp8, backend="gpu", device="cuda", priority=20)
register(Op.LINEAR, "prefill", prefill.linear, prefill.supports_linear, backend="gpu", device="cuda", priority=10)
register(Op.LINEAR, "triton", ops.linear, ops.supports_linear, backend="gpu", device="cuda")
register(Op.MOE, "cuda_moe", cuda_gemv.moe, cuda_gemv.supports_moe, backend="gpu", device="cuda", priority=10)
register(Op.MOE, "triton", ops.moe, ops.supports_moe, backend="gpu", device="cuda")
