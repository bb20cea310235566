"""Triton lookup-table kernels for CUDA GPUs (the ``gpu`` kernel backend).

Importing this package registers ``linear`` and ``moe`` with
:func:`codequant.kernels.register_backend`; ``select_backend`` then uses them for CUDA
tensors. It raises ImportError only when Triton is not importable. The kernels also run
under ``TRITON_INTERPRET=1`` on CPU tensors (how CI checks them without a GPU); the
kernel module is imported on first use, so the interpreter switch may be set late.

Which kernel runs for which call (CUDA C++ decode kernels, dequantize + cuBLAS / FP8
prefill, Triton) is described in :mod:`.ops`.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here: no Triton, no GPU backend)

from .. import register_backend


def linear(x, weight, act, bias=None):
    from .ops import linear as _linear

    return _linear(x, weight, act, bias)


def moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block=0):
    from .ops import moe as _moe

    return _moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block)


register_backend("gpu", linear=linear, moe=moe)

__all__ = ["linear", "moe"]
