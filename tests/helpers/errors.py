"""The relative errors the tests bound (limits in tests.helpers.limits)."""

from __future__ import annotations

import torch


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||y - ref|| / ||ref||, in float64; a non-finite ``y`` fails the test
    (an output the kernel never wrote, or an overflow)."""
    y, ref = y.double(), ref.double()
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflow)"
    return ((y - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the largest value: max |a - ref| / max |ref|."""
    return float((a - ref).abs().max() / ref.abs().max())
