"""The CUDA C++ W4A16 decode kernel (src/codequant/kernels/gpu/cuda_gemv.py, csrc/cuda/) against
the reference path at real sizes. Skipped without CUDA. Errors are relative Frobenius errors."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from codequant.format import pack  # noqa: E402
from codequant.kernels import reference  # noqa: E402
from codequant.kernels.gpu import cuda_gemv, ops  # noqa: E402
from codequant.quantizers.activations import ActQuantSpec  # noqa: E402

W4A16 = ActQuantSpec(bits=16)
LIMIT = 1e-2


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflow)"
    return ((y - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def random_packed(n, k, groups=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, 16, (n, k), generator=g, device="cuda")
    cb = torch.randn(n, groups, 16, generator=g, device="cuda") * 0.05
    return pack(idx, cb)


def run_kernel(x, w, bias=None):
    y = torch.full((x.shape[0], w.out_features), float("nan"), dtype=x.dtype, device="cuda")
    assert cuda_gemv.linear(x, w, bias, y), "CUDA decode kernel did not run"
    return y


def test_builds():
    assert cuda_gemv.load() is not None


@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (1000, 1416), (300, 200), (17, 64)])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 9, 16])
def test_matches_reference_bf16(n, k, m):
    w = random_packed(n, k, seed=n + k + m)
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    y = run_kernel(x, w)
    ref = reference.linear(x.float(), w, W4A16)
    assert rel_err(y, ref) < LIMIT


@pytest.mark.parametrize("n,k,groups", [(4096, 4096, 32), (1024, 1344, 7), (512, 4096, 64), (4096, 14336, 112)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_grouped_codebooks(n, k, groups, m):
    w = random_packed(n, k, groups, seed=n + k + m + groups)
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    y = run_kernel(x, w)
    ref = reference.linear(x.float(), w, W4A16)
    assert rel_err(y, ref) < LIMIT


@pytest.mark.parametrize("dtype,limit", [(torch.float16, 2e-3), (torch.float32, LIMIT)])
@pytest.mark.parametrize("m", [1, 16])
def test_dtypes_and_bias(dtype, limit, m):
    n, k = 2048, 1416
    w = random_packed(n, k, seed=7 + m)
    x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y = run_kernel(x, w, bias)
    ref = reference.linear(x.float(), w, W4A16, bias.float())
    assert y.dtype == dtype
    assert rel_err(y, ref) < limit


@pytest.mark.parametrize("r,w_", [(1, 1), (1, 3), (2, 16), (2, 5)])
def test_configs(r, w_):
    n, k, m = 1000, 2880, 12
    w = random_packed(n, k, seed=r * 100 + w_)
    x = (torch.randn(m, k, device="cuda")).to(torch.bfloat16)
    y = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
    assert cuda_gemv.linear(x, w, None, y, r=r, w=w_)
    assert rel_err(y, reference.linear(x.float(), w, W4A16)) < LIMIT


def test_ops_linear_uses_cuda_kernel(monkeypatch):
    calls = []
    real = cuda_gemv.linear

    def spy(*a, **kw):
        ok = real(*a, **kw)
        calls.append(ok)
        return ok

    monkeypatch.setattr(cuda_gemv, "linear", spy)
    w = random_packed(512, 1024, seed=3)
    x = torch.randn(2, 3, 1024, device="cuda").to(torch.bfloat16)  # [..., K] leading dims, M = 6
    y = ops.linear(x, w, W4A16)
    assert calls == [True]
    assert y.shape == (2, 3, 512)
    assert rel_err(y, reference.linear(x.float(), w, W4A16)) < LIMIT
    # M > 16 and groups that are not multiples of 64 keep the Triton path
    w2 = random_packed(256, 960, groups=30, seed=4)  # G = 32
    x2 = torch.randn(3, 960, device="cuda").to(torch.bfloat16)
    y2 = ops.linear(x2, w2, W4A16)
    assert calls[-1] is False
    assert rel_err(y2, reference.linear(x2.float(), w2, W4A16)) < 1.5e-2


@pytest.mark.parametrize("n,k", [(4096, 4096), (2048, 7168)])
@pytest.mark.parametrize("m", [1, 16])
def test_prologue_path(n, k, m):
    """x paired by the prologue kernel instead of in registers (the path for K % 64 != 0 / fp32 x)."""
    ext = cuda_gemv.load()
    w = random_packed(n, k, seed=11 + m)
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    ext.set_force_prologue(True)
    try:
        y = run_kernel(x, w)
    finally:
        ext.set_force_prologue(False)
    assert rel_err(y, reference.linear(x.float(), w, W4A16)) < LIMIT
