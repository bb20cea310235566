"""The ops the quantized modules call, dispatched through one table (:mod:`.dispatch`).

Each implementation (the CUDA decode kernels, the prefill paths, the Triton kernels, the CPU
kernels, the reference) registers itself with :func:`register`: its :class:`Op`, a
``supports(case)`` predicate and a function with :mod:`codequant.kernels.reference`'s
signature. :func:`select` runs the first one that supports a call and falls back to the
reference, logged once per reason (an error under ``KernelOptions(strict=True)``).
``KernelOptions.backend`` (seeded from ``CODEQUANT_BACKEND=reference|cpu|gpu``) or the
``backend`` argument restricts the choice to one backend family.

:func:`linear` and :func:`moe` are what the quantized modules call. Under ``torch.compile``
they are the opaque custom ops ``codequant::linear`` and ``codequant::moe`` (shape-only fake
implementations), so Dynamo does not trace the backends' Python and Inductor fuses the
model code around them; in eager mode they call the backend directly (no op dispatch cost).
:func:`route` (the CUDA router kernel, custom op ``codequant::route``) is what fused MoE routers
call where :func:`route_supported` says so (:class:`codequant.modules.router.FusedRouter`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.format import PackedWeight
from ..core.activations import ActQuantSpec
from . import reference
from .dispatch import (  # noqa: F401  (the public names of the table)
    Case, Kernel, KernelFallbackError, KernelOptions, Op, implementations, kernel_options, options, register, select,
    set_options, unregister,
)

register(Op.LINEAR, "reference", reference.linear, lambda case: True, backend="reference", device=None, priority=-1000)
register(Op.MOE, "reference", reference.moe, lambda case: True, backend="reference", device=None, priority=-1000)


# ---------------------------------------------------------------- the ops the modules call

def linear(
    x: torch.Tensor,
    weight: PackedWeight,
    act: ActQuantSpec,
    bias: torch.Tensor | None = None,
    hadamard_block: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """y = Q_act(x H) W_hat^T + b in x's dtype; H is the online block Hadamard (0: none)."""
    if torch.compiler.is_compiling():
        return torch.ops.codequant.linear(x, weight.indices, weight.codebook, weight.row_sum, weight.in_features, bias,
                                          act.bits, act.group_size, act.clip, hadamard_block, backend)
    return _run_linear(x, weight, act, bias, hadamard_block, backend)


def moe(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: PackedWeight,
    down: PackedWeight,
    act: ActQuantSpec,
    down_act: ActQuantSpec,
    hadamard_block: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts on packed weights (:func:`reference.moe`'s contract), [T, H] in x's dtype."""
    if torch.compiler.is_compiling():
        return torch.ops.codequant.moe(x, top_k_index, top_k_weights, gate_up.indices, gate_up.codebook, gate_up.row_sum,
                                       gate_up.in_features, down.indices, down.codebook, down.row_sum, down.in_features,
                                       act.bits, act.group_size, act.clip, down_act.bits, down_act.group_size, down_act.clip,
                                       hadamard_block, backend)
    return _run_moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block, backend)


def _run_linear(x, weight, act, bias, hadamard_block, backend):
    kernel = select(Case(Op.LINEAR, x, weight, act), backend)
    if not hadamard_block:
        return kernel.fn(x, weight, act, bias)
    if kernel.hadamard:
        return kernel.fn(x, weight, act, bias, hadamard_block)
    from ..core.hadamard import block_hadamard

    return kernel.fn(block_hadamard(x, hadamard_block), weight, act, bias)


def _run_moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block, backend):
    case = Case(Op.MOE, x, gate_up, act, down, down_act, top_k_index, top_k_weights)
    return select(case, backend).fn(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block)


@torch.library.custom_op("codequant::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor, row_sum: torch.Tensor, in_features: int,
    bias: Optional[torch.Tensor], act_bits: int, act_group_size: int, act_clip: float, hadamard_block: int,
    backend: Optional[str],
) -> torch.Tensor:
    return _run_linear(x, PackedWeight(indices, codebook, row_sum, in_features), ActQuantSpec(act_bits, act_group_size, act_clip),
                       bias, hadamard_block, backend)


@_linear_op.register_fake
def _(x, indices, *args):
    return x.new_empty(*x.shape[:-1], indices.shape[-2])


@torch.library.custom_op("codequant::moe", mutates_args=())
def _moe_op(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_indices: torch.Tensor, gate_up_codebook: torch.Tensor, gate_up_row_sum: torch.Tensor, gate_up_in_features: int,
    down_indices: torch.Tensor, down_codebook: torch.Tensor, down_row_sum: torch.Tensor, down_in_features: int,
    act_bits: int, act_group_size: int, act_clip: float, down_act_bits: int, down_act_group_size: int, down_act_clip: float,
    hadamard_block: int, backend: Optional[str],
) -> torch.Tensor:
    gate_up = PackedWeight(gate_up_indices, gate_up_codebook, gate_up_row_sum, gate_up_in_features)
    down = PackedWeight(down_indices, down_codebook, down_row_sum, down_in_features)
    act, down_act = ActQuantSpec(act_bits, act_group_size, act_clip), ActQuantSpec(down_act_bits, down_act_group_size, down_act_clip)
    return _run_moe(x, top_k_index, top_k_weights, gate_up, down, act, down_act, hadamard_block, backend)


@_moe_op.register_fake
def _(x, top_k_index, top_k_weights, gate_up_indices, gate_up_codebook, gate_up_row_sum, gate_up_in_features, down_indices, *args):
    return x.new_empty(x.shape[0], down_indices.shape[-2])


# ---------------------------------------------------------------- the MoE router in one CUDA launch

@torch.compiler.assume_constant_result
def _cuda_router_on() -> bool:
    """The CUDA router kernel can run: the GPU kernels importable and on, the extension built
    (a constant of a compiled graph)."""
    try:
        from .gpu import cuda_gemv
    except ImportError:
        return False
    return cuda_gemv.enabled() and cuda_gemv.load() is not None


def route_supported(x: torch.Tensor, weight: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`route` takes x [T, H] against the router weight [E, H] (no autograd)."""
    if not x.is_cuda or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or not _cuda_router_on():
        return False
    from .gpu import cuda_gemv

    return cuda_gemv.route_supported(x, weight, top_k)


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int, renorm: bool, scale: float, fp32_logits: bool,
          fp32_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, weights, index) of softmax top-k routing in one launch (``cuda_gemv.route``'s contract)."""
    if torch.compiler.is_compiling():
        return torch.ops.codequant.route(x, weight, top_k, renorm, scale, fp32_logits, fp32_weights)
    from .gpu import cuda_gemv

    return cuda_gemv.route(x, weight, top_k, renorm, scale, fp32_logits, fp32_weights)


@torch.library.custom_op("codequant::route", mutates_args=())
def _route_op(x: torch.Tensor, weight: torch.Tensor, top_k: int, renorm: bool, scale: float, fp32_logits: bool,
              fp32_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .gpu import cuda_gemv

    return cuda_gemv.route(x, weight, top_k, renorm, scale, fp32_logits, fp32_weights)


@_route_op.register_fake
def _(x, weight, top_k, renorm, scale, fp32_logits, fp32_weights):
    t, e = x.shape[0], weight.shape[0]
    ldtype = torch.float32 if fp32_logits else x.dtype
    return (x.new_empty(t, e, dtype=ldtype), x.new_empty(t, top_k, dtype=torch.float32 if fp32_weights else ldtype),
            x.new_empty(t, top_k, dtype=torch.int64))
