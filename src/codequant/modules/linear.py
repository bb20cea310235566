"""CodeQuantLinear: a linear layer on packed CodeQuant weights (see :mod:`codequant.core.format`)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.format import CODEBOOK_DTYPE, CODEBOOK_SIZE, PackedWeight, check_group_size, pack, padded_columns
from .. import kernels
from ..core.activations import ActQuantSpec
from .registry import QuantizedModule, register_module_kind


@register_module_kind
class CodeQuantLinear(QuantizedModule):
    """y = Q_act(x H) W_hat^T + b, W_hat from 4-bit indices into per-row/group codebooks.

    ``hadamard_block`` > 0 applies the online block Hadamard H to the input first (its
    inverse is folded into the weight). ``backend`` forces a kernel backend (None: by device).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int | None = None,
        act: ActQuantSpec = ActQuantSpec(bits=16),
        hadamard_block: int = 0,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        group_size = check_group_size(group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.act, self.hadamard_block, self.backend = act, hadamard_block, None
        kp = padded_columns(in_features)
        self.register_buffer("indices", torch.zeros(out_features, kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "codebook",
            torch.zeros(out_features, in_features // group_size, CODEBOOK_SIZE, dtype=CODEBOOK_DTYPE, device=device),
        )
        self.register_buffer("row_sum", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_packed(
        cls,
        weight: PackedWeight,
        bias: torch.Tensor | None = None,
        act: ActQuantSpec = ActQuantSpec(bits=16),
        hadamard_block: int = 0,
    ) -> "CodeQuantLinear":
        dtype = bias.dtype if bias is not None else torch.float32
        module = cls(weight.in_features, weight.out_features, bias is not None, weight.group_size, act, hadamard_block, dtype, weight.indices.device)
        module.indices.copy_(weight.indices)
        module.codebook.copy_(weight.codebook)
        module.row_sum.copy_(weight.row_sum)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    kind = "linear"
    spec_keys = frozenset({"kind", "in_features", "out_features", "group_size", "bits", "act", "hadamard_block", "bias"})
    packed_parts = ("",)

    def spec(self, bits: int) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "bits": bits, "act": dataclasses.asdict(self.act),
                "hadamard_block": int(self.hadamard_block), "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device=None, replaced: nn.Module | None = None) -> "CodeQuantLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["group_size"],
                   ActQuantSpec(**spec["act"]), spec["hadamard_block"], dtype, device)

    @classmethod
    def packed_layout(cls, spec: dict) -> dict[str, tuple[tuple[int, ...], int, int]]:
        return {"": ((spec["out_features"],), spec["in_features"], spec["group_size"])}

    @classmethod
    def float_tensors(cls, spec: dict) -> dict[str, tuple[int, ...]]:
        return {"bias": (spec["out_features"],)} if spec["bias"] else {}

    def packed_weights(self) -> dict[str, PackedWeight]:
        return {"": self.packed}

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.indices, self.codebook, self.row_sum, self.in_features)

    @property
    def group_size(self) -> int:
        return self.packed.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.packed, self.act, self.bias, self.hadamard_block, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"act_bits={self.act.bits}, hadamard_block={self.hadamard_block}, bias={self.bias is not None}"
        )


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int | None = None,
    act_bits: int = 16,
) -> CodeQuantLinear:
    """Data-free CodeQuant linear: k-means codebooks of 2^bits centroids per row (or group)."""
    from ..quantizers.codebook import fit_codebooks

    idx, codebook = fit_codebooks(weight.float(), bits=bits, group_size=group_size)
    return CodeQuantLinear.from_packed(pack(idx, codebook), bias, ActQuantSpec(bits=act_bits))
