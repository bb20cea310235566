"""The architecture adapter: where a decoder's norms, projections, router and experts live.

Every stage asks an :class:`ArchitectureAdapter` for modules and never looks at a model
name. An adapter is one :class:`Layout` (plain data: attribute names) plus generic code
that reads it. Module names returned are relative to the decoder layer (``quant_targets``,
``down_projections``) or to the model (``residual_readers``, ``residual_writers``).

Conventions for the residual stream (hidden size H):

- a *reader* weight has the stream on its last dim: nn.Linear [out, H], router [E, H],
  fused experts ``gate_up_proj`` [E, 2I, H], and the embedding table [V, H];
- a *writer* weight has the stream on dim -2: nn.Linear [H, in], experts ``down_proj``
  [E, H, I], with an optional bias [H].

Fused experts follow transformers 5: ``gate_up_proj`` [E, 2I, H] (gate rows first, then
up), ``down_proj`` [E, H, I], ``forward(hidden_states, top_k_index, top_k_weights)``.
Dense MLPs (and shared experts) are SwiGLU with ``gate_proj``, ``up_proj``, ``down_proj``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

TargetKind = Literal["linear", "router", "experts"]


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no adapter."""


@dataclass(frozen=True)
class QuantTarget:
    """One quantizable weight of a decoder layer.

    ``name`` is relative to the layer (``"self_attn.q_proj"``, ``"mlp.experts"``);
    ``kind`` says how to read ``module``: "linear" (nn.Linear ``weight`` [N, K]), "router"
    (``weight`` [E, H], the module keeps its routing logic), "experts" (fused 3-D
    ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]).
    """

    name: str
    kind: TargetKind
    module: nn.Module


@dataclass(frozen=True)
class StreamWeight:
    """A parameter that reads or writes the residual stream (see the module doc for dims).

    ``weight`` / ``bias`` name the attributes of ``module`` (``bias`` None: none, or the
    reader's bias, which is not on the stream). ``stream_dim`` is -1 for readers and the
    embedding, -2 for writers.
    """

    name: str
    module: nn.Module
    weight: str
    stream_dim: int
    bias: str | None = None

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.weight)

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        return getattr(self.module, self.bias) if self.bias else None


@dataclass(frozen=True)
class NormReaders:
    """A norm on the residual stream and every weight that reads its output."""

    name: str
    norm: nn.Module
    readers: list[StreamWeight]


@dataclass(frozen=True)
class ValueHeads:
    """Standard MHA/GQA value path of one layer: KV head j feeds query heads
    ``j * group .. (j+1) * group - 1`` (group = num_heads // num_kv_heads).

    v_proj rows ``[j*d, (j+1)*d)`` hold KV head j; o_proj columns ``[h*d, (h+1)*d)``
    read query head h. ``rotatable`` is False when something elementwise sits between
    v_proj and o_proj (OLMoE's ``clip_qkv``): channel permutations stay legal, rotations
    do not.
    """

    v_proj: nn.Linear
    o_proj: nn.Linear
    head_dim: int
    num_heads: int
    num_kv_heads: int
    rotatable: bool = True

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def v_rows(self, kv_head: int) -> slice:
        return slice(kv_head * self.head_dim, (kv_head + 1) * self.head_dim)

    def o_columns(self, kv_head: int) -> list[slice]:
        """The o_proj column blocks of every query head reading KV head ``kv_head``."""
        d = self.head_dim
        return [slice(h * d, (h + 1) * d) for h in range(kv_head * self.group, (kv_head + 1) * self.group)]


@dataclass(frozen=True)
class Layout:
    """Attribute names of one architecture (all relative, dotted paths allowed).

    Names listed in ``attention_readers`` that a layer lacks (or holds as None, as
    DeepSeek-V2 does for ``q_proj`` when ``q_lora_rank`` is set) are skipped.
    """

    model_type: str
    decoder: str = "model"  # the base model inside *ForCausalLM
    layers: str = "layers"
    embed_tokens: str = "embed_tokens"
    final_norm: str = "norm"
    rotary_emb: str = "rotary_emb"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    attention_readers: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attention_writer: str = "o_proj"
    value_heads: bool = True  # False for latent attention (MLA): no per-head v/o pairs
    value_clip_attr: str | None = None  # config attribute that clips v elementwise when set
    mlp: str = "mlp"
    router: str = "gate"  # inside the MoE block
    experts: str = "experts"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    swiglu: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    notes: tuple[str, ...] = field(default=())


def _get(module: nn.Module, path: str | None):
    """Dotted attribute lookup; None when any step is missing or None."""
    if path is None:
        return None
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class ArchitectureAdapter:
    """Generic adapter driven by a :class:`Layout`."""

    def __init__(self, layout: Layout):
        self.layout = layout

    @property
    def model_type(self) -> str:
        return self.layout.model_type

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout.model_type!r})"

    # -- model level -------------------------------------------------------------------
    def _prefix(self, *parts: str) -> str:
        return ".".join(p for p in parts if p)

    def decoder(self, model: nn.Module) -> nn.Module:
        return _get(model, self.layout.decoder)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(self.decoder(model), self.layout.layers)

    def layer_name(self, index: int) -> str:
        return self._prefix(self.layout.decoder, self.layout.layers, str(index))

    def embed_tokens(self, model: nn.Module) -> nn.Embedding:
        return _get(self.decoder(model), self.layout.embed_tokens)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get(self.decoder(model), self.layout.final_norm)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return _get(model, self.layout.lm_head)

    def rotary_emb(self, model: nn.Module) -> nn.Module:
        return _get(self.decoder(model), self.layout.rotary_emb)

    def hidden_size(self, model: nn.Module) -> int:
        return self.embed_tokens(model).weight.shape[-1]

    def layer_kwargs(self, model: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None, layer_idx: int = 0) -> dict:
        """Keyword arguments to run decoder layer ``layer_idx`` on its own::

            out = adapter.layers(model)[i](h, **adapter.layer_kwargs(model, h, position_ids, i))

        ``h`` is [B, S, H] (the residual stream entering the layer), ``out`` the stream
        leaving it. Gives the rotary ``position_embeddings`` (whatever the architecture's
        rotary module returns: (cos, sin), or DeepSeek's complex ``freqs_cis``), the causal
        ``attention_mask`` for the layer's attention type (sliding or full, in the model's
        attention implementation; None where the implementation is causal by itself),
        ``position_ids`` ([1, S] by default) and ``use_cache=False``.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = model.config
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        layer_types = getattr(config, "layer_types", None)
        sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = make_mask(config=config, inputs_embeds=hidden_states, attention_mask=None, past_key_values=None, position_ids=position_ids)
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary_emb(model)(hidden_states, position_ids=position_ids),
            "past_key_values": None,
            "use_cache": False,
        }

    # -- layer level -------------------------------------------------------------------
    def input_norm(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.layout.input_norm)

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.layout.post_attention_norm)

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.layout.attention)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.layout.mlp)

    def is_moe(self, layer: nn.Module) -> bool:
        """True for a routed-experts layer (DeepSeek's first_k_dense_replace layers and
        Qwen's mlp_only_layers are dense)."""
        return self.experts(layer) is not None

    def router(self, layer: nn.Module) -> nn.Module | None:
        return _get(self.mlp(layer), self.layout.router) if self.is_moe(layer) else None

    def experts(self, layer: nn.Module) -> nn.Module | None:
        experts = _get(self.mlp(layer), self.layout.experts)
        return experts if experts is not None and hasattr(experts, "gate_up_proj") else None

    def shared_expert(self, layer: nn.Module) -> nn.Module | None:
        return _get(self.mlp(layer), self.layout.shared_expert) if self.is_moe(layer) else None

    def shared_expert_gate(self, layer: nn.Module) -> nn.Linear | None:
        return _get(self.mlp(layer), self.layout.shared_expert_gate) if self.is_moe(layer) else None

    def swiglu_mlps(self, layer: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name relative to the layer, module) of every dense SwiGLU MLP: the dense MLP of
        a dense layer, or the shared expert of an MoE layer."""
        lay = self.layout
        if self.is_moe(layer):
            shared = self.shared_expert(layer)
            return [] if shared is None else [(self._prefix(lay.mlp, lay.shared_expert), shared)]
        return [(lay.mlp, self.mlp(layer))]

    def _attention_linears(self, layer: nn.Module, names) -> list[tuple[str, nn.Linear]]:
        attn = self.attention(layer)
        return [(self._prefix(self.layout.attention, n), m) for n in names if (m := _get(attn, n)) is not None]

    def attention_readers(self, layer: nn.Module) -> list[tuple[str, nn.Linear]]:
        """The attention linears that read the input norm's output."""
        return self._attention_linears(layer, self.layout.attention_readers)

    def mlp_readers(self, layer: nn.Module) -> list[StreamWeight]:
        """Every weight that reads the post-attention norm's output (relative names)."""
        lay, gate, up, _ = self.layout, *self.layout.swiglu
        out = []
        if self.is_moe(layer):
            out.append(StreamWeight(self._prefix(lay.mlp, lay.router), self.router(layer), "weight", -1, _bias_name(self.router(layer))))
            out.append(StreamWeight(self._prefix(lay.mlp, lay.experts), self.experts(layer), "gate_up_proj", -1))
            if (g := self.shared_expert_gate(layer)) is not None:
                out.append(StreamWeight(self._prefix(lay.mlp, lay.shared_expert_gate), g, "weight", -1, _bias_name(g)))
        for name, mlp in self.swiglu_mlps(layer):
            for proj in (gate, up):
                m = getattr(mlp, proj)
                out.append(StreamWeight(self._prefix(name, proj), m, "weight", -1, _bias_name(m)))
        return out

    def layer_writers(self, layer: nn.Module) -> list[StreamWeight]:
        """Every weight that writes the residual stream (relative names)."""
        lay, down = self.layout, self.layout.swiglu[2]
        o = _get(self.attention(layer), lay.attention_writer)
        out = [StreamWeight(self._prefix(lay.attention, lay.attention_writer), o, "weight", -2, _bias_name(o))]
        if self.is_moe(layer):
            out.append(StreamWeight(self._prefix(lay.mlp, lay.experts), self.experts(layer), "down_proj", -2))
        for name, mlp in self.swiglu_mlps(layer):
            m = getattr(mlp, down)
            out.append(StreamWeight(self._prefix(name, down), m, "weight", -2, _bias_name(m)))
        return out

    def residual_readers(self, model: nn.Module, layers: Collection[int] | None = None, head: bool = True) -> list[NormReaders]:
        """Every residual-stream norm (two per layer, then the final norm) with its readers;
        names relative to the model. ``layers``: only these decoder layers (None: all);
        ``head``: include the final norm and lm_head."""
        out = []
        for i, layer in enumerate(self.layers(model)):
            if layers is not None and i not in layers:
                continue
            pre = self.layer_name(i)
            attn = [StreamWeight(f"{pre}.{n}", m, "weight", -1, _bias_name(m)) for n, m in self.attention_readers(layer)]
            mlp = [_renamed(w, f"{pre}.{w.name}") for w in self.mlp_readers(layer)]
            out.append(NormReaders(f"{pre}.{self.layout.input_norm}", self.input_norm(layer), attn))
            out.append(NormReaders(f"{pre}.{self.layout.post_attention_norm}", self.post_attention_norm(layer), mlp))
        if head:
            lm_head = self.lm_head(model)
            out.append(
                NormReaders(
                    self._prefix(self.layout.decoder, self.layout.final_norm),
                    self.final_norm(model),
                    [StreamWeight(self.layout.lm_head, lm_head, "weight", -1, _bias_name(lm_head))],
                )
            )
        return out

    def residual_writers(self, model: nn.Module, layers: Collection[int] | None = None, embedding: bool = True) -> list[StreamWeight]:
        """The embedding table (stream on its last dim; with ``embedding``) and the writers of
        every layer (of ``layers`` only, when given)."""
        emb = StreamWeight(self._prefix(self.layout.decoder, self.layout.embed_tokens), self.embed_tokens(model), "weight", -1)
        out = [emb] if embedding else []
        for i, layer in enumerate(self.layers(model)):
            if layers is not None and i not in layers:
                continue
            out += [_renamed(w, f"{self.layer_name(i)}.{w.name}") for w in self.layer_writers(layer)]
        return out

    def value_heads(self, layer: nn.Module, config) -> ValueHeads | None:
        """The v_proj/o_proj pairs per KV head, or None for latent attention (MLA)."""
        if not self.layout.value_heads:
            return None
        attn = self.attention(layer)
        clip = getattr(config, self.layout.value_clip_attr, None) if self.layout.value_clip_attr else None
        return ValueHeads(
            v_proj=attn.v_proj,
            o_proj=_get(attn, self.layout.attention_writer),
            head_dim=attn.head_dim,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            rotatable=clip is None,
        )

    def quant_targets(self, layer: nn.Module) -> list[QuantTarget]:
        """Every quantizable weight of the layer: attention linears, the router, the fused
        experts, shared experts and their gate, or the dense MLP (names relative to it)."""
        lay = self.layout
        out = [QuantTarget(n, "linear", m) for n, m in _linears(self.attention(layer), lay.attention)]
        if self.is_moe(layer):
            router, experts = self.router(layer), self.experts(layer)
            out.append(QuantTarget(self._prefix(lay.mlp, lay.router), "router", router))
            out.append(QuantTarget(self._prefix(lay.mlp, lay.experts), "experts", experts))
            skip = {id(router), id(experts)}
            out += [QuantTarget(n, "linear", m) for n, m in _linears(self.mlp(layer), lay.mlp) if id(m) not in skip]
        else:
            out += [QuantTarget(n, "linear", m) for n, m in _linears(self.mlp(layer), lay.mlp)]
        return out

    def down_projections(self, layer: nn.Module) -> list[QuantTarget]:
        """Linears (and fused experts, via ``down_proj``) whose input is an MLP's
        intermediate activation: the places of the online Hadamard."""
        lay, down = self.layout, self.layout.swiglu[2]
        out = []
        if self.is_moe(layer):
            out.append(QuantTarget(self._prefix(lay.mlp, lay.experts), "experts", self.experts(layer)))
        for name, mlp in self.swiglu_mlps(layer):
            out.append(QuantTarget(self._prefix(name, down), "linear", getattr(mlp, down)))
        return out


def _bias_name(module: nn.Module) -> str | None:
    return "bias" if getattr(module, "bias", None) is not None else None


def _renamed(w: StreamWeight, name: str) -> StreamWeight:
    return StreamWeight(name, w.module, w.weight, w.stream_dim, w.bias)


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    return [(f"{prefix}.{n}", m) for n, m in module.named_modules() if n and isinstance(m, nn.Linear)] if module is not None else []
