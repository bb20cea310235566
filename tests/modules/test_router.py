"""fuse_routers: which routers it fuses, with which Routing, and that off CUDA (or for calls the
CUDA kernel does not take) a fused router is the router itself. The kernel: tests/kernels/test_cuda_router.py."""

from __future__ import annotations

import pytest
import torch

from codequant.core.activations import ActQuantSpec
from codequant.modules.router import FusedRouter, Routing, fuse_routers, quantize_router, routing_of
from tests.helpers.packed import random_uniform_packed
from tests.helpers.tiny_models import SUPPORTED_TINY, tiny_input_ids, tiny_model

# MoE layers of the tiny models whose routing is softmax top-k (PhiMoE's sparsemixer is not)
FUSED = {"deepseek_v2": 1, "llama": 0, "mixtral": 2, "olmoe": 2, "phimoe": 0, "qwen2_moe": 2, "qwen3": 0, "qwen3_moe": 2}


@pytest.mark.parametrize("arch", SUPPORTED_TINY)
def test_fused_model_gives_the_same_outputs_off_cuda(arch):
    model = tiny_model(arch)
    ids = tiny_input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        assert fuse_routers(model) == FUSED[arch]
        assert fuse_routers(model) == 0  # already fused
        keys = set(model.state_dict())
        out = model(ids).logits
    assert torch.equal(out, ref)
    assert set(model.state_dict()) == keys


def test_routings_follow_the_routers():
    assert routing_of(tiny_model("qwen3_moe").model.layers[0].mlp.gate) == Routing(2, True)
    assert routing_of(tiny_model("mixtral").model.layers[0].mlp.gate) == Routing(2, True, fp32_weights=True)
    gate = tiny_model("deepseek_v2", routed_scaling_factor=2.5).model.layers[1].mlp.gate
    assert routing_of(gate) == Routing(2, False, 2.5, fp32_logits=True, fp32_weights=True)
    grouped = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=1).model.layers[1].mlp.gate
    assert routing_of(grouped) is None
    assert routing_of(torch.nn.Linear(4, 4)) is None


def test_quantized_routers_fuse_and_fused_ones_do_not_quantize():
    gate = tiny_model("qwen3_moe").model.layers[0].mlp.gate
    x = torch.randn(5, 64)
    quantize_router(gate, random_uniform_packed((8, 64), 0), ActQuantSpec(bits=4, group_size=32))
    with torch.no_grad():
        ref = gate(x)
        fuse_routers(gate)
        assert isinstance(gate, FusedRouter)
        out = gate(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    other = tiny_model("qwen3_moe").model.layers[0].mlp.gate
    fuse_routers(other)
    with pytest.raises(ValueError, match="fused"):
        quantize_router(other, random_uniform_packed((8, 64), 0), ActQuantSpec(bits=16))
