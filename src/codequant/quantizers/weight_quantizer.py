"""What a weight quantizer is: a fit from a weight and its input statistics to (idx, codebook),
and the statistics it declares it needs.

Every method's output is a codebook per row or group of G columns (the packed format of
:mod:`codequant.core.format`): idx [..., N, K] in [0, 2^bits), codebook [..., N, K/G, 2^bits].
The statistics of a weight's inputs x (Q = the activation quantizer):
    importance   a = E[x^2] [..., K]  (the diagonal; b = E[x Q(x)] comes with it)
    hessian      H = 2 E[Q(x) Q(x)^T] [..., K, K]
The driver always collects a and b (ACCF's reassignment uses them) and H only for a quantizer
that declares "hessian". Register a new method in :mod:`.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

if TYPE_CHECKING:
    from ..config import QuantConfig

STATISTICS = ("importance", "hessian")


class WeightStats(NamedTuple):
    """Input statistics of one weight ([K], [K, K]) or of a stack of experts ([E, K], [E, K, K])."""

    a: torch.Tensor
    b: torch.Tensor
    hessian: torch.Tensor | None

    def part(self, s: slice) -> "WeightStats":
        """The statistics of experts ``s`` of a stack."""
        return WeightStats(self.a[s], self.b[s], None if self.hessian is None else self.hessian[s])


@dataclass(frozen=True)
class WeightQuantizer:
    """``fit(weight, stats, config, group_size) -> (idx, codebook)``; ``statistics(config)``: the
    names in :data:`STATISTICS` that ``fit`` reads under ``config``."""

    fit: Callable[[torch.Tensor, WeightStats, "QuantConfig", int], tuple[torch.Tensor, torch.Tensor]]
    statistics: Callable[["QuantConfig"], frozenset[str]]
