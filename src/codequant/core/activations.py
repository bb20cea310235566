"""Per-token asymmetric integer activation quantization.

For a token x (or one group of ``group_size`` channels of it), with b bits and clip ratio r:
    hi = r * max(max(x), 0),  lo = r * min(min(x), 0),  s = (hi - lo) / (2^b - 1),
    z = round(-lo / s),       q = clamp(round(x / s) + z, 0, 2^b - 1),
    x_hat = s * (q - z).
Zero is always exactly representable. The same function runs at calibration, evaluation
and in the kernels' reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import check_group_size


@dataclass(frozen=True)
class ActQuantSpec:
    """How the input of a quantized linear is quantized; bits >= 16 means not at all."""

    bits: int = 4
    group_size: int = 0  # 0: one scale per token
    clip: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.bits < 16


def quantize_activations(x: torch.Tensor, spec: ActQuantSpec):
    """Integer codes q (uint8, shape of x), scale s and zero z (float32, [..., groups]).

    The last dim of x is split into groups of ``spec.group_size`` (or kept whole).
    """
    k = x.shape[-1]
    g = check_group_size(spec.group_size, k, "activation group size")
    xg = x.float().reshape(*x.shape[:-1], k // g, g)
    qmax = 2**spec.bits - 1
    hi = xg.amax(-1).clamp(min=0) * spec.clip
    lo = xg.amin(-1).clamp(max=0) * spec.clip
    # divide by a tensor, not the Python scalar: on CUDA, torch turns division by a scalar into
    # multiplication by its float32 reciprocal, which moves s by an ulp and flips codes at ties;
    # the kernels (CPU, Triton, CUDA) all divide exactly
    scale = ((hi - lo) / torch.full_like(hi, qmax)).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(xg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)
    return q.to(torch.uint8).reshape(x.shape), scale, zero


def dequantize_activations(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x_hat = s * (q - z), float32, same shape as q."""
    groups = scale.shape[-1]
    qg = q.float().reshape(*q.shape[:-1], groups, -1)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize_activations(x: torch.Tensor, spec: ActQuantSpec) -> torch.Tensor:
    """x_hat in x's dtype, with a straight-through gradient (identity backward)."""
    if not spec.enabled:
        return x
    x_hat = dequantize_activations(*quantize_activations(x.detach(), spec)).to(x.dtype)
    return x + (x_hat - x).detach()
