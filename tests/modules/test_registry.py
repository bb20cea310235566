"""The module-kind registry (spec -> from_spec round trips, unknown kinds) and CodeQuantRouter."""

from __future__ import annotations

import copy

import pytest
import torch

from codequant.adapters import get_adapter
from codequant.core.activations import ActQuantSpec, fake_quantize_activations
from codequant.io.schema import CheckpointError, check_quantization_config
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.modules.norm import RMSNorm
from codequant.modules.registry import module_kind, module_kinds, quantized_modules
from codequant.modules.router import CodeQuantRouter, quantize_router

from tests.helpers.packed import ACT, quantize_tiny, random_uniform_packed, uniform_codebook
from tests.helpers.tiny_models import SUPPORTED_TINY, tiny_input_ids, tiny_model

MOE_TINY = [arch for arch in SUPPORTED_TINY if arch not in ("llama", "qwen3")]


def rebuilt(module, replaced=None):
    """The module built from its own spec, loaded with its own state."""
    new = module_kind(module.kind).from_spec(module.spec(4), torch.float32, replaced=replaced)
    new.load_state_dict(module.state_dict())
    new.finish_loading()
    return new


def old_quantized_router(router, weight, act):
    """A router quantized as before CodeQuantRouter: W_hat written into ``weight`` and an input pre-hook."""
    router = copy.deepcopy(router)
    with torch.no_grad():
        router.weight.data = weight.dequantize(torch.float32).to(router.weight.dtype)
    router.register_forward_pre_hook(lambda module, args: (fake_quantize_activations(args[0], act),) + tuple(args[1:]))
    return router


def test_every_kind_is_registered():
    assert set(module_kinds()) == {"linear", "experts", "router", "rms_norm"}
    assert module_kind("router") is CodeQuantRouter


def test_linear_round_trip():
    bias = torch.randn(48)
    module = CodeQuantLinear.from_packed(random_uniform_packed((48, 128), 0), bias, ACT, hadamard_block=16)
    x = torch.randn(5, 128)
    new = rebuilt(module)
    assert new.spec(4) == module.spec(4)
    assert torch.equal(new(x), module(x))


def test_experts_round_trip():
    gate_up, down = random_uniform_packed((4, 2 * 64, 128), 1), random_uniform_packed((4, 128, 64), 2)
    module = CodeQuantExperts.from_packed(gate_up, down, ACT, ActQuantSpec(bits=4), hadamard_block=0)
    h, idx, w = torch.randn(6, 128), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    new = rebuilt(module)
    assert new.spec(4) == module.spec(4) and new.spec(4)["activation"] == "silu"
    assert torch.equal(new(h, idx, w), module(h, idx, w))


def test_experts_from_spec_refuses_other_activations():
    spec = CodeQuantExperts(2, 64, 64).spec(4) | {"activation": "gelu"}
    with pytest.raises(ValueError, match="expert activation 'gelu', but the kernels compute 'silu' only"):
        CodeQuantExperts.from_spec(spec, torch.float32)


def test_rms_norm_round_trip():
    module = RMSNorm(64, 1e-5, bias=True)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = torch.randn(3, 64)
    assert torch.equal(rebuilt(module)(x), module(x))


@pytest.mark.parametrize("arch", MOE_TINY)
def test_router_round_trip(arch):
    model = tiny_model(arch, seed=1)
    adapter = get_adapter(model)
    layer = next(layer for layer in adapter.layers(model) if adapter.is_moe(layer))
    original = adapter.router(layer)
    router = quantize_router(copy.deepcopy(original), uniform_codebook(original.weight.data, 4, 32), ACT)
    new = rebuilt(router, replaced=copy.deepcopy(original))
    assert isinstance(new, type(original)) and isinstance(new, CodeQuantRouter)
    x = torch.randn(7, original.weight.shape[-1])
    for a, b in zip(new(x), router(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", MOE_TINY)
def test_router_module_gives_the_hooked_routers_logits(arch):
    """A model whose routers are CodeQuantRouters computes what the buffers-plus-pre-hook routers did."""
    model = tiny_model(arch, seed=2)
    adapter = get_adapter(model)
    reference = copy.deepcopy(model)
    for layer, ref_layer in zip(adapter.layers(model), adapter.layers(reference)):
        if adapter.is_moe(layer):
            weight = uniform_codebook(adapter.router(layer).weight.data, 4, 32)
            name = adapter.layout.mlp + "." + adapter.layout.router
            ref_layer.set_submodule(name, old_quantized_router(adapter.router(ref_layer), weight, ACT))
            quantize_router(adapter.router(layer), weight, ACT)
    ids = tiny_input_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_quantized_modules_finds_every_kind():
    model = quantize_tiny(tiny_model("qwen3_moe", seed=0))
    kinds = {m.kind for m in quantized_modules(model).values()}
    assert kinds == {"linear", "experts", "router"}


def test_unknown_kind_is_named():
    with pytest.raises(ValueError) as e:
        module_kind("conv")
    assert str(e.value) == "unknown quantized module kind 'conv' (known: ['experts', 'linear', 'rms_norm', 'router'])"
    with pytest.raises(CheckpointError, match="module model.layers.0.conv has unknown kind 'conv'"):
        check_quantization_config({"modules": {"model.layers.0.conv": {"kind": "conv"}}})


def test_router_cannot_be_quantized_twice():
    model = tiny_model("qwen3_moe", seed=0)
    router = model.model.layers[0].mlp.gate
    weight = uniform_codebook(router.weight.data, 4, 32)
    quantize_router(router, weight, ACT)
    with pytest.raises(ValueError, match="router is already quantized"):
        quantize_router(router, weight, ACT)
