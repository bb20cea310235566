"""Lean decode steps: one kernel call per decoder layer at one token.

Between two layers' weight streams the caches are cold, and each of the ~40 torch ops and
module calls of a transformers decoder layer costs microseconds of Python and dispatch (about
a third of a CPU decode step of a Qwen3-30B-A3B-shaped W4A8 model). :class:`LeanDecoder`
runs a supported model's decode steps (batch 1, one new token, a DynamicCache) through
``_lut.decode_layer``: per layer, RMSNorm, the packed q/k/v projections, per-head q/k norms,
rotary embedding, the cache append, attention, the packed o projection, the residual add,
RMSNorm, the router (softmax top-k, its input fake-quantized for a CodeQuant router) and the
fused packed experts in C++, with transformers' bf16 rounding points. Everything else (prefill,
other cache types, masks with padding, float32 models, unsupported layers) runs transformers'
forward unchanged.

Supported: transformers' Qwen3-MoE and Mixtral models in bf16 whose four attention projections
are :class:`~codequant.modules.linear.CodeQuantLinear` (no bias; online Hadamard on o_proj
only), whose norms are transformers' RMSNorm and whose MoE blocks route (plain or
:class:`~codequant.modules.router.CodeQuantRouter` routers, either of them fused by
:func:`~codequant.modules.router.fuse_routers`) to
:class:`~codequant.modules.experts.CodeQuantExperts`.

The key/value cache stays a transformers ``DynamicCache``: its layers hold views of buffers
with room to grow (copied in once when a step finds other tensors there, e.g. after prefill),
so a step appends in place instead of concatenating.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import _cached_plan, _is_plain_rms_norm, _kernel_threads, _lut

CACHE_GROWTH = 256  # positions added to a layer's cache buffer when it is full


class Unsupported(ValueError):
    """The model (or one of its layers) is not one the lean decode step computes."""


@dataclasses.dataclass(frozen=True)
class _Family:
    """A decoder-layer class the lean step computes and how its router and attention differ."""

    model: type  # the base model class (its forward is replaced at decode steps)
    router: type  # the top-k softmax router class (a CodeQuantRouter subclasses it)
    qk_norm: bool  # per-head RMSNorm of q and k (Qwen3-MoE)
    round_weights: bool  # the top-k weights cast to the logits' dtype (Qwen3-MoE; Mixtral keeps float32)


@functools.cache
def _families() -> dict[type, _Family]:
    from transformers.models.mixtral import modeling_mixtral as mx
    from transformers.models.qwen3_moe import modeling_qwen3_moe as q3

    return {
        q3.Qwen3MoeDecoderLayer: _Family(q3.Qwen3MoeModel, q3.Qwen3MoeTopKRouter, qk_norm=True, round_weights=True),
        mx.MixtralDecoderLayer: _Family(mx.MixtralModel, mx.MixtralTopKRouter, qk_norm=False, round_weights=False),
    }


def _check_norm(norm, name: str) -> None:
    if not _is_plain_rms_norm(norm) or norm.weight.dtype is not torch.bfloat16:
        raise Unsupported(f"{name} is not a bf16 transformers RMSNorm")


class _Layer:
    """One decoder layer's prepared kernel call and its cache buffers."""

    def __init__(self, layer: torch.nn.Module, family: _Family, where: str, config):
        from ...modules.experts import CodeQuantExperts
        from ...modules.linear import CodeQuantLinear
        from ...modules.router import CodeQuantRouter, _fused_router_class, _quantized_router_class

        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if not all(isinstance(p, CodeQuantLinear) and p.bias is None for p in (q, k, v, o)) or any(p.hadamard_block for p in (q, k, v)):
            raise Unsupported(f"{where}: the attention projections are not CodeQuantLinear without bias (q/k/v without online Hadamard)")
        experts, router = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
        if not isinstance(experts, CodeQuantExperts):
            raise Unsupported(f"{where}: the MLP is not routed CodeQuantExperts")
        routers = (family.router, _quantized_router_class(family.router))
        routers += tuple(_fused_router_class(r) for r in routers)  # fuse_routers (after loading): the same routing
        if type(router) not in routers or router.weight.dtype is not torch.bfloat16:
            raise Unsupported(f"{where}: the router is not a bf16 {family.router.__name__}")
        qk = (attn.q_norm, attn.k_norm) if family.qk_norm else ()
        norms = (layer.input_layernorm, layer.post_attention_layernorm, *qk)
        for norm in norms:
            _check_norm(norm, f"{where}: a norm")
        hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
        if q.out_features != hq * d or k.out_features != hkv * d or getattr(attn, "sliding_window", None) is not None:
            raise Unsupported(f"{where}: sliding-window attention or projection widths other than the config's heads")
        rq = router.act if isinstance(router, CodeQuantRouter) and router.act.enabled else None
        plans = [_cached_plan(p.packed, p.act) for p in (q, k, v, o)]
        plans += [_cached_plan(experts.gate_up, experts.act), _cached_plan(experts.down, experts.down_act)]
        router_weight = router.weight.contiguous()
        self.held = (plans, router_weight)  # with the model's norms: every pointer of the capsule
        self.call = _lut.decode_layer_plan(
            *(plan[6] for plan in plans), *(n.weight.data_ptr() for n in norms[:2]),
            *((n.weight.data_ptr() for n in qk) if qk else (0, 0)), router_weight.data_ptr(),
            config.hidden_size, hq, hkv, d, router.num_experts, router.top_k,
            int(getattr(router, "norm_topk_prob", True)), int(family.round_weights), experts.hadamard_block, o.hadamard_block,
            rq.bits if rq else 16, rq.group_size if rq else 0, rq.clip if rq else 1.0,
            norms[0].variance_epsilon, qk[0].variance_epsilon if qk else 0.0, attn.scaling)
        self.shape = (hkv, d)
        self.keys = self.values = None  # [1, Hkv, capacity, D] buffers
        self.view = None  # the key view last given to the cache

    def cache(self, cache_layer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers holding the cache layer's ``length`` positions with room for one more."""
        if cache_layer.keys is not self.view or self.keys.shape[2] <= length:
            capacity = length + CACHE_GROWTH
            keys = cache_layer.keys.new_empty(1, *self.shape[:1], capacity, self.shape[1])
            values = torch.empty_like(keys)
            keys[:, :, :length] = cache_layer.keys
            values[:, :, :length] = cache_layer.values
            self.keys, self.values = keys, values
        return self.keys, self.values

    def publish(self, cache_layer, length: int) -> None:
        """Give the cache layer views of the first ``length`` positions."""
        cache_layer.keys = self.view = self.keys[:, :, :length]
        cache_layer.values = self.values[:, :, :length]


class LeanDecoder:
    """The lean decode step of a supported ``*ForCausalLM`` (see the module doc); raises
    :class:`Unsupported` with the reason for any other model. The weights must not change while
    it is in use (its kernel calls hold their pointers)."""

    def __init__(self, model: torch.nn.Module):
        base, config = getattr(model, "model", None), getattr(model, "config", None)
        layers = list(getattr(base, "layers", []))[: getattr(config, "num_hidden_layers", 0)]
        family = _families().get(type(layers[0])) if layers else None
        if family is None or type(base) is not family.model or any(type(layer) is not type(layers[0]) for layer in layers):
            raise Unsupported(f"{type(model).__name__}: the lean decode step covers Qwen3-MoE and Mixtral models")
        if next(model.parameters()).device.type != "cpu" or base.embed_tokens.weight.dtype is not torch.bfloat16:
            raise Unsupported("the lean decode step runs bf16 models on the CPU")
        _check_norm(base.norm, "the final norm")
        self.base = base
        self.layers = [_Layer(layer, family, f"layer {i}", config) for i, layer in enumerate(layers)]

    def step(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
             use_cache=None, **kwargs):
        """The base model's forward (Qwen3MoeModel, MixtralModel): lean at a single-token decode step, transformers' otherwise."""
        length = self._decode_length(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, kwargs)
        if length is None:
            return type(self.base).forward(self.base, input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=past_key_values,
                                           inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        from transformers.modeling_outputs import MoeModelOutputWithPast

        x = self.base.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.full((1, 1), length, dtype=torch.long)
        cos, sin = self.base.rotary_emb(x, position_ids)
        cos, sin = cos.contiguous(), sin.contiguous()
        threads = _kernel_threads(None)
        xp, cp, sp = x.data_ptr(), cos.data_ptr(), sin.data_ptr()
        for layer, cache_layer in zip(self.layers, past_key_values.layers):
            keys, values = layer.cache(cache_layer, length)
            _lut.decode_layer(layer.call, xp, cp, sp, keys.data_ptr(), values.data_ptr(), keys.shape[2], length, threads)
            layer.publish(cache_layer, length + 1)
        return MoeModelOutputWithPast(last_hidden_state=self.base.norm(x), past_key_values=past_key_values)

    def _decode_length(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, kwargs) -> int | None:
        """The cached length T when this call is a lean decode step, else None."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if (inputs_embeds is not None or input_ids is None or input_ids.shape != (1, 1) or type(cache) is not DynamicCache
                or len(cache.layers) != len(self.layers) or any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states", "output_router_logits"))
                or (torch.is_grad_enabled() and self.base.embed_tokens.weight.requires_grad)):
            return None
        length = cache.get_seq_length()
        for c in cache.layers:
            if type(c) is not DynamicLayer or not c.is_initialized or c.keys.dtype is not torch.bfloat16 or c.keys.shape[0] != 1 or c.keys.shape[2] != length:
                return None
        if length == 0:
            return None
        if attention_mask is not None and (attention_mask.shape != (1, length + 1) or not bool(attention_mask.all())):
            return None
        if position_ids is not None and (position_ids.shape != (1, 1) or int(position_ids) != length):
            return None
        return length
