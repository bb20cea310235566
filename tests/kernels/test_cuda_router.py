"""The fused CUDA router (cuda_gemv.route, codequant::route, modules.router.FusedRouter) against
transformers' own routers at real sizes: the same experts (apart from near-ties of the logits,
where the summation order decides), the routing weights within rounding, the same dtypes.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from transformers import DeepseekV2Config, MixtralConfig, OlmoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402

from codequant import kernels  # noqa: E402
from codequant.core.activations import ActQuantSpec  # noqa: E402
from codequant.kernels import kernel_options  # noqa: E402
from codequant.kernels.gpu import cuda_gemv  # noqa: E402
from codequant.modules.router import FusedRouter, fuse_routers  # noqa: E402
from tests.helpers.packed import random_packed  # noqa: E402

# name: (router class, config, experts, hidden, top-k)
ROUTERS = {
    "qwen3-30b-a3b": (Qwen3MoeTopKRouter, lambda: Qwen3MoeConfig(hidden_size=2048, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
    "qwen3-no-renorm": (Qwen3MoeTopKRouter, lambda: Qwen3MoeConfig(hidden_size=2048, num_experts=128, num_experts_per_tok=8, norm_topk_prob=False)),
    "olmoe": (OlmoeTopKRouter, lambda: OlmoeConfig(hidden_size=2048, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)),
    "mixtral-8x7b": (MixtralTopKRouter, lambda: MixtralConfig(hidden_size=4096, num_local_experts=8, num_experts_per_tok=2)),
    "deepseek-v2-lite": (DeepseekV2TopkRouter, lambda: DeepseekV2Config(hidden_size=2048, n_routed_experts=64, num_experts_per_tok=6,
                                                                        topk_method="greedy", n_group=1, topk_group=1,
                                                                        routed_scaling_factor=1.5)),
}


@pytest.fixture
def kernel_up_to_16_tokens(monkeypatch):
    """FusedRouter takes the kernel for every batch the kernel takes (by default only up to 4 tokens)."""
    monkeypatch.setattr(FusedRouter, "max_tokens", cuda_gemv.ROUTE_MAX_T)


def make_router(name: str, seed: int):
    cls, config = ROUTERS[name]
    torch.manual_seed(seed)
    router = cls(config()).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        router.weight.normal_(0, 0.02)  # Qwen3-30B-A3B's router rows have about this scale
    return router


def sort_desc(weights, index, logits):
    """(weights, index) ordered by the logit of each pick, larger first, ties to the lower index
    (DeepSeek-V2's top-k is unsorted)."""
    key = logits.float().gather(1, index)
    order = torch.argsort(index, dim=1, stable=True)
    key, index, weights = key.gather(1, order), index.gather(1, order), weights.gather(1, order)
    order = torch.argsort(-key, dim=1, stable=True)
    return weights.gather(1, order), index.gather(1, order)


def routing_of_logits(router, logits):
    """transformers' routing after the router's linear, on the given logits (the reference of the
    kernel's softmax / top-k / renormalization / scale)."""
    r = router.routing
    p = torch.softmax(logits.float(), dim=-1)
    w, i = torch.topk(p, r.top_k, dim=-1)
    if r.renorm:
        w = w / w.sum(-1, keepdim=True)
    return (w * r.scale).to(torch.float32 if r.fp32_weights else logits.dtype), i


def assert_same_picks(i, ref_i, logits, rtol, atol):
    """The picks agree position by position, except between experts whose logits are tied up to rtol / atol."""
    same = i == ref_i
    a, b = logits.float().gather(1, i)[~same], logits.float().gather(1, ref_i)[~same]
    assert torch.all((a - b).abs() <= rtol * torch.maximum(a.abs(), b.abs()) + atol), (i, ref_i)
    return same


@pytest.mark.parametrize("t", [1, 4, 16])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_fused_router_matches_transformers(name, t, kernel_up_to_16_tokens):
    router = make_router(name, seed=t)
    x = torch.randn(t, router.weight.shape[1], device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        ref_logits, ref_w, ref_i = router(x)
        assert fuse_routers(router) == 1 and isinstance(router, FusedRouter)
        assert kernels.route_supported(x, router.weight, router.routing.top_k)
        logits, w, i = router(x)
    assert (logits.dtype, w.dtype, i.dtype) == (ref_logits.dtype, ref_w.dtype, ref_i.dtype)
    assert logits.shape == ref_logits.shape and w.shape == ref_w.shape
    fp32 = logits.dtype == torch.float32
    # logits: fp32 sums of the exact products, then (16-bit models) one rounding to bf16
    exact = x.double() @ router.weight.double().T
    assert torch.allclose(logits.double(), exact, rtol=1e-5 if fp32 else 2.0 ** -8, atol=1e-4)
    # against transformers' router (cuBLAS sums in another order): the same experts, except near-ties
    ref_w, ref_i = sort_desc(ref_w, ref_i, ref_logits)
    same = assert_same_picks(i, ref_i, ref_logits, 1e-5 if fp32 else 2.0 ** -6, 1e-4)
    assert same.float().mean() > 0.9
    rows = same.all(1)
    assert torch.allclose(w[rows].float(), ref_w[rows].float(), rtol=1e-3 if fp32 else 2.0 ** -5, atol=1e-6)
    # softmax, top-k, renormalization and scale of the kernel's own logits: float rounding
    own_w, own_i = sort_desc(*routing_of_logits(router, logits), logits)
    same = assert_same_picks(i, own_i, logits, 0.0, 0.0)
    rows = same.all(1)
    wtol = 1e-5 if w.dtype == torch.float32 else 2.0 ** -7
    assert torch.allclose(w[rows].float(), own_w[rows].float(), rtol=wtol, atol=1e-7)


def test_ties_go_to_the_lower_expert_index():
    """Equal logits (duplicate router rows, in different blocks of the logits launch) are picked lower index first."""
    router = make_router("qwen3-30b-a3b", seed=0)
    x = torch.randn(4, 2048, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        router.weight[[3, 17, 90, 127]] = (x[0] * 0.05).to(torch.bfloat16)  # the best logits of token 0, all equal
        fuse_routers(router)
        logits, w, i = router(x)
    assert i[0, :4].tolist() == [3, 17, 90, 127]
    assert torch.equal(w[0, :4], w[0, :1].expand(4))


def test_launch_variants_agree_bit_for_bit(kernel_up_to_16_tokens):
    """PDL on / off compute each logit and pick the same way."""
    router = make_router("qwen3-30b-a3b", seed=1)
    fuse_routers(router)
    x0 = torch.randn(16, 2048, device="cuda").to(torch.bfloat16)

    def run():
        with torch.no_grad():
            return [router(x0 * (1 + s)) for s in range(3)]  # x from an elementwise kernel right before

    base = run()
    with kernel_options(cuda_pdl=False):
        plain = run()
    for a, b in zip(base, plain):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("e,k", [(1, 1), (7, 3), (130, 32), (1024, 8)])
@pytest.mark.parametrize("t", [1, 3, 12])
def test_route_kernel_against_torch(e, k, t):
    """cuda_gemv.route on odd expert counts (rows past the last full block of warps, one expert, the
    most experts and picks) and long rows (H = 4160: two loads of 2048 columns and a rest) against
    softmax / topk / renormalization in float64 of the kernel's own bf16 logits; NaN logits (a NaN
    row of x) come first and give NaN weights, as torch.topk orders them."""
    if t * e > cuda_gemv.ROUTE_MAX_LOGITS:
        pytest.skip("beyond the kernel's T * E")
    torch.manual_seed(e * 100 + t)
    h = 4160
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    w = (torch.randn(e, h, device="cuda") * 0.02).to(torch.bfloat16)
    if t > 1:
        x[-1, 5] = float("nan")
    logits, wts, idx = cuda_gemv.route(x, w, k, True, 1.5, False, True)
    exact = x.double() @ w.double().T
    ok = ~exact.isnan()
    assert torch.allclose(logits.double()[ok], exact[ok], rtol=2.0 ** -8, atol=1e-4)
    assert torch.equal(logits.isnan(), exact.isnan())
    key = logits.float().nan_to_num(nan=float("inf"))  # torch.topk puts NaN first
    ref_i = torch.stack([torch.tensor(sorted(range(e), key=lambda j: (-row[j].item(), j))[:k]) for row in key.cpu()]).cuda()
    assert torch.equal(idx, ref_i)
    p = torch.softmax(logits.double(), -1).gather(1, ref_i)
    ref_w = p / p.sum(-1, keepdim=True) * 1.5
    fin = ~ref_w.isnan().any(1)
    assert torch.allclose(wts.double()[fin], ref_w[fin], rtol=1e-5, atol=1e-7)
    assert torch.equal(wts.isnan(), ref_w.isnan())


def test_compiled_and_graph_captured_without_graph_breaks():
    """Under torch.compile the router is the op codequant::route (no graph break), and a CUDA
    graph of the compiled router replays the eager outputs."""
    torch._dynamo.reset()
    router = make_router("qwen3-30b-a3b", seed=2)
    fuse_routers(router)
    x = torch.randn(1, 2048, device="cuda").to(torch.bfloat16)
    compiled = torch.compile(router, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = compiled(x)
        x.copy_(torch.randn_like(x))
        g.replay()
        eager = router(x)
    assert all(torch.equal(a, b) for a, b in zip(out, eager))
    torch._dynamo.reset()


def test_large_batches_and_autograd_take_the_routers_own_forward(monkeypatch):
    router = make_router("qwen3-30b-a3b", seed=3)
    x = torch.randn(17, 2048, device="cuda").to(torch.bfloat16)
    calls = []
    route = kernels.route
    monkeypatch.setattr(kernels, "route", lambda *a: calls.append(a[0].shape[0]) or route(*a))
    with torch.no_grad():
        ref, ref5 = router(x), router(x[:5])
        fuse_routers(router)
        assert not kernels.route_supported(x, router.weight, 8)
        out = router(x)
        # 5 tokens: the kernel would take them, but above FusedRouter.max_tokens the router's forward is faster
        assert kernels.route_supported(x[:5], router.weight, 8) and FusedRouter.max_tokens == 4
        out5 = router(x[:5])
        assert calls == []
        router(x[:4])
        assert calls == [4]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(a, b) for a, b in zip(out5, ref5))
    assert not kernels.route_supported(x[:4], router.weight, 8)  # grad enabled and the weight requires grad


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_moe_launched_right_after_the_router_reads_its_routing(mode, t):
    """The MoE kernels queued right behind the router kernel (PDL; the W4A4 prologue lets its
    gate_up GEMV start at once, and that GEMV reads the expert ids before it waits) use this
    call's routing: the same output as the MoE run once the routing is finished. (A router
    kernel that triggered its dependents at its start let them read expert ids not yet
    written: an illegal address in the W4A4 end-to-end decode.)"""
    act = ActQuantSpec(bits=16 if mode == "w4a16" else 4)
    router = make_router("qwen3-30b-a3b", seed=4)
    fuse_routers(router)
    gu = random_packed(2 * 768, 2048, seed=5, lead=(128,), device="cuda")
    dn = random_packed(2048, 768, seed=6, lead=(128,), device="cuda")
    xs = [torch.randn(t, 2048, device="cuda").to(torch.bfloat16) for _ in range(8)]
    chained = []
    with torch.no_grad():
        for x in xs:
            torch.cuda._sleep(1_000_000)  # the GPU behind the host: router and MoE start back to back
            _, w, i = router(x)
            chained.append((cuda_gemv.moe(x, i, w, gu, dn, act, act), i, w))
        torch.cuda.synchronize()
        for x, (y, i, w) in zip(xs, chained):
            assert torch.equal(y, cuda_gemv.moe(x, i.clone(), w.clone(), gu, dn, act, act))
