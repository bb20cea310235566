"""The GPU backend against the reference path.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors and small shapes;
with CUDA the same checks run on the GPU at real sizes, through the kernel table's GPU
implementations in strict mode (a fallback to the reference fails the test). Error limits
are relative Frobenius errors ||y - y_ref|| / ||y_ref|| (tests.helpers.errors.rel_err).
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()  # without CUDA, conftest.py has set TRITON_INTERPRET=1
triton = pytest.importorskip("triton")

from codequant import kernels  # noqa: E402
from codequant.kernels import Case, KernelFallbackError, Op, kernel_options, reference, select  # noqa: E402
from codequant.kernels.gpu import ops  # noqa: E402
from codequant.core.activations import ActQuantSpec  # noqa: E402
from codequant.modules.attention import concat_rows  # noqa: E402
from codequant.modules.linear import CodeQuantLinear  # noqa: E402
from tests.helpers.errors import rel_err  # noqa: E402
from tests.helpers.limits import GPU_BF16, GPU_EXACT, OUTPUT_16BIT  # noqa: E402
from tests.helpers.packed import random_packed  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
W4A16 = ActQuantSpec(bits=16)
W4A4 = ActQuantSpec(bits=4)


def gpu_linear(x, w, act):
    """On CUDA the table's choice among the GPU kernels (strict), else the Triton kernel itself."""
    if not CUDA:
        return ops.linear(x, w, act)
    with kernel_options(strict=True):
        return kernels.linear(x, w, act, backend="gpu")


def gpu_moe(x, idx, w, gate_up, down, act, hb):
    """On CUDA the table's choice among the GPU kernels (strict), else the Triton kernel itself."""
    if not CUDA:
        return ops.moe(x, idx, w, gate_up, down, act, act, hb)
    with kernel_options(strict=True):
        return kernels.moe(x, idx, w, gate_up, down, act, act, hb, backend="gpu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# Small shapes for the interpreter (K not a multiple of 64 and N not of the tile on purpose).
DENSE_SHAPES = [(48, 192), (40, 136)] if not CUDA else [(4096, 4096), (14336, 4096), (4096, 14336), (2048, 7168), (1000, 1416)]
MS = [1, 5, 20] if not CUDA else [1, 4, 16, 64, 512, 2048]


@pytest.mark.parametrize("n,k", DENSE_SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_linear_matches_reference(n, k, m, mode):
    g = _gen(n + k + m)
    w = random_packed(n, k, generator=g, device=DEVICE)
    dtype = torch.bfloat16
    x = (torch.randn(m, k, generator=g) * 2).to(DEVICE, dtype)
    act = W4A16 if mode == "w4a16" else W4A4
    y = gpu_linear(x, w, act)
    ref = reference.linear(x.float(), w, act)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < (GPU_BF16 if mode == "w4a16" else GPU_EXACT + OUTPUT_16BIT)


# q, k, v rows and K: small for the interpreter; Qwen3-30B-A3B and Llama-3-8B / Mixtral-8x7B on CUDA
QKV_SHAPES = [((64, 32, 32), 192)] if not CUDA else [((4096, 512, 512), 2048), ((4096, 1024, 1024), 4096)]


@pytest.mark.parametrize("rows,k", QKV_SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_fused_qkv_weight_matches_separate_linears(rows, k, m, mode):
    """fuse_qkv's weight (q, k, v rows concatenated: modules.attention.concat_rows) through the GPU
    kernels: each projection's columns of its output are that projection's output."""
    g = _gen(sum(rows) + k + m)
    linears = [CodeQuantLinear.from_packed(random_packed(n, k, generator=g, device=DEVICE)) for n in rows]
    x = (torch.randn(m, k, generator=g) * 2).to(DEVICE, torch.bfloat16)
    act = W4A16 if mode == "w4a16" else W4A4
    fused = concat_rows(linears).packed
    y = gpu_linear(x, fused, act)
    assert rel_err(y, reference.linear(x.float(), fused, act)) < (GPU_BF16 if mode == "w4a16" else GPU_EXACT + OUTPUT_16BIT)
    for part, linear in zip(y.split(rows, -1), linears):
        assert rel_err(part, gpu_linear(x, linear.packed, act)) < OUTPUT_16BIT


@pytest.mark.parametrize("config", [
    ops.Config("gemv", block_m=4, block_n=16, block_k=128, split=2, num_warps=2, lut=1),
    ops.Config("gemv", block_m=4, block_n=16, block_k=64, split=1, num_warps=2, lut=0),
    ops.Config("mm", block_m=16, block_n=16, block_k=64, split=3, num_warps=2, lut=1),
    ops.Config("mm", block_m=16, block_n=32, block_k=128, split=1, num_warps=2, lut=0),
])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_linear_configs_and_bias(config, mode):
    g = _gen(7)
    n, k, m = 36, 200, 3
    w = random_packed(n, k, generator=g, device=DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    x = torch.randn(2, m, k, generator=g).to(DEVICE, torch.float16)
    act = W4A16 if mode == "w4a16" else W4A4
    y = ops.linear(x, w, act, bias.half(), config=config)
    ref = reference.linear(x.float(), w, act, bias)
    assert y.shape == (2, m, n)
    assert rel_err(y, ref) < 5e-3


def test_linear_grouped_codebooks_and_activation_groups():
    g = _gen(11)
    n, k = 24, 256
    w = random_packed(n, k, groups=4, generator=g, device=DEVICE)
    x = torch.randn(6, k, generator=g).to(DEVICE, torch.float16)
    for act in (W4A16, W4A4, ActQuantSpec(bits=4, group_size=128), ActQuantSpec(bits=4, clip=0.9)):
        y = ops.linear(x, w, act)  # the Triton kernel itself, on either device
        ref = reference.linear(x.float(), w, act)
        assert rel_err(y, ref) < 5e-3, act
        if CUDA:  # the table: the CUDA decode kernel, except for activation groups (no GPU kernel: the reference)
            expected = "reference" if act.group_size else "cuda_gemv"
            assert select(Case(Op.LINEAR, x, w, act)).name == expected, act
    if CUDA:
        with kernel_options(strict=True), pytest.raises(KernelFallbackError, match="linear: no kernel supports it"):
            kernels.linear(x, w, ActQuantSpec(bits=4, group_size=128))


def test_w4a4_codes_match_reference_exactly():
    g = _gen(3)
    x = torch.randn(5, 192, generator=g).to(DEVICE) * 3
    x[0, :3] = torch.tensor([0.0, 1.5, -7.5])  # ties for the half-to-even rounding
    act = ActQuantSpec(bits=4, group_size=64)
    from codequant.core.activations import quantize_activations

    q_ref, s_ref, z_ref = quantize_activations(x, act)
    q, s = ops.quantize_activations_int8(x, act)
    assert torch.equal(q.long(), q_ref.long() - z_ref.repeat_interleave(64, -1).long())
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("n,k,groups", [(33, 200, 1), (16, 256, 4), (5, 64, 1)])
def test_dequantize_kernel_is_exact(n, k, groups):
    """The prefill dequantization moves raw codebook values: bit-equal to the format's own."""
    from codequant.kernels.gpu import prefill

    w = random_packed(n, k, groups, generator=_gen(n + k), device=DEVICE)
    assert torch.equal(prefill.dequantize(w), w.dequantize(torch.float16))
    cb = w.codebook.to(torch.bfloat16)
    assert torch.equal(prefill.dequantize(w, cb), w.dequantize(torch.float32).to(torch.bfloat16))
    cb8, scale = prefill.fp8_codebook(w.codebook)
    w8 = prefill.dequantize(w, cb8)
    assert w8.dtype == torch.float8_e4m3fn
    ref8 = type(w)(w.indices, cb8.view(torch.uint8), w.row_sum, w.in_features)
    assert torch.equal(w8.view(torch.uint8), ref8.dequantize(torch.float32).to(torch.uint8))


def test_route_groups_every_assignment_once():
    g = _gen(9)
    t, k, e, bm = 13, 3, 7, 16
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    rows, bexp, max_blocks = ops.moe_route(idx, e, bm)
    rows, bexp = rows.cpu(), bexp.cpu()
    flat = idx.reshape(-1).cpu()
    valid = rows[rows < t * k]
    assert sorted(valid.tolist()) == list(range(t * k))
    for b in range(max_blocks):
        blk = rows[b * bm:(b + 1) * bm]
        blk = blk[blk < t * k]
        if bexp[b] < 0:
            assert blk.numel() == 0
        else:
            assert (flat[blk.long()] == bexp[b]).all()
            # stable: assignments of one expert stay in token order
            assert torch.equal(blk, blk.sort().values)


MOE_SHAPES = [(6, 2, 64, 48), (5, 3, 128, 40)] if not CUDA else [(128, 8, 2048, 768), (8, 2, 4096, 14336), (64, 6, 2048, 1408)]
TOKENS = [1, 4, 11] if not CUDA else [1, 4, 16, 64, 512]


@pytest.mark.parametrize("e,topk,h,i", MOE_SHAPES)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_moe_matches_reference(e, topk, h, i, t, mode):
    if CUDA and e == 8 and t > 64:
        pytest.skip("Mixtral-size reference at 512 tokens is slow; covered at 64")
    g = _gen(e + t + h)
    gate_up = random_packed(2 * i, h, lead=(e,), generator=g, device=DEVICE)
    down = random_packed(h, i, lead=(e,), generator=g, device=DEVICE)
    x = torch.randn(t, h, generator=g).to(DEVICE, torch.bfloat16)
    scores = torch.randn(t, e, generator=g).softmax(-1)
    w, idx = scores.topk(topk, -1)
    w, idx = w.to(DEVICE, torch.bfloat16), idx.to(DEVICE)
    act = W4A16 if mode == "w4a16" else W4A4
    hb = 8 if mode == "w4a4" else 0
    y = gpu_moe(x, idx, w, gate_up, down, act, hb)
    ref = reference.moe(x.float(), idx, w, gate_up, down, act, act, hb)
    assert y.shape == (t, h) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < (GPU_BF16 if mode == "w4a16" else 1e-2)


def test_moe_dense_variant_matches_torch():
    g = _gen(21)
    e, topk, h, i, t = 4, 2, 64, 40, 5
    gu = (torch.randn(e, 2 * i, h, generator=g) * 0.05).to(DEVICE, torch.bfloat16)
    dn = (torch.randn(e, h, i, generator=g) * 0.05).to(DEVICE, torch.bfloat16)
    x = torch.randn(t, h, generator=g).to(DEVICE, torch.bfloat16)
    w, idx = torch.randn(t, e, generator=g).softmax(-1).topk(topk, -1)
    y = ops.moe(x, idx.to(DEVICE), w.to(DEVICE), gu, dn)
    ref = torch.zeros(t, h)
    for tt in range(t):
        for j in range(topk):
            ee = int(idx[tt, j])
            gg, uu = (x[tt].float().cpu() @ gu[ee].float().cpu().T).chunk(2)
            ref[tt] += w[tt, j] * ((torch.nn.functional.silu(gg) * uu) @ dn[ee].float().cpu().T)
    assert rel_err(y.cpu(), ref) < GPU_BF16


@pytest.mark.skipif(not CUDA, reason="module dispatch to the gpu backend needs CUDA tensors")
def test_modules_use_gpu_backend():
    from codequant.modules.experts import CodeQuantExperts
    from codequant.modules.linear import CodeQuantLinear

    g = _gen(1)
    lin = CodeQuantLinear.from_packed(random_packed(256, 512, generator=g, device=DEVICE), act=W4A4)
    x = torch.randn(3, 512, generator=g).to(DEVICE, torch.bfloat16)
    assert select(Case(Op.LINEAR, x, lin.packed, W4A4)).backend == "gpu"
    assert rel_err(lin(x), reference.linear(x.float(), lin.packed, W4A4)) < 1e-2
    gate_up = random_packed(128, 256, lead=(8,), generator=g, device=DEVICE)
    ex = CodeQuantExperts.from_packed(gate_up, random_packed(256, 64, lead=(8,), generator=g, device=DEVICE), W4A16)
    w, idx = torch.randn(3, 8, generator=g).softmax(-1).topk(2, -1)
    assert select(Case(Op.MOE, x[:, :256], ex.gate_up, W4A16, ex.down, W4A16, idx.to(DEVICE), w.to(DEVICE))).backend == "gpu"
    y = ex(x[:, :256], idx.to(DEVICE), w.to(DEVICE, torch.bfloat16))
    ref = reference.moe(x[:, :256].float(), idx.to(DEVICE), w.to(DEVICE), ex.gate_up, ex.down, W4A16, W4A16)
    assert rel_err(y, ref) < GPU_BF16
