"""The codequant method's lm_head on the CPU: decode batches of bf16 logits through the project's
bf16 kernel, everything else as vLLM computes it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from codequant.kernels import cpu  # noqa: E402
from codequant.vllm.method import CpuLMHeadMethod  # noqa: E402


def test_cpu_lm_head_runs_decode_batches_on_the_kernel():
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(300, 64).bfloat16(), requires_grad=False)
    method = CpuLMHeadMethod()
    method.MIN_HEAD_BYTES = 0  # the rule for small heads is checked below
    method.process_weights_after_loading(layer)  # vLLM's own preparation, for everything but one row
    x = torch.randn(CpuLMHeadMethod.HEAD_ROWS, 64).bfloat16()
    y = method.apply(layer, x)
    assert torch.equal(y, cpu.linear_bf16(x, layer.weight))
    ref = torch.nn.functional.linear(x.double(), layer.weight.double())
    assert bool(((y.double() - ref).abs() <= 1e-4 * (x.double().abs() @ layer.weight.double().abs().T) + 2**-8 * ref.abs()).all())
    method.MIN_HEAD_BYTES = 2 * layer.weight.numel() + 1
    assert torch.equal(method.apply(layer, x), layer.cpu_linear(x, layer.weight, None))
    batch = torch.randn(CpuLMHeadMethod.HEAD_ROWS + 1, 64).bfloat16()
    assert torch.equal(method.apply(layer, batch), layer.cpu_linear(batch, layer.weight, None))
    assert torch.allclose(method.apply(layer, batch).float(), torch.nn.functional.linear(batch, layer.weight).float(), rtol=0.02, atol=0.05)
