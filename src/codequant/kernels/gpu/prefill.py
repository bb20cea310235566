"""Prefill (many rows of x) on packed weights: dequantize through the codebook, then the
vendor GEMM on tensor cores.

At M in the hundreds a GEMM is compute-bound, so the lookup belongs outside its inner loop:
:func:`dequantize` writes W_hat [N, K] once per call (one Triton kernel reading 0.5 byte and
writing 1-2 bytes per weight), then

* W4A16: ``F.linear`` (cuBLAS) in x's dtype. Exact up to the codebook's rounding to x's
  dtype (bf16 for bf16 x).
* W4A4 (one activation scale per token): FP8 tensor cores through ``torch._scaled_mm`` with
  row-wise scales. The codes q - z (|q - z| <= 15) are exact in e4m3; the weights are the
  codebook entries divided by a per-row scale max|C| / 448 and rounded to e4m3 (3 mantissa
  bits): that rounding is the accuracy cost, documented in benchmarks/README.md.

Nothing is cached beyond the per-row codebook copies (a few bytes per row): W_hat is a
temporary of the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.format import PackedWeight
from ...core.activations import ActQuantSpec
from . import kernels as K_
from .ops import _derived, codebook_as, quantize_activations_int8

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def dequantize(weight: PackedWeight, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """W_hat [N, K] in ``codebook``'s dtype (default: the weight's own codebook)."""
    cb = weight.codebook if codebook is None else codebook
    idx = weight.indices
    n, k = weight.out_features, weight.in_features
    raw = _RAW[cb.element_size()]
    out = torch.empty(n, k, dtype=cb.dtype, device=idx.device)
    ng = cb.shape[-2]
    block_n, block_p = 16, 128
    grid = (-(-n // block_n), -(-idx.shape[-1] // block_p))
    K_.dequant_kernel[grid](idx, idx.stride(0), cb.contiguous().view(raw), cb.shape[-2] * 16, out.view(raw), out.stride(0),
                            n, k, idx.shape[-1], G=k // ng, NG=ng, BLOCK_N=block_n, BLOCK_P=block_p, num_warps=4)
    return out


def fp8_codebook(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codebook [N, NG, 16], float32 per-row scale [N]): C ~ scale * C8. Cached."""

    def make():
        c = codebook.float()
        scale = c.abs().amax(dim=(-1, -2)).clamp(min=1e-12) / FP8_MAX
        return (c / scale[..., None, None]).to(FP8).contiguous(), scale.contiguous()

    return _derived(codebook, "cb-fp8", make)


def fp8_supported(x2: torch.Tensor, weight: PackedWeight, act: ActQuantSpec) -> bool:
    k, n = weight.in_features, weight.out_features
    per_token = (act.group_size or k) == k
    return act.enabled and act.bits <= 4 and per_token and k % 16 == 0 and n % 16 == 0 and weight.indices.dim() == 2


def linear_w4a16(x2: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 @ W_hat^T (+ bias) in x2's dtype through a dequantized copy and cuBLAS."""
    w_hat = dequantize(weight, codebook_as(weight.codebook, x2.dtype))
    return F.linear(x2, w_hat, None if bias is None else bias.to(x2.dtype))


def linear_w4a4_fp8(x2: torch.Tensor, weight: PackedWeight, act: ActQuantSpec, bias: torch.Tensor | None) -> torch.Tensor:
    """Q_act(x2) @ W_hat^T (+ bias) on FP8 tensor cores: exact codes, e4m3-rounded weights."""
    q, s = quantize_activations_int8(x2, act)
    cb8, w_scale = fp8_codebook(weight.codebook)
    w8 = dequantize(weight, cb8)
    y = torch._scaled_mm(q.to(FP8), w8.t(), scale_a=s.reshape(-1, 1).contiguous(), scale_b=w_scale.reshape(1, -1),
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return y if y.dtype == x2.dtype else y.to(x2.dtype)
