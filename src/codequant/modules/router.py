"""Quantized routers.

A router is an E x H matrix (E experts): under 0.1% of an MoE layer's weights, and each
architecture wraps it in its own routing logic (softmax, top-k, group limits, jitter). A
:class:`CodeQuantRouter` keeps that logic: :func:`quantize_router` turns the architecture's
router module, in place, into an instance of a subclass of both :class:`CodeQuantRouter` and
the router's own class (as ``torch.nn.utils.parametrize`` does), so its parameters, attributes
and state-dict names stay. It holds the packed weight as ``indices``/``codebook``/``row_sum``
buffers, computes with W_hat written into ``weight`` (which the MoE blocks also read), and
quantizes its input with the layer's activation spec before the routing logic runs: the same
arithmetic as a lookup-table kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from ..core.activations import ActQuantSpec, fake_quantize_activations
from ..core.format import CODEBOOK_DTYPE, CODEBOOK_SIZE, PackedWeight, check_group_size, padded_columns
from .registry import QuantizedModule, register_module_kind


@register_module_kind
class CodeQuantRouter(QuantizedModule):
    """routing(Q_act(x)) with the router's logits Q_act(x) W_hat^T (+ its bias), W_hat from the packed weight."""

    kind = "router"
    spec_keys = frozenset({"kind", "in_features", "out_features", "group_size", "bits", "act"})
    packed_parts = ("",)
    rebuilt_tensors = ("weight",)  # W_hat, rebuilt from the packed weight at load
    act: ActQuantSpec

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(fake_quantize_activations(hidden_states, self.act), *args, **kwargs)

    def spec(self, bits: int) -> dict:
        return {"kind": self.kind, "in_features": self.packed.in_features, "out_features": self.packed.out_features,
                "group_size": self.packed.group_size, "bits": bits, "act": dataclasses.asdict(self.act)}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device=None, replaced: nn.Module | None = None) -> "CodeQuantRouter":
        """``replaced`` (the model's router, whose routing logic is kept) turned into a CodeQuantRouter
        with zero packed buffers; ``dtype`` and ``device`` are the router's own."""
        shape = None if getattr(replaced, "weight", None) is None else tuple(replaced.weight.shape)
        if shape != (spec["out_features"], spec["in_features"]):
            raise ValueError(f"the router's weight has shape {shape}, the spec [{spec['out_features']}, {spec['in_features']}]")
        n, k = shape
        g = check_group_size(spec["group_size"], k)
        device = replaced.weight.device
        empty = PackedWeight(
            torch.zeros(n, padded_columns(k) // 2, dtype=torch.uint8, device=device),
            torch.zeros(n, k // g, CODEBOOK_SIZE, dtype=CODEBOOK_DTYPE, device=device),
            torch.zeros(n, dtype=torch.float32, device=device),
            k,
        )
        return _as_quantized_router(replaced, empty, ActQuantSpec(**spec["act"]))

    @classmethod
    def packed_layout(cls, spec: dict) -> dict[str, tuple[tuple[int, ...], int, int]]:
        return {"": ((spec["out_features"],), spec["in_features"], spec["group_size"])}

    def packed_weights(self) -> dict[str, PackedWeight]:
        return {"": self.packed}

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.indices, self.codebook, self.row_sum, self.weight.shape[-1])

    def set_packed(self, weight: PackedWeight) -> None:
        """Take a new packed weight of the same layout (a re-tuned codebook), in place."""
        if weight.indices.shape != self.indices.shape or weight.codebook.shape != self.codebook.shape:
            raise ValueError(f"the new packed weight has indices {tuple(weight.indices.shape)} and codebook {tuple(weight.codebook.shape)}, "
                             f"the router {tuple(self.indices.shape)} and {tuple(self.codebook.shape)}")
        with torch.no_grad():
            for part in ("indices", "codebook", "row_sum"):
                getattr(self, part).copy_(getattr(weight, part))
        self.finish_loading()

    def finish_loading(self) -> None:
        """weight = W_hat of the loaded packed weight."""
        with torch.no_grad():
            self.weight.data = self.packed.dequantize(torch.float32).to(self.weight.dtype)


@functools.cache
def _quantized_router_class(routing_class: type) -> type:
    """The CodeQuantRouter subclass of an architecture's router class."""
    return type(f"CodeQuant{routing_class.__name__}", (CodeQuantRouter, routing_class), {})


def _as_quantized_router(router: nn.Module, weight: PackedWeight, act: ActQuantSpec) -> CodeQuantRouter:
    if isinstance(router, CodeQuantRouter):
        raise ValueError("router is already quantized")
    router.__class__ = _quantized_router_class(type(router))
    router.register_buffer("indices", weight.indices.clone())
    router.register_buffer("codebook", weight.codebook.clone())
    router.register_buffer("row_sum", weight.row_sum.clone())
    router.act = act
    return router


def quantize_router(router: nn.Module, weight: PackedWeight, act: ActQuantSpec) -> CodeQuantRouter:
    """Turn ``router`` (an architecture's router module with a ``weight`` [E, H]) into a
    :class:`CodeQuantRouter` on ``weight``, in place."""
    router = _as_quantized_router(router, weight, act)
    router.finish_loading()
    return router
