"""CUDA C++ W4A16 decode kernel (M <= 16 tokens) on the packed format: ``csrc/cuda/cq_gemv.cu``.

Built on first use with ``torch.utils.cpp_extension.load`` for the device's architecture
(sm_90 on an H200) and cached by PyTorch's extension builder. When the sources are missing,
nvcc is absent or the build fails, :func:`linear` returns False (logged once) and the
caller keeps the Triton path. ``CODEQUANT_CUDA_GEMV=0`` turns the kernel off.

Kernel design (details in the .cu file and benchmarks/notes-gpu.md): lookups in registers
by byte permutes, each index byte's column pair (j, j+32) is one operand register of a
tensor-core mma.m16n8k16 (x permuted the same way by a small prologue kernel), fp32
accumulation, split-K over the warps of a block reduced in shared memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ...format import PackedWeight

log = logging.getLogger(__name__)

MAX_M = 16
_EXT = None
_FAILED = False
_SOURCES = ("cq_gemv.cpp", "cq_gemv.cu")
_SMS: dict = {}


def source_dir() -> Path | None:
    env = os.environ.get("CODEQUANT_CSRC")
    cands = [Path(env) / "cuda"] if env else []
    cands.append(Path(__file__).resolve().parents[4] / "csrc" / "cuda")
    for d in cands:
        if all((d / s).is_file() for s in _SOURCES):
            return d
    return None


def enabled() -> bool:
    return os.environ.get("CODEQUANT_CUDA_GEMV", "1") != "0"


def load(verbose: bool = False):
    """The compiled extension, or None (reason logged once)."""
    global _EXT, _FAILED
    if _EXT is not None or _FAILED:
        return _EXT
    try:
        d = source_dir()
        if d is None:
            raise FileNotFoundError("csrc/cuda/cq_gemv.{cpp,cu} not found (set CODEQUANT_CSRC)")
        from torch.utils.cpp_extension import load as _load

        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            raise RuntimeError(f"compute capability {major}.{minor} < 8.0 (mma.m16n8k16 bf16 needs sm_80)")
        arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
        _EXT = _load(
            name=f"codequant_cq_gemv_sm{major}{minor}",
            sources=[str(d / s) for s in _SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", arch, "-lineinfo"],
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001  (no nvcc, failed build: keep the Triton path)
        _FAILED = True
        log.warning("CodeQuant CUDA decode kernel unavailable, using the Triton path: %s", e)
        _EXT = None
    return _EXT


def _sm_count(device) -> int:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def config(m: int, n: int, k: int, sms: int = 132) -> tuple[int, int]:
    """(R row tiles of 16 per block, W warps per block splitting K); picks the best point of the
    H200 sweep (benchmarks/results/gpu-decode-cuda-meta.json) on all 15 shape/M cases: two row
    tiles per warp when that still gives about one block per SM, up to 32 warps per SM (8 at
    M > 8 with two row tiles), at least 3 chunks of 128 columns per warp."""
    r = 2 if -(-n // 32) >= 0.9 * sms else 1
    blocks = -(-n // (16 * r))
    chunks = -(-k // 128)
    w_max = 8 if r == 2 else 16
    budget = sms * (8 if (m > 8 and r == 2) else 32)
    w = 1
    while w < w_max and blocks * w * 2 <= budget and w * 2 <= max(1, chunks // 3):
        w *= 2
    return r, w


def supported(x2: torch.Tensor, weight: PackedWeight) -> bool:
    idx, cb = weight.indices, weight.codebook
    k = weight.in_features
    if not (x2.is_cuda and enabled() and 1 <= x2.shape[0] <= MAX_M and idx.dim() == 2):
        return False
    if x2.dtype not in (torch.bfloat16, torch.float16, torch.float32) or idx.dtype != torch.uint8 or cb.dtype != torch.float16:
        return False
    if not (idx.is_contiguous() and cb.is_contiguous()) or idx.data_ptr() % 16 or cb.data_ptr() % 16:
        return False
    ng = cb.shape[-2]
    if ng > 1 and (k % ng or (k // ng) % 64):
        return False
    return idx.shape[-1] * 2 == -(-k // 64) * 64


def linear(x2: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, y: torch.Tensor,
           r: int | None = None, w: int | None = None) -> bool:
    """y[:] = x2 @ W_hat^T (+ bias) for x2 [M <= 16, K]; False when this path does not apply."""
    if not supported(x2, weight):
        return False
    ext = load()
    if ext is None:
        return False
    m, k = x2.shape
    n = weight.out_features
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r is None or w is None:
        r0, w0 = config(m, n, k, _sm_count(x2.device))
        r, w = r or r0, w or w0
    xp = torch.empty(m, weight.indices.shape[-1], dtype=torch.int32, device=x2.device)
    b = bias.float().contiguous() if bias is not None else torch.empty(0, dtype=torch.float32, device=x2.device)
    out = y if y.is_contiguous() else torch.empty_like(y)
    ext.gemv(x2, weight.indices, weight.codebook, b, out, xp, k, r, w)
    if out is not y:
        y.copy_(out)
    return True
