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

:func:`fuse_routers` turns, the same way, every router whose forward is softmax top-k routing
(:data:`ROUTINGS`: Qwen2/3-MoE, OLMoE, Mixtral, DeepSeek-V2 greedy) into a :class:`FusedRouter`,
which runs its routing in one CUDA launch (:func:`codequant.kernels.route`) for decode batches
(up to :attr:`FusedRouter.max_tokens` tokens).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from .. import kernels
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
    if isinstance(router, FusedRouter):
        raise ValueError("router is fused: quantize it before fuse_routers")
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


# ---------------------------------------------------------------- routing in one CUDA launch

@dataclasses.dataclass(frozen=True)
class Routing:
    """Softmax top-k routing from the logits l = x W^T: p = softmax(l) in float32, the ``top_k``
    largest p (best first; ties to the lower expert index), divided by their sum when ``renorm``,
    times ``scale``. ``fp32_logits``: l in float32 (DeepSeek-V2's linear on upcast x and W), else
    in x's dtype; ``fp32_weights``: the routing weights in float32 (Mixtral, DeepSeek-V2), else in
    the logits' dtype (Qwen, OLMoE)."""

    top_k: int
    renorm: bool
    scale: float = 1.0
    fp32_logits: bool = False
    fp32_weights: bool = False


def _deepseek_v2(router: nn.Module) -> Routing | None:
    if router.topk_method != "greedy":  # group-limited greedy keeps the router's own forward
        return None
    return Routing(router.top_k, False, float(router.routed_scaling_factor), fp32_logits=True, fp32_weights=True)


# transformers' router classes whose forward is a Routing: class name -> the router's Routing (None: not one)
ROUTINGS = {
    "Qwen3MoeTopKRouter": lambda r: Routing(r.top_k, bool(r.norm_topk_prob)),
    "Qwen2MoeTopKRouter": lambda r: Routing(r.top_k, bool(r.norm_topk_prob)),
    "OlmoeTopKRouter": lambda r: Routing(r.top_k, bool(r.norm_topk_prob)),
    "MixtralTopKRouter": lambda r: Routing(r.top_k, True, fp32_weights=True),
    "DeepseekV2TopkRouter": _deepseek_v2,
}


def routing_of(router: nn.Module) -> Routing | None:
    """The :class:`Routing` of a transformers router class in :data:`ROUTINGS` (or a subclass), else None."""
    for cls in type(router).__mro__:
        if cls.__name__ in ROUTINGS and cls.__module__.startswith("transformers."):
            return ROUTINGS[cls.__name__](router)
    return None


class FusedRouter(nn.Module):
    """A router whose :class:`Routing` runs in one CUDA launch for batches of up to
    :attr:`max_tokens` tokens where :func:`codequant.kernels.route_supported` allows (16-bit x and
    weight, no autograd), else through the router's own forward. Returns what the router
    returns: (logits [T, E], routing weights [T, k], expert indices int64 [T, k], best first)."""

    routing: Routing
    # The kernel takes up to 16 tokens, but on an H100 it beat transformers' eager router only up to 4
    # (benchmarks/results/gpu-router-h100.json: 1 and 4 tokens 1.06-1.73x faster, 16 tokens
    # 0.43-0.77x: at most 8 blocks compute every logit); larger batches keep the router's own forward.
    max_tokens: int = 4

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.weight.shape[-1])
        r = self.routing
        if x.shape[0] > self.max_tokens or not kernels.route_supported(x, self.weight, r.top_k):
            return super().forward(hidden_states)
        if isinstance(self, CodeQuantRouter):  # the routing of Q_act(x), as its forward
            x = fake_quantize_activations(x, self.act)
        return kernels.route(x, self.weight, r.top_k, r.renorm, r.scale, r.fp32_logits, r.fp32_weights)


@functools.cache
def _fused_router_class(router_class: type) -> type:
    """The FusedRouter subclass of a router class."""
    return type(f"Fused{router_class.__name__}", (FusedRouter, router_class), {})


def fuse_routers(model: nn.Module) -> int:
    """Turn every router of ``model`` with a :class:`Routing` (:func:`routing_of`) into a
    :class:`FusedRouter`, in place (parameters and state-dict names stay); the number turned.
    Quantize routers first: a fused router is not quantized again."""
    n = 0
    for module in model.modules():
        routing = None if isinstance(module, FusedRouter) else routing_of(module)
        if routing is not None:
            module.__class__ = _fused_router_class(type(module))
            module.routing = routing
            n += 1
    return n
