"""Uniform (RTN) weight quantization, written as a codebook so it packs like k-means codebooks.

Per row or group of G columns, with b bits and L = 2^b - 1:
    scale = (max - min) / L,   zero = round(-min / scale),
    q = clamp(round(w / scale) + zero, 0, L),   w_hat = scale * (q - zero),
so the group's codebook is the grid {scale * (c - zero) : c = 0..L} and idx = q. A constant
group (max = min) uses scale = |min| (1 if min = 0), which represents it exactly. Stored in
float16 (:mod:`codequant.core.format`) each level moves by at most 2^-11 |level|, i.e. well under
1% of a step whenever |zero| stays within a few steps of the grid, as it does for weights.
"""

from __future__ import annotations

import torch

from ..core.format import check_group_size
from .codebook import check_bits
from .weight_quantizer import WeightQuantizer


def uniform_grid(weight: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid over the last dim: (scale, zero), float32, shape weight.shape[:-1]."""
    check_bits(bits)
    w = weight.float()
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo) / (2**bits - 1)
    flat = scale == 0
    scale = torch.where(flat, torch.where(lo == 0, torch.ones_like(lo), lo.abs()), scale)
    return scale, torch.round(-lo / scale)


def quantize_to_grid(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, 2^b - 1) (float32; scale and zero broadcast)."""
    return torch.clamp(torch.round(weight.float() / scale) + zero, 0, 2**bits - 1)


def grid_codebook(scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The grid as a codebook: [..., 2^b] with entry c = scale * (c - zero)."""
    levels = torch.arange(2**bits, dtype=torch.float32, device=scale.device)
    return scale.unsqueeze(-1) * (levels - zero.unsqueeze(-1))


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (idx int64 [..., N, K], codebook float32 [..., N, K // G, 2^bits])."""
    check_bits(bits)
    k = weight.shape[-1]
    g = check_group_size(group_size, k)
    groups = weight.reshape(*weight.shape[:-1], k // g, g)
    scale, zero = uniform_grid(groups, bits)
    q = quantize_to_grid(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return q.long().reshape(weight.shape), grid_codebook(scale, zero, bits)


RTN = WeightQuantizer(
    fit=lambda weight, stats, config, group_size: rtn(weight, config.wbits, group_size),
    statistics=lambda config: frozenset(),
)
