"""Architecture adapters on tiny random instances of the real transformers classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from codequant.adapters import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, get_adapter
from tests.helpers.errors import max_rel_err
from tests.helpers.limits import LOGITS_SAME_COMPUTATION
from tests.helpers.tiny_models import SUPPORTED_TINY, TINY_VARIANTS, tiny_input_ids, tiny_model

ALL_TINY = SUPPORTED_TINY + TINY_VARIANTS
MOE = {"deepseek_v2", "deepseek_v2_q_lora", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"}


def test_supported_architectures_listed():
    assert list(SUPPORTED_ARCHITECTURES) == sorted(SUPPORTED_TINY)


def test_unsupported_architecture_message():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(model)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "unsupported architecture 'gpt2' (GPT2LMHeadModel); "
        "CodeQuant supports: deepseek_v2, llama, mixtral, olmoe, phimoe, qwen2_moe, qwen3, qwen3_moe"
    )


@pytest.mark.parametrize("arch", ALL_TINY)
def test_layers_run_standalone(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    assert adapter.model_type == model.config.model_type
    ids = tiny_input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        h = adapter.embed_tokens(model)(ids)
        position_ids = torch.arange(ids.shape[1])[None]
        for i, layer in enumerate(adapter.layers(model)):
            h = layer(h, **adapter.layer_kwargs(model, h, position_ids, layer_idx=i))
        logits = adapter.lm_head(model)(adapter.final_norm(model)(h))
    assert max_rel_err(logits, ref) <= LOGITS_SAME_COMPUTATION  # layers run one by one


@pytest.mark.parametrize("arch", ALL_TINY)
def test_quant_targets_cover_every_weight(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        targets = adapter.quant_targets(layer)
        names = [t.name for t in targets]
        assert len(names) == len(set(names))
        covered = set()
        for t in targets:
            assert layer.get_submodule(t.name) is t.module
            if t.kind == "experts":
                assert t.module.gate_up_proj.ndim == 3 and t.module.down_proj.ndim == 3
            else:
                assert t.module.weight.ndim == 2
            covered |= {id(p) for p in t.module.parameters()}
        norms = {id(p) for n, m in layer.named_modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
        every = {id(p) for p in layer.parameters()}
        assert every - norms == covered  # every weight but the norms' scales is a target
        kinds = [t.kind for t in targets]
        assert kinds.count("router") == kinds.count("experts") == int(adapter.is_moe(layer))


@pytest.mark.parametrize("arch", ALL_TINY)
def test_layer_structure(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    config = model.config
    layers = list(adapter.layers(model))
    moe = [adapter.is_moe(layer) for layer in layers]
    if arch.startswith("deepseek_v2"):
        assert moe == [False, True]  # first_k_dense_replace = 1
    else:
        assert moe == [arch in MOE] * len(layers)
    for layer, is_moe in zip(layers, moe):
        router, experts = adapter.router(layer), adapter.experts(layer)
        if is_moe:
            e, hidden = router.weight.shape
            assert hidden == config.hidden_size
            assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == e
        else:
            assert router is None and experts is None
        has_shared = is_moe and (arch == "qwen2_moe" or arch.startswith("deepseek_v2"))
        assert (adapter.shared_expert(layer) is not None) == has_shared
        assert (adapter.shared_expert_gate(layer) is not None) == (is_moe and arch == "qwen2_moe")
        n_down = int(is_moe) + len(adapter.swiglu_mlps(layer))
        assert len(adapter.down_projections(layer)) == n_down == (2 if has_shared else 1)
        heads = adapter.value_heads(layer, config)
        if arch.startswith("deepseek_v2"):
            assert heads is None
        else:
            assert heads.v_proj.out_features == heads.num_kv_heads * heads.head_dim
            assert heads.o_proj.in_features == heads.num_heads * heads.head_dim
            assert sum(len(heads.o_columns(j)) for j in range(heads.num_kv_heads)) == heads.num_heads
        readers = [n for n, _ in adapter.attention_readers(layer)]
        if arch == "deepseek_v2":
            assert readers == ["self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"]
        elif arch == "deepseek_v2_q_lora":
            assert readers == ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"]
        else:
            assert readers == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("arch", ALL_TINY)
def test_residual_readers_and_writers(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    hidden = model.config.hidden_size
    groups = adapter.residual_readers(model)
    assert len(groups) == 2 * model.config.num_hidden_layers + 1
    for g in groups:
        assert model.get_submodule(g.name) is g.norm
        for r in g.readers:
            assert model.get_submodule(r.name) is r.module
            assert r.stream_dim == -1 and r.tensor.shape[-1] == hidden
    writers = adapter.residual_writers(model)
    assert writers[0].module is adapter.embed_tokens(model) and writers[0].tensor.shape[-1] == hidden
    for w in writers[1:]:
        assert model.get_submodule(w.name) is w.module
        assert w.stream_dim == -2 and w.tensor.shape[-2] == hidden
    reader_ids = {id(r.tensor) for g in groups for r in g.readers}
    layer_linears = {id(m.weight) for m in model.model.layers.modules() if isinstance(m, nn.Linear)}
    writer_ids = {id(w.tensor) for w in writers}
    # Linears on neither side are inside attention (q_b_proj, kv_b_proj) only.
    inner = {id(m.weight) for n, m in model.model.layers.named_modules() if n.endswith(("q_b_proj", "kv_b_proj"))}
    assert layer_linears - reader_ids - writer_ids == inner


@pytest.mark.parametrize("arch", sorted(MOE - {"deepseek_v2_q_lora"}))
def test_tiny_moe_routes_to_many_experts(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    used = {}
    hooks = [
        adapter.experts(layer).register_forward_hook(lambda m, args, out, i=i: used.__setitem__(i, args[1].unique().numel()))
        for i, layer in enumerate(adapter.layers(model))
        if adapter.is_moe(layer)
    ]
    with torch.no_grad():
        model(tiny_input_ids())
    for h in hooks:
        h.remove()
    assert used and all(n >= 5 for n in used.values()), used
