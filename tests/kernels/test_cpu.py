"""CPU LUT kernels (codequant.kernels.cpu) against the reference path, on every ISA path
this machine runs (portable, avx2, avx512), with the tolerances documented in the module:

* W4A16: float32 summation order only, |y - ref| <= 1e-4 * (|W_hat| @ |x|) + 1e-5;
* W4A8 / W4A4: codes bit-identical to quantize_activations, and
  |y - ref| <= 0.5 * sum_k sc[n, g(k)] * |x_hat_k| (int8 codebook rounding) + the above;
* bf16 outputs: plus one bf16 rounding of the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

cpu = pytest.importorskip("codequant.kernels.cpu", reason="compiled CPU kernels not built")

from codequant import kernels  # noqa: E402
from codequant.core.format import PackedWeight  # noqa: E402
from codequant.kernels import Case, Op, kernel_options, reference, select  # noqa: E402
from codequant.kernels.cpu import _lut  # noqa: E402
from codequant.modules.experts import CodeQuantExperts  # noqa: E402
from codequant.modules.linear import CodeQuantLinear  # noqa: E402
from codequant.core.activations import ActQuantSpec, fake_quantize_activations, quantize_activations  # noqa: E402
from tests.helpers.errors import rel_err  # noqa: E402
from tests.helpers.limits import CPU_FLOAT32, CPU_INT8  # noqa: E402
from tests.helpers.packed import random_packed  # noqa: E402

ISAS = cpu.available_isas()
FLOAT_RTOL, FLOAT_ATOL = 1e-4, 1e-5
BF16_EPS = 2.0**-8


def tolerance(x: torch.Tensor, weight: PackedWeight, act: ActQuantSpec) -> torch.Tensor:
    x_hat = fake_quantize_activations(x.float(), act)
    tol = FLOAT_RTOL * (x_hat.abs() @ weight.dequantize().abs().T) + FLOAT_ATOL
    if act.enabled:
        _, sc, _ = cpu.int8_codebook(weight, act.group_size)
        per_col = sc.repeat_interleave(weight.group_size, dim=-1)  # [N, K]
        tol = tol + cpu.INT8_HALF_STEP * (x_hat.abs() @ per_col.T) * (1 + 1e-5)
    return tol


def check_linear(x, weight, act, bias, isa):
    ref = reference.linear(x, weight, act, bias)
    with cpu.use_isa(isa):
        y = cpu.linear(x, weight, act, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = tolerance(x, weight, act)
    if x.dtype == torch.bfloat16:
        tol = tol + 2 * BF16_EPS * ref.float().abs()
    err = (y.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"{isa}: max err {err.max():.3e}, worst excess {(err - tol).max():.3e}"


ACTS = [ActQuantSpec(16), ActQuantSpec(8), ActQuantSpec(4), ActQuantSpec(4, 32, 0.9), ActQuantSpec(8, 64, 0.95), ActQuantSpec(4, 128)]


@st.composite
def linear_case(draw):
    k = draw(st.sampled_from([32, 64, 96, 128, 200, 256, 320, 384, 640, 768, 1024]))
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    fast = [d for d in divisors if d % 32 == 0]
    g = draw(st.sampled_from(fast + [k]) if draw(st.booleans()) else st.sampled_from(divisors))
    acts = [a for a in ACTS if not a.enabled or not a.group_size or k % a.group_size == 0]
    return dict(
        n=draw(st.integers(1, 41)),
        k=k,
        g=g,
        m=draw(st.integers(1, 17)),
        act=draw(st.sampled_from(acts)),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=linear_case())
def test_linear_matches_reference(case):
    weight = random_packed(case["n"], case["k"], group_size=case["g"], seed=case["seed"])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = (torch.randn(case["m"], case["k"], generator=gen) * 2).to(case["dtype"])
    bias = torch.randn(case["n"], generator=gen).to(case["dtype"]) if case["bias"] else None
    for isa in ISAS:
        check_linear(x, weight, case["act"], bias, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,ga,g", [(384, 64, 384), (384, 192, 128), (192, 64, 192), (320, 64, 320)])
@pytest.mark.parametrize("m", [1, 2, 7])
def test_linear_activation_groups_of_64_columns(isa, k, ga, g, m):
    """Activation groups of an odd multiple of 64 (each 128-column step spans two of them, and the last
    step may pass K): every group's scale reaches its own columns. Groups of x differ 30x in range, so a
    scale taken from the neighbouring group is far outside the tolerance."""
    weight = random_packed(6, k, group_size=g, seed=k + ga + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen) * torch.tensor([30.0, 1.0]).repeat(k // 64 // 2 + 1)[: k // 64].repeat_interleave(64)
    check_linear(x, weight, ActQuantSpec(4, ga), None, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,g", [(768, 2048, 2048), (64, 2048, 128), (48, 768, 64), (40, 1408, 32), (4096, 1024, 128)])
def test_linear_expert_shapes(isa, n, k, g):
    weight = random_packed(n, k, group_size=g, seed=n + k + g)
    x = torch.randn(5, k)
    x[:, 3] *= 40  # an outlier channel
    for act in (ActQuantSpec(16), ActQuantSpec(8), ActQuantSpec(4)):
        check_linear(x, weight, act, None, isa)


def test_int8_bound_is_not_vacuous():
    """The W4A4 tolerance is tight: the kernel's error reaches a good part of it."""
    weight = random_packed(64, 1024, group_size=1024, seed=3)
    x = torch.randn(8, 1024)
    act = ActQuantSpec(4)
    err = (cpu.linear(x, weight, act) - reference.linear(x, weight, act)).abs()
    bound = tolerance(x, weight, act)
    assert 0.01 < float((err / bound).max()) <= 1.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "k,bits,group,clip",
    [(256, 4, 0, 1.0), (256, 8, 0, 1.0), (256, 4, 32, 0.9), (256, 3, 64, 0.8), (256, 8, 16, 0.95),
     (200, 8, 0, 1.0), (200, 4, 40, 0.9), (77, 8, 0, 1.0), (96, 8, 12, 1.0)],
)
def test_activation_codes_are_bit_identical(isa, k, bits, group, clip):
    """Every ISA's quantizer (scalar, AVX2, AVX-512; group tails included) gives the codes,
    scales and zeros of quantize_activations bit for bit."""
    x = torch.randn(13, k) * torch.logspace(-2, 1, k)
    x[3] = 0.0  # all-zero token: the 1e-8 scale floor
    x[5, :] = x[5, :].abs()  # no negative values: zero point 0
    x[7, 5] = 2.5 * x[7].abs().max()  # an outlier; and exact .5 ties below
    x[9] = torch.arange(k, dtype=torch.float32) / 2 - k / 4
    spec = ActQuantSpec(bits, group, clip)
    q, s, z = quantize_activations(x, spec)
    qk = torch.empty(13, k, dtype=torch.uint8)
    sk, zk = torch.empty_like(s), torch.empty_like(z)
    with cpu.use_isa(isa):
        _lut.quantize(x.data_ptr(), 13, k, bits, group, clip, qk.data_ptr(), sk.data_ptr(), zk.data_ptr())
    assert torch.equal(qk, q) and torch.equal(sk, s) and torch.equal(zk, z)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,group", [(256, 0), (200, 40), (384, 128)])
def test_interleaved_activation_codes(isa, k, group):
    """The 128-column interleaved code layout the AVX-512 kernels read: columns
    [0-31, 64-95, 32-63, 96-127] of each 128, zero-padded to a multiple of 128."""
    x = torch.randn(5, k)
    spec = ActQuantSpec(8, group)
    q, s, z = quantize_activations(x, spec)
    kq = -(-(-(-k // 64) * 64) // 128) * 128
    qi = torch.empty(5, kq, dtype=torch.uint8)
    sk, zk = torch.empty_like(s), torch.empty_like(z)
    with cpu.use_isa(isa):
        _lut.quantize(x.data_ptr(), 5, k, 8, group, 1.0, qi.data_ptr(), sk.data_ptr(), zk.data_ptr(), 1)
    natural = torch.nn.functional.pad(q, (0, kq - k)).reshape(5, kq // 128, 4, 32)[:, :, [0, 2, 1, 3]].reshape(5, kq)
    assert torch.equal(qi, natural) and torch.equal(sk, s) and torch.equal(zk, z)


def int8_emulated(weight: PackedWeight, act: ActQuantSpec) -> PackedWeight:
    """The weight the integer path computes with: the int8 codebooks times their scales."""
    if not act.enabled:
        return weight
    cb8, sc, _ = cpu.int8_codebook(weight, act.group_size)
    return PackedWeight(weight.indices, cb8.float() * sc.unsqueeze(-1), weight.row_sum, weight.in_features)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "act,down_act,hadamard",
    [
        (ActQuantSpec(16), ActQuantSpec(16), 0),
        (ActQuantSpec(16), ActQuantSpec(16), 32),
        (ActQuantSpec(8), ActQuantSpec(8), 0),
        (ActQuantSpec(4), ActQuantSpec(4), 32),
        (ActQuantSpec(4, 64, 0.9), ActQuantSpec(8), 0),
    ],
)
@pytest.mark.parametrize("tokens,dtype", [(1, torch.float32), (7, torch.bfloat16), (19, torch.float32)])
def test_moe_matches_reference(isa, act, down_act, hadamard, tokens, dtype):
    e, h, inter, k = 6, 128, 96, 2
    gate_up = random_packed(2 * inter, h, group_size=64, seed=1, lead=(e,))
    down = random_packed(h, inter, group_size=32, seed=2, lead=(e,))
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, h, generator=gen).to(dtype)
    top_i = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(tokens)])
    top_w = torch.rand(tokens, k, generator=gen).to(dtype)
    with cpu.use_isa(isa):
        y = cpu.moe(x, top_i, top_w, gate_up, down, act, down_act, hadamard)
    assert y.dtype == dtype and y.shape == (tokens, h)
    # Same math as the reference once the centroids are the int8 ones; what remains is
    # float32 rounding (and, rarely, one code step where it moves h across a rounding edge).
    ref = reference.moe(x, top_i, top_w, int8_emulated(gate_up, act), int8_emulated(down, down_act), act, down_act, hadamard)
    rel = rel_err(y, ref)
    assert rel < (CPU_FLOAT32 if dtype == torch.float32 and not act.enabled else CPU_INT8), rel
    # And against the true reference: the int8 codebook error of each layer (~1%), which
    # with 4-bit down activations also moves some codes of h; bounded by a fraction of the
    # reference's own activation-quantization error.
    true_ref = reference.moe(x, top_i, top_w, gate_up, down, act, down_act, hadamard).float()
    no_act = reference.moe(x, top_i, top_w, gate_up, down, ActQuantSpec(16), ActQuantSpec(16), hadamard).float()
    act_err = rel_err(no_act, true_ref)
    assert rel_err(y, true_ref) < 0.02 + 0.5 * act_err


def test_moe_token_routed_twice_to_one_expert():
    e, h, inter = 4, 64, 64
    gate_up = random_packed(2 * inter, h, group_size=h, seed=5, lead=(e,))
    down = random_packed(h, inter, group_size=inter, seed=6, lead=(e,))
    x = torch.randn(3, h)
    top_i = torch.tensor([[0, 0], [3, 1], [2, 3]])  # a token routed twice to one expert
    top_w = torch.rand(3, 2)
    act = ActQuantSpec(16)
    ref = reference.moe(x, top_i, top_w, gate_up, down, act, act)
    torch.testing.assert_close(cpu.moe(x, top_i, top_w, gate_up, down, act, act), ref, rtol=1e-5, atol=1e-6)


def test_threads_do_not_change_results():
    """Each thread runs its own contiguous range of rows and takes leftovers from the others:
    any thread count (more than the cores too) gives the same bits."""
    weight = random_packed(1000, 2048, group_size=128, seed=9)
    x = torch.randn(3, 2048)
    for act in (ActQuantSpec(16), ActQuantSpec(4)):
        one = cpu.linear(x, weight, act, threads=1)
        for threads in (2, 3, 5):
            assert torch.equal(one, cpu.linear(x, weight, act, threads=threads))


def test_prefetch_modes_do_not_change_results():
    """Every-line or per-step prefetching of the index stream (the CPU's default, or set for an A/B):
    the same bits, and the setter hands back the mode it replaces."""
    weight = random_packed(512, 2048, seed=4)
    x = torch.randn(1, 2048)
    default = _lut.prefetch_lines(True)
    try:
        assert _lut.prefetch_lines(False) is True
        for act in (ActQuantSpec(8), ActQuantSpec(4)):
            per_step = cpu.linear(x, weight, act)
            assert _lut.prefetch_lines(True) is False
            assert torch.equal(cpu.linear(x, weight, act), per_step)
            _lut.prefetch_lines(False)
    finally:
        _lut.prefetch_lines(default)


@pytest.mark.parametrize("act", [ActQuantSpec(16), ActQuantSpec(8)])
def test_time_run_computes_linear(act):
    """The benchmark's native timing loop runs the same kernel call as linear()."""
    weights = [random_packed(96, 512, group_size=512, seed=s) for s in (10, 11)]
    x = torch.randn(2, 512)
    plans = [cpu._cached_plan(w, act)[6] for w in weights]
    y = torch.empty(2, 96)
    times = _lut.time_run(plans, x.data_ptr(), 0, 2, y.data_ptr(), 2, 3)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert torch.equal(y, cpu.linear(x, weights[0], act, threads=2))  # reps 3: the last call ran plans[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_decode_threads_runs_kernels_on_the_budget_and_torch_on_one():
    """Inside decode_threads a kernel call uses torch's thread count (3: the pool starts 2
    workers) while torch's ops get 1 thread; torch's count is restored after. A fresh process:
    the pool's workers start at its first multi-threaded job."""
    script = textwrap.dedent("""
        import os, torch
        import codequant.kernels.cpu as cpu
        from codequant.core.format import pack
        from codequant.core.activations import ActQuantSpec
        weight = pack(torch.randint(0, 16, (1024, 1024)), torch.randn(1024, 1, 16))
        x = torch.randn(1, 1024)
        torch.set_num_threads(3)
        tasks = lambda: len(os.listdir("/proc/self/task"))
        with cpu.decode_threads():
            assert torch.get_num_threads() == 1
            before = tasks()
            cpu.linear(x, weight, ActQuantSpec(8))
            torch.add(torch.ones(1 << 20), 1)  # a torch op starts no threads
            print(tasks() - before, torch.get_num_threads())
        print(torch.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "1", "3"]


def test_decode_threads_restores_on_error_and_nests():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="inside"):
            with cpu.decode_threads(3):
                with cpu.decode_threads(1):
                    assert cpu._decode_threads[0] == 1
                assert (torch.get_num_threads(), cpu._decode_threads[0]) == (1, 3)
                assert _lut.spin_us(cpu.DECODE_SPIN_US) == cpu.DECODE_SPIN_US  # workers stay awake between calls
                raise RuntimeError("inside")
        assert (torch.get_num_threads(), cpu._decode_threads[0]) == (2, 0)
        assert _lut.spin_us(100) == 100
        with pytest.raises(ValueError, match="at least 1"):
            with cpu.decode_threads(-1):
                pass
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ISAS)
def test_linear_bf16_matches_torch(isa):
    """The bf16 lm_head kernel: float32 sums (order only) against float64, row tails of every
    width, bf16 in and out, and the same bits on any thread count."""
    gen = torch.Generator().manual_seed(0)
    for n, k, m in ((1000, 2048, 1), (33, 100, 3), (7, 5, 2)):
        w, x = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(m, k, generator=gen)
        ref = (x.double() @ w.double().T).float()
        tol = FLOAT_RTOL * (x.abs() @ w.float().abs().T) + FLOAT_ATOL
        with cpu.use_isa(isa):
            y = cpu.linear_bf16(x, w, threads=2)
            assert y.dtype == torch.float32 and bool(((y - ref).abs() <= tol).all())
            assert torch.equal(y, cpu.linear_bf16(x, w, threads=1)) and torch.equal(y, cpu.linear_bf16(x, w, threads=3))
            y16 = cpu.linear_bf16(x.bfloat16().unsqueeze(0), w)
            ref16 = (x.bfloat16().double() @ w.double().T).float()
        assert y16.dtype == torch.bfloat16 and y16.shape == (1, m, n)
        assert bool(((y16[0].float() - ref16).abs() <= tol + 2 * BF16_EPS * ref16.abs()).all())


def anon_huge_page_bytes(ptr: int) -> int:
    """AnonHugePages of the memory mapping of this process that holds address ``ptr``."""
    inside = False
    for line in open("/proc/self/smaps"):
        field = line.split()
        if "-" in field[0] and not field[0].endswith(":"):
            start, end = (int(a, 16) for a in field[0].split("-"))
            inside = start <= ptr < end
        elif inside and field[0] == "AnonHugePages:":
            return int(field[1]) * 1024
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_huge_page_copy_is_an_equal_copy_in_2mib_pages(monkeypatch):
    x = torch.arange(3 << 20, dtype=torch.int32)  # 12 MiB
    y = cpu.huge_page_copy(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr() and y.is_contiguous()
    small = torch.arange(100.0)
    assert torch.equal(cpu.huge_page_copy(small), small) and cpu.huge_page_copy(small).data_ptr() != small.data_ptr()
    monkeypatch.setattr(cpu, "HUGE_PAGES", False)
    plain = cpu.huge_page_copy(x)
    assert torch.equal(plain, x) and plain.data_ptr() != x.data_ptr()
    mode = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(mode) or "[never]" in open(mode).read():
        pytest.skip("transparent huge pages are off on this machine")
    assert y.data_ptr() % cpu.HUGE_PAGE == 0 and anon_huge_page_bytes(y.data_ptr()) >= cpu.HUGE_PAGE


@pytest.mark.parametrize("shape", [(6, 40), (2, 9, 160), (4101, 640)])  # N % 4 != 0, rows padded, over one huge page
def test_interleaved_indices_layout(shape):
    """Rows padded to RB = ceil(KP/128) * 64 bytes; in each tile of 4 rows the rows' 64-byte pieces alternate."""
    idx = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = cpu.interleaved_indices(idx)
    *lead, n, half = shape
    rb = -(-half // 64) * 64
    rows = torch.nn.functional.pad(idx.reshape(-1, n, half), (0, rb - half))
    expected = []
    for e in range(rows.shape[0]):
        for t in range(n // 4):
            for piece in range(rb // 64):
                expected += [rows[e, 4 * t + r, 64 * piece:64 * (piece + 1)] for r in range(4)]
        expected += [rows[e, r] for r in range(n // 4 * 4, n)]
    assert out.shape == (*lead, n * rb) and torch.equal(out.reshape(-1), torch.cat(expected))
    assert cpu.interleaved_indices(idx) is out  # cached


def test_decode_threads_moves_a_large_bf16_head_into_huge_pages():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2048, 1024, bias=False, dtype=torch.bfloat16)  # 4 MiB

        def get_output_embeddings(self):
            return self.head

    toy, x = Toy(), torch.randn(1, 1, 2048).bfloat16()
    weight, values = toy.head.weight, toy.head.weight.detach().clone()
    with torch.no_grad(), cpu.decode_threads(model=toy):
        y = toy.head(x)
    assert toy.head.weight is weight and torch.equal(weight, values) and weight.data_ptr() % cpu.HUGE_PAGE == 0
    assert torch.equal(y, cpu.linear_bf16(x, values))


def test_decode_threads_routes_the_bf16_head_and_restores_it():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(64, 300, bias=False, dtype=torch.bfloat16)

        def get_output_embeddings(self):
            return self.head

    toy, x = Toy(), torch.randn(1, 1, 64).bfloat16()
    plain = torch.nn.functional.linear(x, toy.head.weight)
    with torch.no_grad():
        with cpu.decode_threads(model=toy):
            assert torch.equal(toy.head(x), cpu.linear_bf16(x, toy.head.weight))
        assert "forward" not in toy.head.__dict__ and torch.equal(toy.head(x), plain)
    with cpu.decode_threads(model=toy):  # with gradients: torch's linear, differentiable
        assert "forward" in toy.head.__dict__
        toy.head(x.requires_grad_()).sum().backward()
    assert x.grad is not None
    with kernel_options(backend="reference"), cpu.decode_threads(model=toy):
        assert "forward" not in toy.head.__dict__


def test_modules_dispatch_to_cpu_backend():
    weight = random_packed(33, 256, group_size=64, seed=4)
    act = ActQuantSpec(4)
    assert select(Case(Op.LINEAR, torch.randn(2, 256), weight, act)).fn is cpu.linear
    layer = CodeQuantLinear.from_packed(weight, torch.randn(33), act=act)
    x = torch.randn(2, 3, 256)
    assert torch.equal(layer(x), cpu.linear(x, weight, act, layer.bias))
    gate_up = random_packed(64, 128, group_size=128, seed=7, lead=(3,))
    down = random_packed(128, 32, group_size=32, seed=8, lead=(3,))
    experts = CodeQuantExperts.from_packed(gate_up, down, act)
    xe, ti, tw = torch.randn(4, 128), torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0]]), torch.rand(4, 2)
    assert select(Case(Op.MOE, xe, gate_up, act, down, act, ti, tw)).fn is cpu.moe
    assert torch.equal(experts(xe, ti, tw), cpu.moe(xe, ti, tw, gate_up, down, act, act))


def test_training_calls_fall_back_to_reference():
    weight = random_packed(16, 128, group_size=128, seed=11)
    x = torch.randn(2, 128, requires_grad=True)
    assert not cpu.supports_linear(Case(Op.LINEAR, x, weight, ActQuantSpec(4)))
    assert select(Case(Op.LINEAR, x, weight, ActQuantSpec(4))).name == "reference"
    y = kernels.linear(x, weight, ActQuantSpec(4))
    y.sum().backward()  # the reference path's straight-through gradient
    assert x.grad is not None
    torch.testing.assert_close(y, reference.linear(x, weight, ActQuantSpec(4)))


def test_int8_cache_follows_in_place_updates():
    weight = random_packed(8, 128, group_size=128, seed=12)
    layer = CodeQuantLinear.from_packed(weight, act=ActQuantSpec(8))
    x = torch.randn(1, 128)
    layer(x)
    with torch.no_grad():
        layer.codebook.mul_(2)
    check = reference.linear(x, layer.packed, layer.act)
    err = (layer(x) - check).abs()
    assert bool((err <= tolerance(x, layer.packed, layer.act)).all())


def test_forced_isa_env_is_validated():
    assert cpu.isa() in ISAS
    with pytest.raises(ValueError):
        _lut.set_isa("sse9")


@pytest.mark.skipif("avx512" not in ISAS, reason="no AVX-512")
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_vpermb_and_vpshufb_lookups_agree(m):
    """The AVX-512 integer kernel with vpermb (VBMI) and with vpshufb + masks: same results
    bit for bit (tile rows, tail rows, per-row and 128-column codebook groups)."""
    for n, k, g in ((70, 768, 768), (37, 1024, 128)):
        weight = random_packed(n, k, group_size=g, seed=n + m)
        x = torch.randn(m, k)
        with cpu.use_isa("avx512"):
            for act in (ActQuantSpec(8), ActQuantSpec(4, 256)):
                fast = cpu.linear(x, weight, act)
                old = _lut.tune(1, 1)
                try:
                    slow = cpu.linear(x, weight, act)
                finally:
                    _lut.tune(1, old)
                assert torch.equal(fast, slow)
                check_linear(x, weight, act, None, "avx512")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", [ActQuantSpec(16), ActQuantSpec(8), ActQuantSpec(4, 64)])
def test_bf16_in_kernel_matches_float_path(isa, act):
    """bf16 inputs, biases and outputs handled in the kernel: the same as converting the
    input and bias to float32 first and rounding the float32 result to bf16 (torch's RNE)."""
    weight = random_packed(45, 320, group_size=64, seed=21)
    x = torch.randn(2, 3, 320).to(torch.bfloat16)
    bias = torch.randn(45).to(torch.bfloat16)
    with cpu.use_isa(isa):
        y = cpu.linear(x, weight, act, bias)
        y32 = cpu.linear(x.float(), weight, act, bias.float())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 45)
    assert torch.equal(y, y32.to(torch.bfloat16))


def test_layout_and_spec_changes_between_calls():
    """Prepared plans: non-contiguous inputs and weights, a new activation spec for the same
    weight, and an ISA switch all give the reference results."""
    weight = random_packed(24, 256, group_size=64, seed=31)
    x = torch.randn(256, 3).T  # non-contiguous
    for act in (ActQuantSpec(8), ActQuantSpec(4, 128), ActQuantSpec(16), ActQuantSpec(8)):
        for isa in ISAS:
            check_linear(x, weight, act, None, isa)
    strided = PackedWeight(weight.indices.T.contiguous().T, weight.codebook.transpose(0, 1).contiguous().transpose(0, 1),
                           weight.row_sum, weight.in_features)
    assert not strided.indices.is_contiguous() and not strided.codebook.is_contiguous()
    check_linear(x.contiguous(), strided, ActQuantSpec(8), None, ISAS[-1])


@pytest.mark.parametrize("act", [ActQuantSpec(16), ActQuantSpec(8)])
def test_moe_prepared_weights_follow_in_place_updates(act):
    """The fused MoE call reuses per-weight preparation across calls; an in-place update of
    a codebook or of the indices must be seen (result = that of fresh copies of the weights)."""
    e, h, inter = 4, 128, 64
    gate_up = random_packed(2 * inter, h, group_size=64, seed=40, lead=(e,))
    down = random_packed(h, inter, group_size=32, seed=41, lead=(e,))
    x, top_i, top_w = torch.randn(3, h), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2)

    def fresh(w: PackedWeight) -> PackedWeight:
        return PackedWeight(w.indices.clone(), w.codebook.clone(), w.row_sum.clone(), w.in_features)

    cpu.moe(x, top_i, top_w, gate_up, down, act, act)
    with torch.no_grad():
        gate_up.codebook.mul_(-1.5)
        down.indices.copy_(down.indices.flip(-1))
    y = cpu.moe(x, top_i, top_w, gate_up, down, act, act)
    assert torch.equal(y, cpu.moe(x, top_i, top_w, fresh(gate_up), fresh(down), act, act))
    ref = reference.moe(x, top_i, top_w, int8_emulated(gate_up, act), int8_emulated(down, act), act, act)
    assert rel_err(y, ref) < (CPU_FLOAT32 if not act.enabled else CPU_INT8)


@pytest.mark.parametrize("act", [ActQuantSpec(16), ActQuantSpec(8)])
def test_moe_threads_do_not_change_results(act):
    """Large enough for the thread pool (small calls run on one thread): same bits either way."""
    e, h, inter = 4, 512, 256
    gate_up = random_packed(2 * inter, h, group_size=h, seed=50, lead=(e,))
    down = random_packed(h, inter, group_size=inter, seed=51, lead=(e,))
    x, top_i, top_w = torch.randn(5, h), torch.randint(0, e, (5, 2)), torch.rand(5, 2)
    one = cpu.moe(x, top_i, top_w, gate_up, down, act, act, threads=1)
    assert torch.equal(one, cpu.moe(x, top_i, top_w, gate_up, down, act, act, threads=2))
    ref = reference.moe(x, top_i, top_w, int8_emulated(gate_up, act), int8_emulated(down, act), act, act)
    assert rel_err(one, ref) < (CPU_FLOAT32 if not act.enabled else CPU_INT8)


def test_missing_extension_is_logged_and_falls_back_to_the_reference():
    """Without the compiled extension the cpu backend is absent, one warning says why and how to
    fix it, the ops run on the reference (one more warning, naming the op and the missing
    backend), and asking for the cpu backend explicitly is an error."""
    script = textwrap.dedent("""
        import logging, sys, torch
        sys.modules["codequant.kernels.cpu._lut"] = None  # the extension failed to build
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from codequant import kernels
        from codequant.core.activations import ActQuantSpec
        from codequant.core.format import pack
        w, x = pack(torch.randint(0, 16, (8, 64)), torch.randn(8, 1, 16)), torch.randn(2, 64)
        print(sorted({k.backend for k in kernels.implementations(kernels.Op.LINEAR)}))
        for _ in range(2):
            print(torch.equal(kernels.linear(x, w, ActQuantSpec(4)), kernels.reference.linear(x, w, ActQuantSpec(4))))
        try:
            kernels.linear(x, w, ActQuantSpec(4), backend="cpu")
        except ValueError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING")]
    missing = "codequant CPU kernels are not built (import of codequant.kernels.cpu._lut halted; None in sys.modules); " \
              "reinstall with `pip install .`"
    assert warnings[0] == f"WARNING {missing}; until then cpu ops run on the reference implementation (slow)"
    assert warnings[1:] == [f"WARNING linear: no kernel for cpu tensors is available (not loaded: cpu: {missing}), for x (2, 64) "
                            "torch.float32 on cpu, weight packed [8, 64] in 1 codebook group(s), act ActQuantSpec(bits=4, "
                            "group_size=0, clip=1.0); running the reference implementation (slow)"]
    lines = out.stdout.splitlines()
    assert "'cpu'" not in lines[0] and lines[1] == lines[2] == "True"
    assert lines[3] == "kernel backend 'cpu' has no 'linear' here; available: " + lines[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_decode_matches_attention_in_float64(dtype):
    """One query position over a cache: GQA, MQA and multi-head, key and value widths that
    differ (MLA), a batch of two; float32 sums against float64 (plus the bf16 output rounding),
    the same bits on any thread count."""
    gen = torch.Generator().manual_seed(0)
    for b, hq, hkv, t, dk, dv in ((1, 32, 4, 40, 128, 128), (2, 8, 8, 7, 64, 64), (1, 4, 1, 5, 32, 32), (1, 16, 16, 33, 192, 128)):
        q = torch.randn(b, hq, 1, dk, generator=gen).to(dtype)
        k, v = torch.randn(b, hkv, t, dk, generator=gen).to(dtype), torch.randn(b, hkv, t, dv, generator=gen).to(dtype)
        g = hq // hkv
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), scale=0.1).transpose(1, 2)
        out = cpu.attention_decode(q, k, v, 0.1, threads=2)
        assert out.shape == (b, 1, hq, dv) and out.dtype == dtype
        tol = 1e-5 + (2 * BF16_EPS * ref.abs() if dtype is torch.bfloat16 else 0)
        assert bool(((out.double() - ref).abs() <= tol).all())
        assert torch.equal(out, cpu.attention_decode(q, k, v, 0.1, threads=1))


def test_attention_decode_refuses_what_it_does_not_compute():
    q, k = torch.randn(1, 6, 1, 16), torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match=r"with Hkv dividing Hq, got \(1, 6, 1, 16\), \(1, 4, 5, 16\)"):
        cpu.attention_decode(q, k, k, 0.25)
    with pytest.raises(ValueError, match="attention_decode needs CPU query"):
        cpu.attention_decode(torch.randn(1, 4, 2, 16), k, k, 0.25)  # two query positions


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v2", "olmoe", "qwen2_moe", "llama"])
def test_rms_norm_is_transformers_norm(arch):
    """Every norm of the architecture that decode_threads routes is transformers' RMSNorm
    arithmetic: bit-identical in bf16, float32 within the order of the sum of squares."""
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model(arch)
    norms = [m for m in model.modules() if cpu._is_plain_rms_norm(m)]
    assert norms and all(type(m).__name__.endswith("RMSNorm") for m in norms)
    norm = norms[0]
    x = 3 * torch.randn(2, 5, norm.weight.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(cpu.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x), rtol=1e-6, atol=1e-6)
        norm.to(torch.bfloat16)
        assert torch.equal(cpu.rms_norm(x.bfloat16(), norm.weight, norm.variance_epsilon), norm(x.bfloat16()))
    from codequant.modules.norm import RMSNorm

    assert not cpu._is_plain_rms_norm(RMSNorm(8)) and not cpu._is_plain_rms_norm(torch.nn.LayerNorm(8))
    with pytest.raises(ValueError, match="of one dtype, bf16 or float32, got torch.float32"):
        cpu.rms_norm(x, norm.weight, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_threads_decodes_as_transformers_and_restores_the_model(dtype, monkeypatch):
    """Inside decode_threads a Qwen3-MoE model on sdpa decodes through attention_decode (every
    step after the prompt) and rms_norm: the same greedy tokens as outside, logits within float32
    (bf16: a few bf16) rounding, and the model's attention implementation and norm forwards come
    back after."""
    from tests.helpers.tiny_models import tiny_input_ids, tiny_model

    calls = []
    real = cpu.attention_decode
    monkeypatch.setattr(cpu, "attention_decode", lambda *a: calls.append(1) or real(*a))

    model = tiny_model("qwen3_moe").to(dtype)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = None
    prompt = tiny_input_ids(batch=1, seq=8)
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(prompt, **kwargs)
        with cpu.decode_threads(model=model):
            assert model.config._attn_implementation == cpu.DECODE_ATTENTION
            fast = model.generate(prompt, **kwargs)
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert len(calls) == 11 * model.config.num_hidden_layers  # 12 new tokens: 11 decode steps
    assert torch.equal(fast.sequences, plain.sequences)
    tol = 1e-4 if dtype is torch.float32 else 0.1
    assert max(float((a - b).abs().max()) for a, b in zip(fast.logits, plain.logits)) < tol


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs and Linux affinity")
def test_worker_cpus_pins_the_pools_workers():
    """A caller pinned to one core (vLLM's CPU worker pins its model thread) creates pool workers with
    its own mask; worker_cpus moves them, and workers created later, to the CPUs given, and an empty
    list stops pinning new ones. A fresh process: the workers start at its first multi-threaded job."""
    script = textwrap.dedent("""
        import os, torch
        import codequant.kernels.cpu as cpu
        from codequant.core.format import pack
        from codequant.core.activations import ActQuantSpec
        torch.set_num_threads(1)  # no OpenMP workers: the new threads are the pool's
        everything = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(everything)})
        weight = pack(torch.randint(0, 16, (1024, 1024)), torch.randn(1024, 1, 16))
        def grow(threads):
            before = set(os.listdir("/proc/self/task"))
            cpu.linear(torch.randn(1, 1024), weight, ActQuantSpec(8), threads=threads)
            return [int(t) for t in set(os.listdir("/proc/self/task")) - before]
        first = grow(2)
        print([sorted(os.sched_getaffinity(t)) for t in first])
        print(cpu.worker_cpus(everything), [sorted(os.sched_getaffinity(t)) for t in first])
        print([sorted(os.sched_getaffinity(t)) for t in grow(3)])
        cpu.worker_cpus([])
        print([sorted(os.sched_getaffinity(t)) for t in grow(4)])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    alone, everything = [min(os.sched_getaffinity(0))], sorted(os.sched_getaffinity(0))
    assert out == [str([alone]), f"True {[everything]}", str([everything]), str([alone])]


def _lean_model(arch: str) -> torch.nn.Module:
    """A tiny bf16 model on CodeQuant modules (quantize_tiny: routers quantized, o_proj and
    experts with online Hadamard) that the lean decode step supports."""
    from tests.helpers.packed import quantize_tiny
    from tests.helpers.tiny_models import tiny_model

    model = quantize_tiny(tiny_model(arch).to(torch.bfloat16))
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = None
    return model


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_lean_decode_step_decodes_as_the_layer_ops(arch, monkeypatch):
    """Inside decode_threads a supported model decodes with one decode_layer call per layer and
    step: the same greedy tokens and caches as transformers' layers op by op (lean=False), logits
    within a few bf16 steps (the router's and the Hadamard's float sums run in another order),
    through several regrowths of the cache buffers."""
    from codequant.kernels.cpu import decode
    from tests.helpers.tiny_models import tiny_input_ids

    monkeypatch.setattr(decode, "CACHE_GROWTH", 3)
    calls = []
    real = _lut.decode_layer
    monkeypatch.setattr(decode._lut, "decode_layer", lambda *a: calls.append(1) or real(*a))
    model = _lean_model(arch)
    prompt = tiny_input_ids(batch=1, seq=8)
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with cpu.decode_threads(model=model, lean=False):
            ops = model.generate(prompt, **kwargs)
        assert not calls
        with cpu.decode_threads(model=model):
            lean = model.generate(prompt, **kwargs)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert len(calls) == 11 * model.config.num_hidden_layers
    assert torch.equal(lean.sequences, ops.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(lean.logits, ops.logits)) < 0.1
    for a, b in zip(lean.past_key_values.layers, ops.past_key_values.layers):
        assert a.keys.shape == b.keys.shape == (1, model.config.num_key_value_heads, 8 + 11, a.keys.shape[-1])
        assert float((a.keys.float() - b.keys.float()).abs().max()) < 0.1
        assert float((a.values.float() - b.values.float()).abs().max()) < 0.1


def test_lean_decode_step_leaves_other_calls_to_transformers(monkeypatch):
    """Batched decoding is not a lean step: transformers' forward runs it, with the same result."""
    from codequant.kernels.cpu import decode
    from tests.helpers.tiny_models import tiny_input_ids

    calls = []
    real = _lut.decode_layer
    monkeypatch.setattr(decode._lut, "decode_layer", lambda *a: calls.append(1) or real(*a))
    model = _lean_model("qwen3_moe")
    prompt = tiny_input_ids(batch=2, seq=8)
    with torch.no_grad():
        with cpu.decode_threads(model=model, lean=False):
            ops = model.generate(prompt, max_new_tokens=4, do_sample=False)
        with cpu.decode_threads(model=model):
            lean = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert not calls and torch.equal(lean, ops)


def test_lean_decode_step_says_what_it_does_not_cover():
    from codequant.kernels.cpu.decode import LeanDecoder, Unsupported
    from tests.helpers.tiny_models import tiny_model

    with pytest.raises(Unsupported, match="runs bf16 models on the CPU"):
        LeanDecoder(_lean_model("qwen3_moe").float())
    with pytest.raises(Unsupported, match="LlamaForCausalLM: the lean decode step covers Qwen3-MoE and Mixtral models"):
        LeanDecoder(tiny_model("llama").to(torch.bfloat16))
    with pytest.raises(Unsupported, match="layer 0: the attention projections are not CodeQuantLinear"):
        LeanDecoder(tiny_model("qwen3_moe").to(torch.bfloat16))


def test_lean_decode_step_runs_a_pipeline_checkpoint(tmp_path, monkeypatch):
    """`codequant quantize` of the bundled Qwen3-MoE model (W4A4: quantized routers, online
    Hadamard before the experts' down projections) loads as a bf16 model that decodes lean, with
    the layer-ops tokens."""
    from transformers import AutoModelForCausalLM

    from codequant.cli import FIXTURE, main
    from codequant.kernels.cpu import decode
    from codequant.modules.router import FusedRouter

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"The council met on day {i} and voted." for i in range(40)))
    out = tmp_path / "q"
    assert main(["quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), "--method", "rtn", "--nsamples", "2",
                 "--seqlen", "32", "--device", "cpu", "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype is torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.gate, FusedRouter)  # fused at loading, still lean
    calls = []
    real = _lut.decode_layer
    monkeypatch.setattr(decode._lut, "decode_layer", lambda *a: calls.append(1) or real(*a))
    prompt = torch.tensor([[11, 12, 13, 14, 15]])
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        with cpu.decode_threads(model=model, lean=False):
            ops = model.generate(prompt, **kwargs)
        with cpu.decode_threads(model=model):
            lean = model.generate(prompt, **kwargs)
    assert len(calls) == 7 * model.config.num_hidden_layers
    assert torch.equal(lean.sequences, ops.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(lean.logits, ops.logits)) < 0.25
