"""Triton lookup-table kernels for CUDA GPUs (the ``gpu`` kernel backend).

Importing this package registers ``linear`` and ``moe`` with
:func:`codequant.kernels.register_backend`; ``select_backend`` then uses them for CUDA
tensors. It raises ImportError only when Triton is not importable. The kernels also run
under ``TRITON_INTERPRET=1`` on CPU tensors (how CI checks them without a GPU); the
kernel module is imported on first use, so the interpreter switch may be set late.

W4A4 (activation-quantized) calls on CUDA tensors go to the reference path: the W4A4
kernels pass the interpreter tests on small shapes but failed their error limits at real
sizes on an H200 (2026-11-22), so they are used only when called directly (``ops``).
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here: no Triton, no GPU backend)

from .. import reference, register_backend


def linear(x, weight, act, bias=None):
    if act.enabled and x.is_cuda:
        return reference.linear(x, weight, act, bias)
    from .ops import linear as _linear

    return _linear(x, weight, act, bias)


def moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block=0):
    if (act.enabled or down_act.enabled) and x.is_cuda:
        return reference.moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block)
    from .ops import moe as _moe

    return _moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block)


register_backend("gpu", linear=linear, moe=moe)

__all__ = ["linear", "moe"]
