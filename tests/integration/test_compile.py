"""torch.compile: the quantized modules are the opaque ops codequant::linear / codequant::moe,
so whole quantized models compile without graph breaks and give the eager outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codequant.core.format import pack
from codequant.modules.attention import fuse_qkv
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.core.activations import ActQuantSpec

from tests.helpers.errors import rel_err
from tests.helpers.packed import quantize_tiny, random_uniform_packed
from tests.helpers.tiny_models import SUPPORTED_TINY, tiny_input_ids, tiny_model

A4 = ActQuantSpec(bits=4, group_size=32, clip=0.9)
A16 = ActQuantSpec(bits=16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("act", [A16, A4], ids=["w4a16", "w4a4"])
def test_ops_pass_opcheck(act):
    """Schema, fake (meta) implementation and AOT dispatch of both ops agree with the real kernels."""
    w = random_uniform_packed((48, 64), 0)
    x = torch.randn(3, 5, 64)
    torch.library.opcheck(torch.ops.codequant.linear.default,
                          (x, w.indices, w.codebook, w.row_sum, 64, torch.randn(48), act.bits, act.group_size, act.clip, 16, None))
    gu, dn = random_uniform_packed((4, 64, 64), 1), random_uniform_packed((4, 64, 32), 2)
    idx = torch.randint(0, 4, (5, 2))
    torch.library.opcheck(torch.ops.codequant.moe.default,
                          (torch.randn(5, 64), idx, torch.rand(5, 2), gu.indices, gu.codebook, gu.row_sum, 64, dn.indices,
                           dn.codebook, dn.row_sum, 32, act.bits, act.group_size, act.clip, act.bits, 0, 1.0, 32, None))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))])
def test_compiled_modules_with_inductor_match_eager(device):
    """Inductor fuses the code around the ops; the ops themselves run the same kernels (the
    softmax fused by Inductor may round differently: float32 tolerance)."""
    torch.manual_seed(0)
    lin = CodeQuantLinear.from_packed(random_uniform_packed((64, 64), 3), torch.randn(64), act=A4, hadamard_block=16).to(device)
    gate_up, down = random_uniform_packed((4, 128, 64), 4), random_uniform_packed((4, 64, 64), 5)
    experts = CodeQuantExperts.from_packed(gate_up, down, A4, A16, hadamard_block=32).to(device)

    def block(x, idx, p):
        # x * 2 + 1 rounds the same fused or not: the W4A4 codes of both ops cannot flip
        h = lin(x * 2.0 + 1.0)
        return h + experts(h.reshape(-1, 64), idx, p.softmax(-1)).reshape(h.shape)

    g = torch.Generator().manual_seed(7)
    x, idx, p = torch.randn(6, 64, generator=g), torch.randint(0, 4, (6, 2), generator=g), torch.randn(6, 2, generator=g)
    x, idx, p = x.to(device), idx.to(device), p.to(device)
    want = block(x, idx, p)
    got = torch.compile(block, fullgraph=True)(x, idx, p)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("arch", SUPPORTED_TINY)
def test_quantized_model_compiles_fullgraph_and_matches_eager(arch):
    model = quantize_tiny(tiny_model(arch, seed=3)).eval()
    ids = tiny_input_ids(2, 12)
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_fused_qkv_model_compiles_fullgraph_and_matches_eager(arch):
    """Attention blocks with q/k/v as one op (fuse_qkv): still one graph, the eager outputs."""
    model = quantize_tiny(tiny_model(arch, seed=3)).eval()
    assert fuse_qkv(model, device_type=None) == 2
    ids = tiny_input_ids(2, 12)
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    assert torch.equal(got, want)


def test_eager_call_does_not_go_through_the_op(monkeypatch):
    """Eager decode pays no custom-op dispatch: the op is only what torch.compile sees."""
    lin = CodeQuantLinear.from_packed(random_uniform_packed((32, 64), 6))
    x = torch.randn(2, 64)
    want = lin(x)
    monkeypatch.setattr(torch.ops.codequant, "linear", None)
    assert torch.equal(lin(x), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_transformers_compiles_the_decode_step_on_cuda(tmp_path):
    """On a GPU, transformers compiles a CodeQuant checkpoint's decode step by itself (static
    cache, Inductor, CUDA graphs); its first compiled step scores like the uncompiled one.
    Per-token 4-bit activations: the configuration the GPU kernels run (group-wise activations
    fall back to a reference MoE that a CUDA graph cannot capture, refused with an error)."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from codequant.generate import compile_config
    from codequant.io import save_quantized

    model = quantize_tiny(tiny_model("qwen3_moe", seed=3)).cuda()
    for m in model.modules():
        if isinstance(m, (CodeQuantLinear, CodeQuantExperts)):
            m.act = ActQuantSpec(bits=4)
            if isinstance(m, CodeQuantExperts):
                m.down_act = ActQuantSpec(bits=4)
    experts = model.model.layers[0].mlp.experts
    experts.down_act = ActQuantSpec(bits=4, group_size=32)
    h, idx = torch.randn(3, experts.hidden_dim, device="cuda"), torch.randint(0, experts.num_experts, (3, 2), device="cuda")
    experts(h, idx, torch.rand(3, 2, device="cuda"))  # eager: the reference fallback runs
    with pytest.raises(RuntimeError, match="no GPU MoE kernel for activations"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        experts(h, idx, torch.ones(3, 2, device="cuda"))
    experts.down_act = ActQuantSpec(bits=4)
    ids = tiny_input_ids(1, 8).cuda()
    save_quantized(model.cpu(), tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").cuda().eval()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static", output_scores=True,
              return_dict_in_generate=True)
    want = model.generate(ids, disable_compile=True, **kw)
    counters.clear()
    got = model.generate(ids, compile_config=compile_config(), **kw)
    assert counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(got.sequences[:, :ids.shape[1] + 2], want.sequences[:, :ids.shape[1] + 2])
    a, b = got.scores[1].double(), want.scores[1].double()
    assert rel_err(a, b) < 2e-2
