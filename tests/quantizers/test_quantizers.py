"""Weight quantizers: k-means codebooks, RTN, GPTQ, feedback codebooks (src/codequant/quantizers/{codebook,uniform,gptq,feedback}.py)."""

from __future__ import annotations

import math

import pytest
import torch

from codequant.core.activations import ActQuantSpec, quantize_activations
from codequant.core.format import pack
from codequant.quantizers.codebook import assign, fit_codebooks, reconstruct
from codequant.quantizers.feedback import feedback_codebooks, output_error
from codequant.quantizers.gptq import accumulate_hessian, gptq
from codequant.quantizers.uniform import rtn, uniform_grid

# Named error limits.
KMEANS_VS_RTN_HEAVY = 0.5  # k-means MSE / RTN MSE on heavy-tailed rows, 4 bits
KMEANS_VS_OPTIMUM = 1.05  # k-means error / exact optimal 1-D clustering error
GPTQ_VS_RTN = 0.5  # GPTQ output error / RTN output error on correlated inputs
FEEDBACK_VS_NEAREST = 0.8  # feedback codebook output error / nearest-centroid (k-means) output error
FP16_CODEBOOK_STEP = 0.01  # packing moves RTN weights by at most this fraction of a step


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _student_t(shape, df=2.0, seed=0):
    g = _gen(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((*shape, int(df)), generator=g).pow(2).sum(-1)
    return z / (chi2 / df).sqrt()


def _with_outliers(shape, seed=0):
    g = _gen(seed)
    w = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.005
    return torch.where(mask, 20 * w, w)


def _mse(a, b, weight=None):
    d = (a - b) ** 2
    return (d if weight is None else d * weight).mean().item()


def _optimal_1d(x: torch.Tensor, w: torch.Tensor, size: int) -> float:
    """Least weighted k-means error of one row, by exact dynamic programming over sorted values."""
    xs, order = x.double().sort()
    ws = w.double()[order]
    zero = torch.zeros(1, dtype=torch.float64)
    p0, p1, p2 = (torch.cat((zero, v.cumsum(0))) for v in (ws, ws * xs, ws * xs * xs))
    m = p0[None, :] - p0[:, None]
    s = p1[None, :] - p1[:, None]
    cost = (p2[None, :] - p2[:, None]) - s * s / m.clamp_min(1e-300)
    n = xs.numel()
    cost = torch.where(torch.ones(n + 1, n + 1, dtype=torch.bool).triu(1), cost, torch.full_like(cost, math.inf))
    best = cost[0].clone()
    for _ in range(size - 1):
        best = torch.minimum(best, (best[:, None] + cost).min(0).values)
    return best[n].item()


# ---------------------------------------------------------------- k-means codebooks


@pytest.mark.parametrize("bits,group", [(2, None), (3, 32), (4, 64), (4, None)])
def test_each_group_uses_at_most_2_pow_bits_values(bits, group):
    w = _student_t((3, 8, 128), seed=1)
    idx, cb = fit_codebooks(w, bits=bits, group_size=group)
    g = group or 128
    assert idx.dtype == torch.int64 and idx.shape == w.shape
    assert cb.dtype == torch.float32 and cb.shape == (3, 8, 128 // g, 2**bits)
    assert int(idx.min()) >= 0 and int(idx.max()) < 2**bits
    w_hat = reconstruct(idx, cb, group).view(3, 8, 128 // g, g)
    for row in w_hat.reshape(-1, g):
        assert row.unique().numel() <= 2**bits
    assert torch.all(cb[..., 1:] >= cb[..., :-1])  # centroids come out ascending


@pytest.mark.parametrize("make", [_student_t, _with_outliers])
def test_kmeans_beats_rtn_on_heavy_tails(make):
    w = make((64, 512), seed=2)
    km = reconstruct(*fit_codebooks(w, bits=4))
    un = reconstruct(*rtn(w, bits=4))
    assert _mse(w, km) < KMEANS_VS_RTN_HEAVY * _mse(w, un)


def test_kmeans_is_close_to_the_exact_optimum():
    w = torch.cat((_student_t((3, 256), seed=3), _with_outliers((3, 256), seed=4)))
    imp = torch.rand(256, generator=_gen(5)) ** 3 + 0.01
    for importance in (None, imp):
        h = torch.ones(256) if importance is None else importance
        idx, cb = fit_codebooks(w, bits=3, importance=importance)
        w_hat = reconstruct(idx, cb)
        for row, row_hat in zip(w, w_hat):
            err = ((row - row_hat) ** 2 * h).sum().item()
            assert err <= KMEANS_VS_OPTIMUM * _optimal_1d(row, h, 8) + 1e-9


def test_importance_lowers_the_weighted_error():
    w = torch.randn(32, 256, generator=_gen(6))
    imp = torch.exp(3 * torch.randn(256, generator=_gen(7)))
    plain = reconstruct(*fit_codebooks(w, bits=3))
    weighted = reconstruct(*fit_codebooks(w, bits=3, importance=imp))
    assert _mse(w, weighted, imp) < 0.8 * _mse(w, plain, imp)
    assert _mse(w, plain) < _mse(w, weighted)  # the trade goes the other way unweighted


def test_zero_importance_columns_still_get_a_centroid():
    w = torch.randn(4, 128, generator=_gen(8))
    imp = torch.rand(128, generator=_gen(9))
    imp[:64] = 0
    idx, cb = fit_codebooks(w, bits=4, importance=imp)
    assert torch.isfinite(cb).all()
    assert _mse(w, reconstruct(idx, cb)) < 0.1 * w.var().item()


def test_fit_is_deterministic_and_handles_constant_groups():
    w = _with_outliers((2, 4, 256), seed=10)
    w[0, 0] = 0.5
    a, b = fit_codebooks(w, group_size=64), fit_codebooks(w, group_size=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(reconstruct(*a, 64)[0, 0], w[0, 0])


def test_expert_stack_matches_per_expert_loop():
    w = _student_t((3, 16, 128), seed=11)
    imp = torch.rand(3, 128, generator=_gen(12)) + 0.1
    idx, cb = fit_codebooks(w, bits=4, group_size=64, importance=imp)
    for e in range(3):
        idx_e, cb_e = fit_codebooks(w[e], bits=4, group_size=64, importance=imp[e])
        assert torch.equal(idx[e], idx_e)
        torch.testing.assert_close(cb[e], cb_e, rtol=1e-6, atol=1e-7)


def test_pack_round_trip_of_kmeans_codebooks():
    w = 0.02 * _student_t((2, 8, 256), seed=13)
    for bits, group in ((4, None), (3, 64), (2, 128)):
        idx, cb = fit_codebooks(w, bits=bits, group_size=group)
        packed = pack(idx, cb)
        expected = reconstruct(idx, cb.half().float(), group)
        assert torch.equal(packed.dequantize(), expected)
        torch.testing.assert_close(packed.dequantize(), reconstruct(idx, cb, group), rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- assignment


def _brute_force(w, cb, g, a=None, b=None):
    *lead, n, k = w.shape
    c = cb.repeat_interleave(g, dim=-2)  # [..., N, K, C]
    if a is None:
        obj = (w[..., None] - c) ** 2
    else:
        obj = (b[..., None, :, None] * w[..., None] - a[..., None, :, None] * c) ** 2
    return obj, obj.argmin(-1)


def test_assign_plain_and_unit_weights_are_nearest():
    w = torch.randn(2, 8, 128, generator=_gen(14))
    cb = torch.randn(2, 8, 2, 16, generator=_gen(15))  # unsorted, as after fine-tuning
    obj, brute = _brute_force(w, cb, 64)
    idx = assign(w, cb, 64)
    assert torch.equal(idx, brute)
    ones = torch.ones(128)
    assert torch.equal(assign(w, cb, 64, a=ones, b=ones), idx)


def test_activation_weighted_assign_minimises_the_objective():
    w = torch.randn(3, 8, 64, generator=_gen(16))
    cb = torch.randn(3, 8, 2, 8, generator=_gen(17))
    a = torch.rand(3, 64, generator=_gen(18)) + 0.05
    b = a * (1 + 0.5 * torch.randn(3, 64, generator=_gen(19)))
    a[0, :4] = 0  # a dead input: every centroid ties
    idx = assign(w, cb, 32, a=a, b=b)
    obj, brute = _brute_force(w, cb, 32, a, b)
    chosen = obj.gather(-1, idx[..., None])[..., 0]
    best = obj.min(-1).values
    torch.testing.assert_close(chosen, best, rtol=1e-5, atol=1e-6)
    live = (a != 0)[:, None, :].expand_as(idx)
    assert (idx != brute)[live].float().mean() < 0.01  # rounding at near-ties only
    assert not torch.equal(idx, assign(w, cb, 32))  # the weighting changes the choice


def test_reassigning_a_fitted_codebook_keeps_it_fixed():
    w = _with_outliers((4, 256), seed=20)
    idx, cb = fit_codebooks(w, bits=4, group_size=128)
    assert torch.equal(assign(w, cb, 128), idx)


# ---------------------------------------------------------------- RTN


def test_rtn_matches_the_direct_formula():
    w = torch.randn(2, 6, 96, generator=_gen(21)) * 0.05 + 0.01
    for bits, group in ((4, None), (3, 32), (2, 48)):
        idx, cb = rtn(w, bits=bits, group_size=group)
        g = group or 96
        wg = w.view(2, 6, 96 // g, g)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        qmax = 2**bits - 1
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(wg / scale) + zero, 0, qmax)
        assert torch.equal(idx, q.long().view(w.shape))
        torch.testing.assert_close(reconstruct(idx, cb, group), (scale * (q - zero)).view(w.shape))
        assert cb.shape == (2, 6, 96 // g, 2**bits)


def test_rtn_constant_group_and_grid():
    w = torch.tensor([[0.3] * 8 + [-2.0] * 8 + [0.0] * 8])
    idx, cb = rtn(w, bits=4, group_size=8)
    assert torch.equal(reconstruct(idx, cb, 8), w)
    scale, zero = uniform_grid(torch.tensor([[-1.0, 0.5, 2.0]]), bits=2)
    assert torch.allclose(scale, torch.tensor([1.0])) and torch.equal(zero, torch.tensor([1.0]))


def test_rtn_survives_fp16_codebook_storage():
    w = 0.02 * torch.randn(16, 512, generator=_gen(22))
    idx, cb = rtn(w, bits=4, group_size=128)
    step = cb[..., 1] - cb[..., 0]
    moved = (pack(idx, cb).dequantize() - reconstruct(idx, cb, 128)).abs().view(16, 4, 128)
    assert (moved <= FP16_CODEBOOK_STEP * step[..., None]).all()


# ---------------------------------------------------------------- GPTQ


def _correlated_inputs(k, t=2048, seed=23):
    g = _gen(seed)
    mix = torch.randn(k // 4, k, generator=g)  # a few latent factors drive every channel
    scales = torch.exp(torch.randn(k, generator=g))
    return (torch.randn(t, k // 4, generator=g) @ mix + 0.3 * torch.randn(t, k, generator=g)) * scales


def _output_error(x, w, w_hat):
    return ((x @ w.T - x @ w_hat.T) ** 2).mean().item()


@pytest.mark.parametrize("group,act_order", [(None, False), (32, False), (32, True), (None, True)])
def test_gptq_beats_rtn_on_output_error(group, act_order):
    k = 128
    x = _correlated_inputs(k)
    w = torch.randn(48, k, generator=_gen(24))
    h, n = accumulate_hessian(None, x, 0)
    idx, cb = gptq(w, h, bits=4, group_size=group, block_size=32, act_order=act_order)
    assert idx.shape == w.shape and cb.shape == (48, k // (group or k), 16)
    assert int(idx.max()) <= 15 and int(idx.min()) >= 0
    w_gptq = reconstruct(idx, cb, group)
    w_rtn = reconstruct(*rtn(w, 4, group), group)
    assert _output_error(x, w, w_gptq) < GPTQ_VS_RTN * _output_error(x, w, w_rtn)


def test_gptq_expert_stack_matches_loop_and_handles_dead_columns():
    k = 64
    xs = [_correlated_inputs(k, 512, seed=25 + e) for e in range(3)]
    xs[1][:, 5] = 0  # an input channel that never fires
    hs = torch.stack([accumulate_hessian(None, x, 0)[0] for x in xs])
    w = torch.randn(3, 16, k, generator=_gen(28))
    idx, cb = gptq(w, hs, bits=3, group_size=32, block_size=16)
    assert torch.isfinite(cb).all()
    for e in range(3):
        idx_e, cb_e = gptq(w[e], hs[e], bits=3, group_size=32, block_size=16)
        assert torch.equal(idx[e], idx_e)
        torch.testing.assert_close(cb[e], cb_e)
    shared = gptq(w, hs[0], bits=3, group_size=32, block_size=16)
    assert torch.equal(shared[0][0], gptq(w[0], hs[0], bits=3, group_size=32, block_size=16)[0])


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(8, 64, generator=_gen(29))
    idx, cb = gptq(w, torch.eye(64), bits=4, group_size=16, damp=0.0)
    r_idx, r_cb = rtn(w, 4, 16)
    assert torch.equal(idx, r_idx)
    torch.testing.assert_close(cb, r_cb)


def test_streaming_hessian_equals_batch():
    x = torch.randn(3, 40, 16, generator=_gen(30))
    h, n = None, 0
    for chunk in (x[0], x[1], x[2, :7], x[2, 7:], x[2, :0]):
        h, n = accumulate_hessian(h, chunk, n)
    flat = x.reshape(-1, 16)
    assert n == 120
    torch.testing.assert_close(h, 2 / 120 * flat.T @ flat, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- feedback codebooks


@pytest.mark.parametrize("group", [None, 32])
def test_feedback_codebooks_beat_nearest_centroid_on_output_error(group):
    k = 128
    x = _correlated_inputs(k)
    w = torch.randn(48, k, generator=_gen(31))
    h, _ = accumulate_hessian(None, x, 0)
    idx, cb = fit_codebooks(w, 4, group, (x * x).mean(0))
    f_idx, f_cb = feedback_codebooks(w, h, idx, cb, group)
    assert f_idx.shape == idx.shape and f_cb.shape == cb.shape
    assert int(f_idx.min()) >= 0 and int(f_idx.max()) <= 15
    pack(f_idx, f_cb)  # the packed format takes the result unchanged
    nearest = _output_error(x, w, reconstruct(idx, cb, group))
    assert _output_error(x, w, reconstruct(f_idx, f_cb, group)) < FEEDBACK_VS_NEAREST * nearest
    # every row is at least as good as its k-means start under f = (w - w_hat) H (w - w_hat)^T
    f = lambda i, c: output_error(w[None], h[None], i[None], c[None], group or k)[0]  # noqa: E731
    assert (f(f_idx, f_cb) <= f(idx, cb) * (1 + 1e-5)).all()


def test_feedback_refit_lowers_the_error_of_the_walk_alone():
    k = 96
    x = _correlated_inputs(k, seed=32)
    w = torch.randn(40, k, generator=_gen(33))
    h, _ = accumulate_hessian(None, x, 0)
    start = fit_codebooks(w, 3, None, (x * x).mean(0))
    walked = feedback_codebooks(w, h, *start, alternations=1, refit=False)
    refit = feedback_codebooks(w, h, *start, alternations=1)
    assert _output_error(x, w, reconstruct(*refit)) < _output_error(x, w, reconstruct(*walked))


def test_feedback_expert_stack_matches_per_expert_loop():
    k = 64
    hs = torch.stack([accumulate_hessian(None, _correlated_inputs(k, 512, seed=34 + e), 0)[0] for e in range(3)])
    w = torch.randn(3, 16, k, generator=_gen(37))
    idx, cb = fit_codebooks(w, 4, 32)
    s_idx, s_cb = feedback_codebooks(w, hs, idx, cb, 32)
    for e in range(3):
        e_idx, e_cb = feedback_codebooks(w[e], hs[e], idx[e], cb[e], 32)
        assert torch.equal(s_idx[e], e_idx)
        torch.testing.assert_close(s_cb[e], e_cb)


def test_feedback_with_identity_hessian_keeps_nearest_centroid():
    w = torch.randn(8, 64, generator=_gen(38))
    idx, cb = fit_codebooks(w, 4, 16)
    f_idx, f_cb = feedback_codebooks(w, torch.eye(64), idx, cb, 16, damp=0.0)
    assert _output_error(torch.eye(64), w, reconstruct(f_idx, f_cb, 16)) <= _output_error(torch.eye(64), w, reconstruct(idx, cb, 16)) * (1 + 1e-6)
    walked, same_cb = feedback_codebooks(w, torch.eye(64), idx, cb, 16, refit=False, damp=0.0)
    assert torch.equal(walked, idx) and torch.equal(same_cb, cb)  # no coupling: the walk is nearest-centroid


def test_feedback_bad_hessian_shape():
    w = torch.randn(2, 4, 64)
    idx, cb = fit_codebooks(w, 4)
    with pytest.raises(ValueError, match=r"^hessian must be \[K, K\] or \[E, K, K\] with K = 64 and E = 2, got \(3, 64, 64\)$"):
        feedback_codebooks(w, torch.eye(64).expand(3, 64, 64), idx, cb)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_bad_bits(bits):
    w = torch.randn(4, 64)
    for fn in (fit_codebooks, rtn):
        with pytest.raises(ValueError, match=f"^bits must be between 2 and 4, got {bits}$"):
            fn(w, bits=bits)
    with pytest.raises(ValueError, match=f"^bits must be between 2 and 4, got {bits}$"):
        gptq(w, torch.eye(64), bits=bits)


def test_bad_group_size():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="^group size 64 does not divide the row length 96$"):
        fit_codebooks(w, group_size=64)
    with pytest.raises(ValueError, match="^group size 64 does not divide the row length 96$"):
        rtn(w, group_size=64)
    with pytest.raises(ValueError, match="^group size 64 does not divide the row length 96$"):
        gptq(w, torch.eye(96), group_size=64)
    with pytest.raises(ValueError, match="^group size 64 does not divide the row length 96$"):
        assign(w, torch.zeros(4, 1, 16), 64)
    with pytest.raises(ValueError, match="^activation group size 64 does not divide the row length 96$"):
        quantize_activations(w, ActQuantSpec(bits=4, group_size=64))


@pytest.mark.parametrize("group", [None, 8])
def test_codebook_gradient_equals_gather_and_keeps_indices_in_uint8(group):
    """ACCF's W_hat = C[idx]: the centroid gradient equals torch.gather's, and what the backward
    pass keeps is the uint8 idx (gather's own backward keeps an int64 copy, 8x the bytes)."""
    from torch.autograd.graph import saved_tensors_hooks

    from codequant.quantizers.accf import Codebook

    torch.manual_seed(0)
    w = torch.randn(3, 16, 32)
    idx, cb = fit_codebooks(w, 4, group)
    book = Codebook(idx, cb)
    upstream = torch.randn(w.shape)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        (book() * upstream).sum().backward()
    ref = cb.clone().requires_grad_(True)
    g = book.group_size
    (torch.gather(ref, -1, idx.reshape(3, 16, 32 // g, g)).reshape(w.shape) * upstream).sum().backward()
    torch.testing.assert_close(book.codebook.grad, ref.grad, rtol=0, atol=1e-6)
    assert saved and all(dtype != torch.int64 for dtype, _ in saved)
