"""q/k/v projections as one packed linear.

When q_proj, k_proj and v_proj of an attention block are :class:`CodeQuantLinear` with one input
transform (K, online Hadamard block, activation spec, codebook groups, bias or none), then
    [q | k | v] = Q_act(x H) [W_q; W_k; W_v]^T + [b_q; b_k; b_v],
one CodeQuantLinear on the packed weights concatenated along rows (indices, per-row codebooks,
row sums): each output row reads only its own weight row and the shared Q_act(x H), so q, k and v
are the three projections' outputs (up to the order in which a kernel sums over K). On CUDA that
is one GEMV launch instead of three, and for W4A4 one quantization of x instead of three.

:func:`fuse_qkv` does this, in place, for the attention classes of :data:`QKV_ATTENTIONS`: the
block becomes a :class:`FusedQKV` (a subclass of both, as :func:`~.router.fuse_routers` does)
whose forward runs the fused linear ``qkv_proj`` and hands [q | k | v] to the block's own forward
in place of ``hidden_states``; q_proj, k_proj and v_proj become :class:`QKVSlice` modules that
take their columns of it. Checkpoints keep the three projections apart: the fusion happens after
a checkpoint loads on CUDA (:mod:`codequant.io.hf_quantizer`), and a fused model is not saved.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..core.format import PackedWeight
from .linear import CodeQuantLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj")

# transformers' attention classes whose forward reads hidden_states only as the input of q_proj,
# k_proj and v_proj and for its leading dims (transformers 5.17); DeepSeek-V2's latent attention
# has no k_proj / v_proj and is not fused
QKV_ATTENTIONS = frozenset({
    "LlamaAttention", "MixtralAttention", "OlmoeAttention", "PhimoeAttention", "Qwen2MoeAttention", "Qwen3Attention",
    "Qwen3MoeAttention",
})


class QKVSlice(nn.Module):
    """q_proj, k_proj or v_proj of a :class:`FusedQKV` block: columns [start, stop) of [q | k | v]."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of qkv_proj"


class FusedQKV(nn.Module):
    """An attention block whose q, k, v come from one CodeQuantLinear ``qkv_proj`` (see the module doc)."""

    qkv_proj: CodeQuantLinear

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(self.qkv_proj(hidden_states), *args, **kwargs)


@functools.cache
def _fused_class(attention_class: type) -> type:
    """The FusedQKV subclass of an attention class."""
    return type(f"FusedQKV{attention_class.__name__}", (FusedQKV, attention_class), {})


def _is_qkv_attention(module: nn.Module) -> bool:
    return any(c.__name__ in QKV_ATTENTIONS and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def _input_transform(linear: nn.Module):
    """What CodeQuantLinears must share for their rows to be concatenated: K, online Hadamard block,
    activation spec, backend, codebook groups, bias dtype (or none), device; None: not one."""
    if not isinstance(linear, CodeQuantLinear):
        return None
    bias = None if linear.bias is None else linear.bias.dtype
    return (linear.in_features, linear.hadamard_block, linear.act, linear.backend, linear.codebook.shape[1:], bias,
            linear.indices.device)


def concat_rows(linears: list[CodeQuantLinear]) -> CodeQuantLinear:
    """One CodeQuantLinear whose rows are those of ``linears`` in order (one input transform)."""
    first = linears[0]
    packed = PackedWeight(*(torch.cat([getattr(m, part) for m in linears]) for part in ("indices", "codebook", "row_sum")),
                          first.in_features)
    bias = None if first.bias is None else torch.cat([m.bias for m in linears])
    fused = CodeQuantLinear.from_packed(packed, bias, first.act, first.hadamard_block)
    fused.backend = first.backend
    return fused


def fuse_qkv(model: nn.Module, device_type: str | None = "cuda") -> int:
    """Turn every attention block of ``model`` of a :data:`QKV_ATTENTIONS` class whose q_proj,
    k_proj and v_proj are CodeQuantLinears with one input transform, on ``device_type`` (None: any),
    into a :class:`FusedQKV`, in place; the number turned. Only CUDA by default: the CPU decode
    step computes the three projections in one job of its own."""
    n = 0
    for module in list(model.modules()):
        if isinstance(module, FusedQKV) or not _is_qkv_attention(module):
            continue
        projections = [getattr(module, name, None) for name in PROJECTIONS]
        transform = _input_transform(projections[0])
        if transform is None or any(_input_transform(p) != transform for p in projections[1:]):
            continue
        if device_type is not None and projections[0].indices.device.type != device_type:
            continue
        module.qkv_proj = concat_rows(projections)
        start = 0
        for name, p in zip(PROJECTIONS, projections):
            setattr(module, name, QKVSlice(start, start + p.out_features))
            start += p.out_features
        module.__class__ = _fused_class(type(module))
        n += 1
    return n
