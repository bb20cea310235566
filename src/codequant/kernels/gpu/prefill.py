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

:func:`linear` (W4A16, and W4A4 with one activation scale per token as its fake-quantized
activations through the W4A16 GEMM) and :func:`linear_fp8` are the kernel table's entries for
CUDA calls of more than ``cuda_gemv.MAX_M`` rows; the FP8 one only where
``KernelOptions.gpu_w4a4_prefill`` is ``"fp8"``.

Nothing is cached beyond the per-row codebook copies (a few bytes per row): W_hat is a
temporary of the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.format import PackedWeight, effective_group_size
from ...core.activations import ActQuantSpec, fake_quantize_activations
from ..dispatch import Case, options
from . import cuda_gemv, kernels as K_
from .ops import _derived, codebook_as, quantize_activations_int8, rows_of, supports_packed

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


def _per_token(act: ActQuantSpec, k: int) -> bool:
    return effective_group_size(act.group_size, k) == k


def supports_linear(case: Case) -> bool:
    """CUDA prefill (more than ``cuda_gemv.MAX_M`` rows), unquantized or per-token activations."""
    return (case.x.is_cuda and case.rows > cuda_gemv.MAX_M and supports_packed(case)
            and (not case.act.enabled or _per_token(case.act, case.weight.in_features)))


def supports_fp8(case: Case) -> bool:
    """As :func:`supports_linear`, quantized activations of at most 4 bits, N and K multiples of 16,
    under ``KernelOptions(gpu_w4a4_prefill="fp8")``."""
    weight, act = case.weight, case.act
    return (options().gpu_w4a4_prefill == "fp8" and supports_linear(case) and act.enabled and act.bits <= 4
            and weight.in_features % 16 == 0 and weight.out_features % 16 == 0)


def linear(x: torch.Tensor, weight: PackedWeight, act: ActQuantSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Q_act(x) @ W_hat^T (+ bias) through :func:`linear_w4a16`: quantized activations (one scale
    per token) as their fake-quantized values in x's 16-bit dtype (bf16 for float32 x)."""
    x2 = rows_of(x, weight.in_features)
    if act.enabled:
        x_hat = fake_quantize_activations(x2, act).to(torch.bfloat16 if x2.dtype == torch.float32 else x2.dtype)
        y = linear_w4a16(x_hat, weight, bias).to(x2.dtype)
    else:
        y = linear_w4a16(x2, weight, bias)
    return y.reshape(*x.shape[:-1], weight.out_features)


def linear_fp8(x: torch.Tensor, weight: PackedWeight, act: ActQuantSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_w4a4_fp8` on x [..., K]."""
    y = linear_w4a4_fp8(rows_of(x, weight.in_features), weight, act, bias)
    return y.reshape(*x.shape[:-1], weight.out_features)


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
