"""CodeQuantExperts: the fused routed-experts module on packed CodeQuant weights.

It has the transformers 5.x experts interface, ``forward(hidden_states, top_k_index,
top_k_weights)``, so it drops in for ``Qwen3MoeExperts``, ``MixtralExperts`` and the rest:
gate_up [E, 2I, H] (gate rows first) and down [E, H, I], SwiGLU in between.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.format import CODEBOOK_DTYPE, CODEBOOK_SIZE, PackedWeight, check_group_size, padded_columns
from .. import kernels
from ..core.activations import ActQuantSpec
from .registry import QuantizedModule, register_module_kind

EXPERT_ACTIVATION = "silu"  # the only one the kernels compute: h = silu(x Wg^T) * (x Wu^T)


@register_module_kind
class CodeQuantExperts(QuantizedModule):
    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        group_size: int | None = None,
        down_group_size: int | None = None,
        act: ActQuantSpec = ActQuantSpec(bits=16),
        down_act: ActQuantSpec | None = None,
        hadamard_block: int = 0,
        device=None,
    ):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act, self.down_act = act, down_act or act
        self.hadamard_block, self.backend = hadamard_block, None
        for name, n, k, g in (
            ("gate_up", 2 * intermediate_dim, hidden_dim, group_size),
            ("down", hidden_dim, intermediate_dim, down_group_size or group_size),
        ):
            g = check_group_size(g, k)
            self.register_buffer(f"{name}_indices", torch.zeros(num_experts, n, padded_columns(k) // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{name}_codebook", torch.zeros(num_experts, n, k // g, CODEBOOK_SIZE, dtype=CODEBOOK_DTYPE, device=device))
            self.register_buffer(f"{name}_row_sum", torch.zeros(num_experts, n, dtype=torch.float32, device=device))

    @classmethod
    def from_packed(cls, gate_up: PackedWeight, down: PackedWeight, act: ActQuantSpec, down_act: ActQuantSpec | None = None, hadamard_block: int = 0):
        e, two_i, h = gate_up.indices.shape[0], gate_up.out_features, gate_up.in_features
        module = cls(e, h, two_i // 2, gate_up.group_size, down.group_size, act, down_act, hadamard_block, gate_up.indices.device)
        for name, w in (("gate_up", gate_up), ("down", down)):
            getattr(module, f"{name}_indices").copy_(w.indices)
            getattr(module, f"{name}_codebook").copy_(w.codebook)
            getattr(module, f"{name}_row_sum").copy_(w.row_sum)
        return module

    kind = "experts"
    spec_keys = frozenset({"kind", "num_experts", "hidden_dim", "intermediate_dim", "group_size", "down_group_size", "bits",
                           "act", "down_act", "hadamard_block", "activation"})
    packed_parts = ("gate_up_", "down_")

    def spec(self, bits: int) -> dict:
        return {"kind": self.kind, "num_experts": self.num_experts, "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim, "group_size": self.gate_up.group_size,
                "down_group_size": self.down.group_size, "bits": bits, "act": dataclasses.asdict(self.act),
                "down_act": dataclasses.asdict(self.down_act), "hadamard_block": int(self.hadamard_block),
                "activation": EXPERT_ACTIVATION}

    @classmethod
    def spec_problem(cls, spec: dict) -> str | None:
        if spec["activation"] != EXPERT_ACTIVATION:
            return (f"expert activation {spec['activation']!r}, but the kernels compute {EXPERT_ACTIVATION!r} only; "
                    "re-export the model with this codequant")
        return None

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device=None, replaced: nn.Module | None = None) -> "CodeQuantExperts":
        """Packed experts hold no float tensors: ``dtype`` is unused. Refuses an activation the kernels do not compute."""
        problem = cls.spec_problem(spec)
        if problem:
            raise ValueError(f"experts spec has {problem}")
        return cls(spec["num_experts"], spec["hidden_dim"], spec["intermediate_dim"], spec["group_size"],
                   spec["down_group_size"], ActQuantSpec(**spec["act"]), ActQuantSpec(**spec["down_act"]),
                   spec["hadamard_block"], device)

    @classmethod
    def packed_layout(cls, spec: dict) -> dict[str, tuple[tuple[int, ...], int, int]]:
        e, h, i = spec["num_experts"], spec["hidden_dim"], spec["intermediate_dim"]
        return {"gate_up_": ((e, 2 * i), h, spec["group_size"]), "down_": ((e, h), i, spec["down_group_size"])}

    def packed_weights(self) -> dict[str, PackedWeight]:
        return {"gate_up_": self.gate_up, "down_": self.down}

    @property
    def gate_up(self) -> PackedWeight:
        return PackedWeight(self.gate_up_indices, self.gate_up_codebook, self.gate_up_row_sum, self.hidden_dim)

    @property
    def down(self) -> PackedWeight:
        return PackedWeight(self.down_indices, self.down_codebook, self.down_row_sum, self.intermediate_dim)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return kernels.moe(hidden_states, top_k_index, top_k_weights, self.gate_up, self.down, self.act, self.down_act,
                           self.hadamard_block, self.backend)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
            f"act_bits={self.act.bits}, down_act_bits={self.down_act.bits}, hadamard_block={self.hadamard_block}"
        )
