"""Quantized routers.

A router is an E x H matrix (E experts): under 0.1% of an MoE layer's weights, and each
architecture wraps it in its own routing logic (softmax, top-k, group limits). CodeQuant
keeps the router module and its logic, quantizes its weight to a codebook (kept as
``indices``/``codebook``/``row_sum`` buffers, the packed format), computes with W_hat
written into ``weight``, and quantizes the router's input with the layer's activation
spec through a forward pre-hook: the same arithmetic as a lookup-table kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.format import PackedWeight
from ..core.activations import ActQuantSpec, fake_quantize_activations


def _quantize_input(module: nn.Module, args):
    return (fake_quantize_activations(args[0], module.codequant_act),) + tuple(args[1:])


def quantize_router(router: nn.Module, weight: PackedWeight, act: ActQuantSpec) -> nn.Module:
    """Turn ``router`` (any module with a ``weight`` [E, H]) into a CodeQuant router, in place."""
    if is_quantized_router(router):
        raise ValueError("router is already quantized")
    router.register_buffer("indices", weight.indices.clone())
    router.register_buffer("codebook", weight.codebook.clone())
    router.register_buffer("row_sum", weight.row_sum.clone())
    router.codequant_act = act
    with torch.no_grad():
        router.weight.data = weight.dequantize(torch.float32).to(router.weight.dtype)
    router.register_forward_pre_hook(_quantize_input)
    return router


def router_packed(router: nn.Module) -> PackedWeight:
    return PackedWeight(router.indices, router.codebook, router.row_sum, router.weight.shape[-1])


def is_quantized_router(module: nn.Module) -> bool:
    return hasattr(module, "codequant_act")
