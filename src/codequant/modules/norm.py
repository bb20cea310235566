"""RMSNorm used where CodeQuant replaces a LayerNorm (after centering the residual stream)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import QuantizedModule, register_module_kind


@register_module_kind
class RMSNorm(QuantizedModule):
    """y = x / sqrt(mean(x^2) + eps) * weight [+ bias] (computed in float32).

    With a bias it is a LayerNorm on a zero-mean stream whose beta could not be folded
    into the readers (fused experts have no bias)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=torch.float32, device=None, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device)) if bias else None
        self.variance_epsilon = eps

    kind = "rms_norm"
    spec_keys = frozenset({"kind", "hidden_size", "eps", "bias"})

    def spec(self, bits: int) -> dict:
        return {"kind": self.kind, "hidden_size": self.weight.shape[0], "eps": float(self.variance_epsilon), "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device=None, replaced: nn.Module | None = None) -> "RMSNorm":
        return cls(spec["hidden_size"], spec["eps"], dtype, device, bias=spec["bias"])

    @classmethod
    def float_tensors(cls, spec: dict) -> dict[str, tuple[int, ...]]:
        shape = (spec["hidden_size"],)
        return {"weight": shape, "bias": shape} if spec["bias"] else {"weight": shape}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
