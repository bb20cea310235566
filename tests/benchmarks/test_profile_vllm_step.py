"""profile_vllm_step: the kernel time it reads from a profile, and one decode token as the difference of two runs."""

import cProfile

import pytest
import torch

from benchmarks.common import random_packed
from benchmarks.profile_vllm_step import kernel_times, per_token
from codequant import kernels
from codequant.core.activations import ActQuantSpec

pytest.importorskip("codequant.kernels.cpu", reason="CPU kernels not built")


def test_kernel_times_counts_calls_of_the_cpu_kernels():
    weight = random_packed((), 64, 256, "cpu", torch.Generator().manual_seed(0))
    x = torch.randn(1, 256)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        kernels.linear(x, weight, ActQuantSpec(16), backend="cpu")
    profile.disable()
    times = kernel_times(profile)
    assert times["run"][1] == 3
    assert times["run"][0] > 0


def test_per_token_is_the_difference_of_the_two_generations():
    short = (0.010, {"run": (0.004, 2)})
    long = (0.110, {"run": (0.064, 22), "moe": (0.020, 20)})
    row = per_token(short, long, tokens=10)
    assert row["step_ms"] == pytest.approx(10.0)
    assert row["kernels"]["run"] == {"ms": 6.0, "calls": 2.0}
    assert row["kernels"]["moe"] == {"ms": 2.0, "calls": 2.0}
    assert row["kernels_ms"] == pytest.approx(8.0)
    assert row["outside_ms"] == pytest.approx(2.0)
