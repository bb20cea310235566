"""The codequant method's quantized routers under vLLM: Q_act(x) W_hat^T in float32, on the packed weight."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from codequant import kernels  # noqa: E402
from codequant.core.activations import ActQuantSpec, fake_quantize_activations  # noqa: E402
from codequant.core.format import pack  # noqa: E402
from codequant.vllm.method import CodeQuantLinearMethod  # noqa: E402


@pytest.mark.parametrize("act", [ActQuantSpec(16, 0, 1.0), ActQuantSpec(4, 0, 1.0)], ids=["w4a16", "w4a4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_logits_are_the_fake_quantized_input_times_w_hat(act, dtype):
    experts, k = 64, 256
    g = torch.Generator().manual_seed(0)
    packed = pack(torch.randint(0, 16, (experts, k), generator=g), torch.randn(experts, 1, 16, generator=g) * 0.05)
    spec = {"kind": "router", "in_features": k, "out_features": experts, "group_size": k, "bits": 4, "act": dataclasses.asdict(act)}
    method = CodeQuantLinearMethod(["model.layers.0.mlp.gate"], [spec])
    layer = torch.nn.Module()
    method.create_weights(layer, k, [experts], k, experts, dtype)
    for name in ("indices", "codebook", "row_sum"):
        getattr(layer, name).data.copy_(getattr(packed, name))
    method.process_weights_after_loading(layer)

    x = torch.randn(5, k, generator=g).to(dtype)
    logits = method.apply(layer, x)
    assert logits.dtype == dtype and logits.shape == (5, experts)
    # transformers' CodeQuantRouter in float32: the fake-quantized input times W_hat (float32 summation order aside)
    ref = kernels.reference.dense_linear(x, packed.dequantize(torch.float32), act)
    exact = torch.nn.functional.linear(fake_quantize_activations(x.float(), act).double(), packed.dequantize(torch.float64))
    assert torch.allclose(logits.double(), exact, rtol=0, atol=1e-5 if dtype is torch.float32 else 2e-2)
    assert torch.allclose(logits.float(), ref.float(), rtol=0, atol=1e-5 if dtype is torch.float32 else 2e-2)
    if dtype is torch.float32:  # bf16 logits may tie
        assert torch.equal(logits.topk(8).indices, exact.topk(8).indices)
