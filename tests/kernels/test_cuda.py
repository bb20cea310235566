"""The CUDA C++ decode kernels (src/codequant/kernels/gpu/cuda_gemv.py, src/codequant/kernels/gpu/csrc/) and the
prefill paths (gpu/prefill.py) against the reference path at real sizes. Skipped without
CUDA. Errors are relative Frobenius errors ||y - y_ref|| / ||y_ref||."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from codequant.core.format import PackedWeight  # noqa: E402
from codequant import kernels  # noqa: E402
from codequant.kernels import Case, Op, kernel_options, reference, select  # noqa: E402
from codequant.kernels.gpu import cuda_gemv, ops, prefill  # noqa: E402
from codequant.core.activations import ActQuantSpec, quantize_activations  # noqa: E402
from tests.helpers.errors import rel_err  # noqa: E402
from tests.helpers.limits import CUDA_BF16, CUDA_EXACT, CUDA_FP8, GPU_BF16, OUTPUT_16BIT  # noqa: E402
from tests.helpers.packed import random_packed  # noqa: E402


@pytest.fixture(autouse=True)
def _fp8_prefill_on():
    with kernel_options(gpu_w4a4_prefill="fp8"):
        yield


W4A16 = ActQuantSpec(bits=16)
W4A4 = ActQuantSpec(bits=4)


def run_kernel(x, weight, act=W4A16, bias=None, **kw):
    y = torch.full((x.shape[0], weight.out_features), float("nan"), dtype=x.dtype, device="cuda")
    assert cuda_gemv.linear(x, weight, act, bias, y, **kw), "CUDA decode kernel did not run"
    return y


def int8_emulated(w: PackedWeight) -> PackedWeight:
    """The weight the W4A4 integer path computes with: int8 codebook times its row scale."""
    cb8, scale = ops.int8_codebook(w.codebook)
    return PackedWeight(w.indices, cb8.float() * scale[..., None, None], w.row_sum, w.in_features)


def test_builds():
    assert cuda_gemv.load() is not None


@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (1000, 1416), (300, 200), (17, 64)])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 9, 16])
def test_w4a16_matches_reference(n, k, m):
    w = random_packed(n, k, seed=n + k + m, device="cuda")
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    y = run_kernel(x, w)
    assert rel_err(y, reference.linear(x.float(), w, W4A16)) < CUDA_BF16


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("m", [1, 7, 16])
def test_ring_stages(stages, r, m):
    n, k = 1000, 2880
    w = random_packed(n, k, seed=stages * 10 + r + m, device="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    for w_ in (1, 3, 8, 16):
        y = run_kernel(x, w, r=r, w=w_, stages=stages)
        assert rel_err(y, reference.linear(x.float(), w, W4A16)) < CUDA_BF16


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 4160), (17, 4096), (2048, 14336)])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_smem_and_register_lookups_agree(n, k, m, dtype):
    """Pair-word tables in shared memory and the register lookup give the same operands: equal outputs."""
    w = random_packed(n, k, seed=n + k + m, device="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    y_smem = run_kernel(x, w, smem_lut=True)
    assert torch.equal(y_smem, run_kernel(x, w, smem_lut=False))
    assert rel_err(y_smem, reference.linear(x.float(), w, W4A16)) < CUDA_BF16


@pytest.mark.parametrize("n,k,groups", [(4096, 4096, 32), (1024, 1344, 7), (512, 4096, 64), (4096, 14336, 112)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_grouped_codebooks(n, k, groups, m):
    w = random_packed(n, k, groups, seed=n + k + m + groups, device="cuda")
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    y = run_kernel(x, w)
    assert rel_err(y, reference.linear(x.float(), w, W4A16)) < CUDA_BF16


@pytest.mark.parametrize("dtype,limit", [(torch.float16, 2e-3), (torch.float32, CUDA_BF16)])
@pytest.mark.parametrize("m", [1, 16])
def test_dtypes_bias_and_prologue(dtype, limit, m):
    """fp32 x goes through the pairing prologue, K % 64 != 0 as well."""
    n, k = 2048, 1416
    w = random_packed(n, k, seed=7 + m, device="cuda")
    x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y = run_kernel(x, w, bias=bias)
    assert y.dtype == dtype
    assert rel_err(y, reference.linear(x.float(), w, W4A16, bias.float())) < limit


@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (1000, 1416), (17, 64)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a4_matches_reference(n, k, m, dtype):
    """Codes quantized in the prologue exactly as the reference, fp16 dot, scale after the sum."""
    w = random_packed(n, k, seed=3 * n + k + m, device="cuda")
    x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
    x[0, :5] = torch.tensor([0.0, 1.5, -7.5, 30.0, -0.25])  # an outlier and rounding ties
    y = run_kernel(x, w, act=W4A4)
    limit = CUDA_EXACT if dtype == torch.float32 else OUTPUT_16BIT  # bf16 output rounding
    assert rel_err(y, reference.linear(x.float(), w, W4A4)) < limit


@pytest.mark.parametrize("k", [40008, 1416])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w4a4_prologue_row_layouts(k, dtype):
    """The prologue reads a row once into registers, a second time where the row is longer than
    they hold (K > 32768), element by element where rows do not start 16-byte aligned: the same
    codes as the reference in every case."""
    n, m = 256, 3
    w = random_packed(n, k, seed=k, device="cuda")
    wide = (torch.randn(m, k + 3, device="cuda") * 2).to(dtype)
    limit = CUDA_EXACT if dtype == torch.float32 else OUTPUT_16BIT  # 16-bit output rounding
    for x in (wide[:, :k].contiguous(), wide[:, 3:]):
        assert rel_err(run_kernel(x, w, act=W4A4), reference.linear(x.float(), w, W4A4)) < limit


def test_w4a4_clip_and_bits():
    w = random_packed(512, 1024, seed=5, device="cuda")
    x = torch.randn(4, 1024, device="cuda").to(torch.float32)
    for act in (ActQuantSpec(bits=4, clip=0.9), ActQuantSpec(bits=3), ActQuantSpec(bits=8)):
        assert rel_err(run_kernel(x, w, act=act), reference.linear(x, w, act)) < CUDA_EXACT


def linear_on(name, x, w, act, bias=None):
    """kernels.linear, asserting that the table chose the implementation ``name`` (no fallback)."""
    assert select(Case(Op.LINEAR, x, w, act)).name == name
    with kernel_options(strict=True):
        return kernels.linear(x, w, act, bias)


def moe_on(name, x, idx, w, gu, dn, act, hb=0):
    """kernels.moe, asserting that the table chose the implementation ``name`` (no fallback)."""
    assert select(Case(Op.MOE, x, gu, act, dn, act, idx, w)).name == name
    with kernel_options(strict=True):
        return kernels.moe(x, idx, w, gu, dn, act, act, hb)


def test_linear_dispatch():
    w = random_packed(512, 1024, seed=3, device="cuda")
    x = torch.randn(2, 3, 1024, device="cuda").to(torch.bfloat16)  # [..., K] leading dims, M = 6
    y = linear_on("cuda_gemv", x, w, W4A16)
    assert y.shape == (2, 3, 512)
    assert rel_err(y, reference.linear(x.float(), w, W4A16)) < CUDA_BF16
    # groups that are not multiples of 64: not this kernel
    w2 = random_packed(256, 960, groups=30, seed=4, device="cuda")  # G = 32
    x2 = torch.randn(3, 960, device="cuda").to(torch.bfloat16)
    y2 = linear_on("triton", x2, w2, W4A16)
    assert rel_err(y2, reference.linear(x2.float(), w2, W4A16)) < GPU_BF16
    # W4A4 with activation groups: no kernel, the reference (an error when strict)
    grouped = ActQuantSpec(bits=4, group_size=512)
    assert select(Case(Op.LINEAR, x, w, grouped)).name == "reference"
    with kernel_options(strict=True), pytest.raises(kernels.KernelFallbackError, match="linear: no kernel supports it"):
        kernels.linear(x, w, grouped)


@pytest.mark.parametrize("n,k,m", [(4096, 4096, 64), (14336, 4096, 512), (1000, 1416, 17), (256, 960, 40)])
def test_prefill_w4a16(n, k, m):
    w = random_packed(n, k, groups=1 if k != 960 else 30, seed=n + m, device="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y = linear_on("prefill", x, w, W4A16)
    assert rel_err(y, reference.linear(x.float(), w, W4A16)) < CUDA_BF16


def test_dequantize_is_exact():
    w = random_packed(1000, 1416, groups=1, seed=2, device="cuda")
    assert torch.equal(prefill.dequantize(w), w.dequantize(torch.float16))
    w = random_packed(64, 2048, groups=16, seed=3, device="cuda")
    assert torch.equal(prefill.dequantize(w), w.dequantize(torch.float16))


@pytest.mark.parametrize("n,k,m", [(4096, 4096, 512), (2048, 7168, 64)])
def test_prefill_w4a4_fp8(n, k, m):
    w = random_packed(n, k, seed=n + k, device="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16) * 2
    bias = torch.randn(n, device="cuda")
    y = linear_on("prefill_fp8", x, w, W4A4, bias)
    ref = reference.linear(x.float(), w, W4A4, bias)
    err = rel_err(y, ref)
    assert err < CUDA_FP8
    # the error is the e4m3 weight rounding alone: the same weights in fp32 agree closely
    cb8, sc = prefill.fp8_codebook(w.codebook)
    w8 = PackedWeight(w.indices, (cb8.float() * sc[:, None, None]).half(), w.row_sum, w.in_features)
    assert rel_err(y, reference.linear(x.float(), w8, W4A4, bias)) < 1.5e-2


# ---------------------------------------------------------------- MoE

def moe_case(e, topk, h, i, t, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gu = random_packed(2 * i, h, seed=seed, lead=(e,), device="cuda")
    dn = random_packed(h, i, seed=seed + 1, lead=(e,), device="cuda")
    x = torch.randn(t, h, generator=g, device="cuda").to(torch.bfloat16)
    scores = torch.randn(t, e, generator=g, device="cuda")
    w, idx = scores.softmax(-1).topk(topk, -1)
    return x, idx, w, gu, dn


@pytest.mark.parametrize("e,topk,h,i", [(16, 4, 512, 384), (128, 8, 2048, 768), (8, 2, 1024, 1408)])
@pytest.mark.parametrize("t", [1, 5, 16, 64])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_moe_matches_reference(e, topk, h, i, t, mode):
    act = W4A16 if mode == "w4a16" else W4A4
    x, idx, w, gu, dn = moe_case(e, topk, h, i, t, seed=e + t)
    hb = 64 if i % 64 == 0 else 0
    y = cuda_gemv.moe(x, idx, w, gu, dn, act, act, hb)
    assert y is not None and y.shape == x.shape and y.dtype == x.dtype
    ref = reference.moe(x.float(), idx, w, gu, dn, act, act, hb)
    assert rel_err(y, ref) < (CUDA_BF16 if mode == "w4a16" else 8e-3)


@pytest.mark.parametrize("n,k,hb", [(2048, 4096, 4096), (4096, 14336, 2048), (256, 192, 64)])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_linear_hadamard_in_the_prologue(n, k, hb, m, mode):
    """The online Hadamard before a linear (o_proj's, block 4096 on Qwen3-30B-A3B) done by the prologue:
    the outputs of block_hadamard then the kernel, and the reference's; the table's linear passes it down."""
    from codequant.core.hadamard import block_hadamard

    act = W4A16 if mode == "w4a16" else W4A4
    w = random_packed(n, k, seed=n + k + m, device="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    fused = run_kernel(x, w, act=act, hadamard_block=hb)
    unfused = run_kernel(block_hadamard(x.float(), hb), w, act=act)  # fp32 x H, as the prologue keeps it
    ref = reference.linear(block_hadamard(x.float(), hb), w, act)
    assert rel_err(fused, unfused) < (OUTPUT_16BIT if mode == "w4a16" else 2e-3)
    assert rel_err(fused, ref) < (CUDA_BF16 if mode == "w4a16" else 8e-3)
    assert select(Case(Op.LINEAR, x, w, act)).hadamard
    assert rel_err(kernels.linear(x, w, act, None, hb), fused) < 1e-6


def test_block_hadamard_crossover_on_cuda():
    """One matmul up to block 1024 at up to 16 rows, up to 256 above (hadamard-gpu-h100.json); same values either way."""
    from codequant.core.hadamard import block_hadamard, one_matmul_max_block

    few, many = torch.randn(16, 2048, device="cuda"), torch.randn(17, 2048, device="cuda")
    assert one_matmul_max_block(few) == 1024 and one_matmul_max_block(many) == 256
    for x in (few, many):
        torch.testing.assert_close(block_hadamard(x, 1024), block_hadamard(x, 1024, factored=True), rtol=0, atol=1e-5 * x.abs().max().item())


@pytest.mark.parametrize("e,topk,h,i,hb", [(128, 8, 2048, 768, 256), (8, 2, 1024, 14336, 2048), (16, 4, 512, 384, 128)])
@pytest.mark.parametrize("t", [1, 16])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_moe_hadamard_in_the_prologue(e, topk, h, i, hb, t, mode):
    """The down projection's block Hadamard done by the prologue (fast Walsh-Hadamard transform in
    shared memory; 56 KB of it for I = 14336) gives the outputs of block_hadamard before an unfused
    prologue, and the reference's."""
    act = W4A16 if mode == "w4a16" else W4A4
    x, idx, w, gu, dn = moe_case(e, topk, h, i, t, seed=i + t)
    assert cuda_gemv.prep_hadamard_ok(i, hb)
    assert not cuda_gemv.prep_hadamard_ok(384, 256) and not cuda_gemv.prep_hadamard_ok(18944 * 2, 256)
    fused = cuda_gemv.moe(x, idx, w, gu, dn, act, act, hb)
    with kernel_options(cuda_prologue_hadamard=False):
        assert not cuda_gemv.prep_hadamard_ok(i, hb)
        unfused = cuda_gemv.moe(x, idx, w, gu, dn, act, act, hb)
    ref = reference.moe(x.float(), idx, w, gu, dn, act, act, hb)
    # W4A4: a code may round the other way where the two transforms' float sums differ in the last bit
    assert rel_err(fused, unfused) < (OUTPUT_16BIT if mode == "w4a16" else 2e-3)
    assert rel_err(fused, ref) < (CUDA_BF16 if mode == "w4a16" else 8e-3)


@pytest.mark.parametrize("e,topk,h,i,t", [(128, 8, 2048, 768, 1), (128, 8, 2048, 768, 4), (128, 8, 2048, 768, 16),
                                            (8, 2, 1024, 1408, 1), (8, 2, 1024, 1408, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_w4a16_in_place_paths(monkeypatch, e, topk, h, i, t, dtype):
    """W4A16 without Hadamard: x and h read in place, bf16 / fp16 routing weights, and one block per
    slot (no routing launch) exactly when slots are at most a quarter of the experts."""
    x, idx, w, gu, dn = moe_case(e, topk, h, i, t, seed=3 * e + t)
    x, w = x.to(dtype), w.to(dtype)
    routed = []
    real_route = ops.moe_route
    monkeypatch.setattr(ops, "moe_route", lambda *a: routed.append(1) or real_route(*a))
    y = cuda_gemv.moe(x, idx, w, gu, dn, W4A16, W4A16)
    assert y.dtype == dtype and rel_err(y, reference.moe(x.float(), idx, w.float(), gu, dn, W4A16, W4A16)) < CUDA_BF16
    assert bool(routed) == (t * topk * cuda_gemv.SLOT_BLOCKS_MAX_SHARE > e)
    # int32 indices and the same routing weights in fp32: the same output, bit for bit
    assert torch.equal(cuda_gemv.moe(x, idx.int(), w.float(), gu, dn, W4A16, W4A16), y)


@pytest.mark.parametrize("t,k,e,bm", [(1, 8, 128, 8), (16, 8, 128, 8), (300, 6, 66, 16), (2048, 8, 128, 16)])
def test_cuda_route_equals_triton_route(monkeypatch, t, k, e, bm):
    g = torch.Generator(device="cuda").manual_seed(t)
    idx = torch.randn(t, e, generator=g, device="cuda").topk(k, -1).indices
    rows, bexp, max_blocks = ops.moe_route(idx, e, bm)
    monkeypatch.setattr(ops, "_cuda_extension", lambda: None)
    rows_t, bexp_t, max_blocks_t = ops.moe_route(idx, e, bm)
    assert max_blocks == max_blocks_t and torch.equal(rows, rows_t) and torch.equal(bexp, bexp_t)


def test_moe_dense_bf16_variant():
    e, topk, h, i, t = 8, 2, 1024, 512, 12
    g = torch.Generator(device="cuda").manual_seed(1)
    gu = (torch.randn(e, 2 * i, h, generator=g, device="cuda") * 0.05).to(torch.bfloat16)
    dn = (torch.randn(e, h, i, generator=g, device="cuda") * 0.05).to(torch.bfloat16)
    x = torch.randn(t, h, generator=g, device="cuda").to(torch.bfloat16)
    w, idx = torch.randn(t, e, generator=g, device="cuda").softmax(-1).topk(topk, -1)
    y = cuda_gemv.moe(x, idx, w, gu, dn, W4A16, W4A16)
    ref = torch.zeros(t, h, device="cuda")
    for tt in range(t):
        for j in range(topk):
            ex = idx[tt, j]
            a = x[tt].float() @ gu[ex].float().T
            hh = torch.nn.functional.silu(a[:i]) * a[i:]
            ref[tt] += w[tt, j] * (hh @ dn[ex].float().T)
    assert rel_err(y, ref) < CUDA_BF16


def test_ops_moe_w4a4_beyond_cuda_slots_runs_triton():
    """More (token, k) slots than the CUDA kernels take: the Triton W4A4 MoE, not the reference loop."""
    x, idx, w, gu, dn = moe_case(16, 4, 512, 384, cuda_gemv.MOE_MAX_SLOTS // 4 + 9, seed=31)
    assert cuda_gemv.moe(x, idx, w, gu, dn, W4A4, W4A4, 64) is None
    y = moe_on("triton", x, idx, w, gu, dn, W4A4, 64)
    assert rel_err(y, reference.moe(x.float(), idx, w, gu, dn, W4A4, W4A4, 64)) < 8e-3


def test_moe_dispatch_uses_cuda_kernel():
    x, idx, w, gu, dn = moe_case(16, 4, 512, 384, 3, seed=9)
    y = moe_on("cuda_moe", x, idx, w, gu, dn, W4A4)
    assert rel_err(y, reference.moe(x.float(), idx, w, gu, dn, W4A4, W4A4)) < 8e-3


@pytest.fixture
def int8_w4a4():
    with kernel_options(cuda_w4a4_int8=True):
        yield


def test_w4a4_int8_opt_in(int8_w4a4):
    """KernelOptions(cuda_w4a4_int8=True): int8 codes on integer tensor cores against int8 codebook copies."""
    w = random_packed(2048, 4096, seed=23, device="cuda")
    x = torch.randn(3, 4096, device="cuda")
    y = run_kernel(x, w, act=W4A4)
    assert rel_err(y, reference.linear(x, int8_emulated(w), W4A4)) < CUDA_EXACT
    x_, idx, rw, gu, dn = moe_case(16, 4, 512, 384, 6, seed=24)
    x_ = torch.randn(x_.shape, device="cuda")
    y = cuda_gemv.moe(x_, idx, rw, gu, dn, W4A4, W4A4, 64)
    assert rel_err(y, reference.moe(x_.float(), idx, rw, int8_emulated(gu), int8_emulated(dn), W4A4, W4A4, 64)) < 8e-3


def test_reference_scale_is_exact_division():
    """The activation scale (hi - lo) / (2^b - 1) is the correctly rounded quotient on CUDA, as in
    the kernels: torch divides by a Python scalar through its float32 reciprocal, an ulp off for
    some rows, which flipped codes at rounding ties (the W4A4 mismatch of earlier H200 runs)."""
    x = (torch.randn(4096, 512, device="cuda") * 2).to(torch.bfloat16).float()
    _, scale, _ = quantize_activations(x, W4A4)
    hi, lo = x.amax(-1, keepdim=True).clamp(min=0), x.amin(-1, keepdim=True).clamp(max=0)
    assert torch.equal(scale, ((hi - lo).double() / 15).float())


def test_w4a4_bf16_activations_m16():
    """The case that failed before that fix: bf16 x, M = 16, 4096 x 4096."""
    n, k, m = 4096, 4096, 16
    w = random_packed(n, k, seed=3 * n + k + m, device="cuda")
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    x[0, :5] = torch.tensor([0.0, 1.5, -7.5, 30.0, -0.25])
    assert rel_err(run_kernel(x, w, act=W4A4), reference.linear(x.float(), w, W4A4)) < OUTPUT_16BIT


@pytest.mark.parametrize("case", ["dense-w4a16", "dense-w4a4", "moe-slots", "moe-grouped", "moe-w4a4"])
def test_pdl_launches_give_the_same_outputs(case):
    """Every launch with programmatic dependent launch, x written by the kernel just before the
    call, gives the outputs of plain launches bit for bit (sm_90; elsewhere both are plain)."""
    if case.startswith("dense"):
        act = W4A4 if case == "dense-w4a4" else W4A16
        w = random_packed(4096, 4096, seed=11, device="cuda")
        x0 = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)

        def call(x):
            return run_kernel(x, w, act)
    else:
        act = W4A4 if case == "moe-w4a4" else W4A16
        x0, idx, rw, gu, dn = moe_case(128, 8, 2048, 768, 1 if case == "moe-slots" else 16, seed=5)

        def call(x):
            return cuda_gemv.moe(x, idx, rw, gu, dn, act, act)

    def run():
        return [call(x0 * (1 + s)) for s in range(4)]  # x from an elementwise kernel right before

    with_pdl = run()
    with kernel_options(cuda_pdl=False):
        plain = run()
    assert all(torch.equal(a, b) for a, b in zip(with_pdl, plain))
