"""The kernel dispatch table (codequant.kernels.dispatch): registration, selection, the
reference fallback (logged once, an error when strict) and the kernel options."""

from __future__ import annotations

import logging

import pytest
import torch

from codequant import kernels
from codequant.core.activations import ActQuantSpec
from codequant.kernels import Case, KernelFallbackError, KernelOptions, Op, kernel_options, options, select
from tests.helpers.packed import random_packed

W4A4 = ActQuantSpec(bits=4)
W4A12 = ActQuantSpec(bits=12)  # no fast kernel quantizes activations to 12 bits: the reference runs


def weight(n=8, k=64, seed=0):
    """A random packed weight, one codebook per row, entries N(0, 1)."""
    return random_packed(n, k, seed=seed, scale=1.0)


@pytest.fixture
def doubled():
    """A test implementation of linear: twice the reference, for float64 x only."""
    calls = []

    def linear(x, w, act, bias=None):
        calls.append(tuple(x.shape))
        return 2 * kernels.reference.linear(x, w, act, bias)

    kernels.register(Op.LINEAR, "doubled", linear, lambda case: case.x.dtype == torch.float64,
                     backend="test", device="cpu", priority=100)
    yield calls
    kernels.unregister(Op.LINEAR, "doubled")


def test_a_registered_implementation_runs_where_it_supports_the_call(doubled):
    w = weight()
    x = torch.randn(3, 64, dtype=torch.float64)
    assert select(Case(Op.LINEAR, x, w, W4A4)).name == "doubled"
    torch.testing.assert_close(kernels.linear(x, w, W4A4), 2 * kernels.reference.linear(x, w, W4A4))
    assert doubled == [(3, 64)]
    # a call it does not support goes on down the table
    x32 = x.float()
    assert select(Case(Op.LINEAR, x32, w, W4A4)).name != "doubled"
    kernels.linear(x32, w, W4A4)
    assert doubled == [(3, 64)]
    # the backend override: this family alone (and the reference), or never it
    assert select(Case(Op.LINEAR, x, w, W4A4), backend="test").name == "doubled"
    assert select(Case(Op.LINEAR, x32, w, W4A4), backend="test").name == "reference"
    with kernel_options(backend="reference"):
        assert select(Case(Op.LINEAR, x, w, W4A4)).name == "reference"


def test_the_online_hadamard_is_applied_once_by_the_caller_or_by_a_kernel_that_takes_it(doubled):
    from codequant.core.hadamard import block_hadamard

    w, x = weight(), torch.randn(3, 64, dtype=torch.float64)
    expect = 2 * kernels.reference.linear(block_hadamard(x, 16), w, W4A4)
    torch.testing.assert_close(kernels.linear(x, w, W4A4, hadamard_block=16), expect)  # "doubled" gets x H
    seen = []

    def fused(x, w, act, bias=None, hadamard_block=0):
        seen.append(hadamard_block)
        return 2 * kernels.reference.linear(block_hadamard(x, hadamard_block) if hadamard_block else x, w, act, bias)

    kernels.register(Op.LINEAR, "fused", fused, lambda case: case.x.dtype == torch.float64, backend="test", device="cpu",
                     priority=200, hadamard=True)
    try:
        torch.testing.assert_close(kernels.linear(x, w, W4A4, hadamard_block=16), expect)  # x itself, and the block
        torch.testing.assert_close(kernels.linear(x, w, W4A4), 2 * kernels.reference.linear(x, w, W4A4))
    finally:
        kernels.unregister(Op.LINEAR, "fused")
    assert seen == [16, 0]


def test_the_table_is_tried_by_priority(doubled):
    names = [k.name for k in kernels.implementations(Op.LINEAR)]
    assert names[0] == "doubled" and names[-1] == "reference"
    priorities = [k.priority for k in kernels.implementations(Op.LINEAR)]
    assert priorities == sorted(priorities, reverse=True)


def test_strict_mode_names_the_op_and_the_reason():
    x = torch.randn(2, 64)
    with kernel_options(strict=True), pytest.raises(KernelFallbackError) as info:
        kernels.linear(x, weight(), W4A12)
    message = str(info.value)
    assert message.startswith("linear: no kernel")
    assert "x (2, 64) torch.float32 on cpu" in message and "bits=12" in message
    if any(k.backend == "cpu" for k in kernels.implementations(Op.LINEAR)):
        assert "declined: cpu" in message
    # the reference asked for is no fallback
    with kernel_options(strict=True, backend="reference"):
        kernels.linear(x, weight(), W4A12)


def test_strict_mode_covers_moe():
    w_gu, w_dn = weight(16, 64, 1), weight(64, 8, 2)
    gate_up = type(w_gu)(w_gu.indices[None], w_gu.codebook[None], w_gu.row_sum[None], 64)
    down = type(w_dn)(w_dn.indices[None], w_dn.codebook[None], w_dn.row_sum[None], 8)
    x, idx, wts = torch.randn(3, 64), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with kernel_options(strict=True), pytest.raises(KernelFallbackError, match="^moe: no kernel"):
        kernels.moe(x, idx, wts, gate_up, down, W4A12, W4A12)


def test_the_fallback_is_logged_once_per_reason(caplog):
    w = weight(seed=5)
    x = torch.randn(2, 64, dtype=torch.float16)  # a dtype no other test falls back with: a fresh reason
    with caplog.at_level(logging.WARNING, logger="codequant.kernels"):
        for _ in range(3):
            kernels.linear(x, w, W4A12)
    records = [r for r in caplog.records if "running the reference implementation" in r.getMessage()]
    assert len(records) == 1
    assert records[0].getMessage().startswith("linear: no kernel")


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("CODEQUANT_BACKEND", "tpu")
    for make in (lambda: kernels.linear(torch.randn(1, 64), weight(), W4A4, backend="tpu"), lambda: KernelOptions(backend="tpu"),
                 KernelOptions.from_env):
        with pytest.raises(ValueError) as e:
            make()
        assert str(e.value) == "unknown kernel backend 'tpu' (known: ['cpu', 'gpu', 'reference'])"
    with pytest.raises(ValueError) as e:
        KernelOptions(gpu_w4a4_prefill="fp16")
    assert str(e.value) == "unknown gpu_w4a4_prefill 'fp16' (known: ['bf16', 'fp8'])"


def test_options_seed_from_the_environment_and_restore(monkeypatch):
    monkeypatch.setenv("CODEQUANT_BACKEND", "reference")
    monkeypatch.setenv("CODEQUANT_KERNELS_STRICT", "1")
    monkeypatch.setenv("CODEQUANT_GPU_W4A4_PREFILL", "fp8")
    monkeypatch.setenv("CODEQUANT_CUDA_PDL", "0")
    monkeypatch.setenv("CODEQUANT_CUDA_PROLOGUE_HADAMARD", "0")
    seeded = KernelOptions.from_env()
    assert seeded == KernelOptions(backend="reference", strict=True, gpu_w4a4_prefill="fp8", cuda_pdl=False,
                                   cuda_prologue_hadamard=False)
    before = options()
    with kernel_options(strict=True, cuda_gemv=False) as inside:
        assert inside.strict and not inside.cuda_gemv and options() is inside
    assert options() == before


def test_one_wave_warps_split_k():
    """One 16-row tile per block in one wave: a whole SM (16 warps) for rows of 16+ chunks of 128
    columns, else about 2 chunks per warp, in powers of two."""
    from codequant.kernels.gpu.cuda_gemv import one_wave_warps

    assert [one_wave_warps(k) for k in (2048, 4096, 14336)] == [16, 16, 16]
    assert [one_wave_warps(k) for k in (64, 256, 512, 768, 1024, 1536, 1920)] == [1, 1, 2, 4, 4, 8, 8]
