"""MLA's kv_b_proj under the codequant method: the latent transform (run before vLLM's cache) and the dense
matrix vLLM folds into the query and output reproduce the project's kernel on the packed weight."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from tests.helpers.packed import ACT, DOWN_ACT, random_uniform_packed  # noqa: E402

from codequant import kernels  # noqa: E402
from codequant.core.activations import ActQuantSpec  # noqa: E402
from codequant.vllm.method import CodeQuantLatentMethod, kernel_matrix  # noqa: E402

NONE = ActQuantSpec(bits=16)


@pytest.mark.parametrize("act", [ACT, DOWN_ACT, NONE], ids=["W4A4-groups", "W4A4-token", "W4A16"])
@pytest.mark.parametrize("block", [0, 16])
def test_latent_transform_and_matrix_give_the_kernels_output(act, block):
    packed = random_uniform_packed((96, 128), seed=3)
    spec = {"kind": "linear", "act": dataclasses.asdict(act), "hadamard_block": block, "in_features": 128,
            "group_size": 32}
    method = CodeQuantLatentMethod(["model.layers.0.self_attn.kv_b_proj"], [spec])
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(0)) * 2
    latent, matrix = method.transform_latent(None, (), x), kernel_matrix(packed, act)
    expected = kernels.linear(x, packed, act, None, block)
    scale = latent.abs() @ matrix.abs().T  # float32 summation order differs
    assert bool(((torch.nn.functional.linear(latent, matrix) - expected).abs() <= 1e-6 * scale).all())
    cpu_kernel = kernels.select(kernels.Case(kernels.Op.LINEAR, x, packed, act)).backend == "cpu"
    if act.enabled and cpu_kernel:  # the kernel's matrix, not W_hat: the CPU kernels round the centroids to int8
        exact = torch.nn.functional.linear(latent, packed.dequantize(torch.float32))
        assert (exact - expected).abs().max() > 1e-3
