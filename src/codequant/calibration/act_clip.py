"""Per-module activation clip ratios, searched on calibration data (``act_clip_search``).

A linear y = x W^T whose input is quantized per token with clip ratio r
(:mod:`codequant.core.activations`) has, over calibration tokens x_t, the output error

    err(r) = sum_t || (Q_r(x_t) - x_t) W^T ||^2 = sum_t e_t G e_t^T,   e_t = Q_r(x_t) - x_t,   G = W^T W,

summed over every (tokens, weight) part that reads the same quantized input: q, k and v of one
attention (one spec, so they still fuse), each routed expert's tokens with its own weight for an
expert stack. The module keeps the ratio of :data:`CLIP_RATIOS` with the least err, stored in its
activation spec (the checkpoint format holds one spec per module).
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.activations import ActQuantSpec, fake_quantize_activations

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


class ClipSearch:
    """err(r) of ``spec`` with clip r for every r in ``ratios``, accumulated by :meth:`add`."""

    def __init__(self, spec: ActQuantSpec, ratios: tuple[float, ...] = CLIP_RATIOS, batch: int = 8192):
        self.specs = [dataclasses.replace(spec, clip=r) for r in ratios]
        self.errors = torch.zeros(len(ratios), dtype=torch.float64)
        self.batch = batch

    @torch.no_grad()
    def add(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """Add sum_t e_t G e_t^T over the tokens x [T, K] (already transformed as the module's input
        is) for the weight [N, K] that reads them; e W^T when N <= K, else e G (the cheaper product)."""
        weight = weight.float().to(x.device)
        gram = weight.T @ weight if weight.shape[0] > weight.shape[1] else None
        for s in range(0, x.shape[0], self.batch):
            xb = x[s : s + self.batch].float()
            for i, spec in enumerate(self.specs):
                e = fake_quantize_activations(xb, spec) - xb
                self.errors[i] += float(((e @ gram) * e).sum() if gram is not None else (e @ weight.T).pow(2).sum())

    def best(self) -> ActQuantSpec:
        """The spec with the least accumulated error (the first of equals)."""
        return self.specs[int(self.errors.argmin())]
