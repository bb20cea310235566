"""The codebook weight quantizer: importance-weighted k-means per row or group
(:func:`~.codebook.fit_codebooks`, h_k = a_k = E[x_k^2]), then, with ``weight_assignment =
"feedback"``, the Hessian error-feedback walk over those centroids (:mod:`.feedback`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .codebook import fit_codebooks
from .feedback import feedback_codebooks
from .weight_quantizer import WeightQuantizer, WeightStats

if TYPE_CHECKING:
    from ..config import QuantConfig


def fit_kmeans(weight: torch.Tensor, stats: WeightStats, config: "QuantConfig", group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, codebook) minimising sum_k a_k (W - C[idx])^2; with the feedback assignment the
    indices (and centroids) then lower the output error tr(dW H dW^T)."""
    idx, codebook = fit_codebooks(weight, config.wbits, group_size, stats.a, config.kmeans_iters, config.seed)
    if config.weight_assignment == "feedback":
        idx, codebook = feedback_codebooks(weight, stats.hessian, idx, codebook, group_size, config.feedback_alternations)
    return idx, codebook


KMEANS = WeightQuantizer(
    fit=fit_kmeans,
    statistics=lambda config: frozenset({"importance", "hessian"} if config.weight_assignment == "feedback" else {"importance"}),
)
