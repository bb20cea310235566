"""fuse_qkv: which attention blocks it fuses, the concatenated packed weight, and that a fused
block gives the outputs of the three projections on the CPU paths (reference and C++ kernels).
The CUDA kernels at real sizes: tests/kernels/test_cuda_qkv.py; the Triton kernels:
tests/kernels/test_gpu.py; torch.compile: tests/integration/test_compile.py."""

from __future__ import annotations

import pytest
import torch

from codequant import kernels
from codequant.core.activations import ActQuantSpec
from codequant.io import save_quantized
from codequant.kernels import kernel_options
from codequant.modules.attention import FusedQKV, QKVSlice, concat_rows, fuse_qkv
from codequant.modules.linear import CodeQuantLinear
from tests.helpers.errors import max_rel_err
from tests.helpers.limits import LOGITS_SAME_COMPUTATION
from tests.helpers.packed import quantize_tiny, random_uniform_packed
from tests.helpers.tiny_models import SUPPORTED_TINY, tiny_input_ids, tiny_model

# attention blocks of the tiny models with q_proj, k_proj, v_proj (DeepSeek-V2's latent attention has none)
FUSED = {"deepseek_v2": 0, "llama": 2, "mixtral": 2, "olmoe": 2, "phimoe": 2, "qwen2_moe": 2, "qwen3": 2, "qwen3_moe": 2}
PARTS = ("indices", "codebook", "row_sum")


def quantized(arch: str, **overrides):
    return quantize_tiny(tiny_model(arch, seed=3, **overrides)).eval()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("arch", SUPPORTED_TINY)
def test_fused_model_gives_the_same_logits(arch, backend):
    model = quantized(arch)
    ids = tiny_input_ids(2, 12)
    with torch.no_grad(), kernel_options(backend=backend):
        want = model(ids).logits
        assert fuse_qkv(model, device_type=None) == FUSED[arch]
        assert fuse_qkv(model, device_type=None) == 0  # already fused
        got = model(ids).logits
    assert max_rel_err(got, want) < LOGITS_SAME_COMPUTATION


def test_olmoe_clip_of_the_value_columns():
    """OLMoE clamps v in place: on the fused block that is a view of [q | k | v], still the same logits."""
    model = quantized("olmoe", clip_qkv=0.05)
    ids = tiny_input_ids(2, 12)
    with torch.no_grad():
        want = model(ids).logits
        assert not torch.equal(want, quantized("olmoe")(ids).logits)  # the clip is active
        fuse_qkv(model, device_type=None)
        got = model(ids).logits
    assert max_rel_err(got, want) < LOGITS_SAME_COMPUTATION


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_concatenated_rows_and_split_outputs(backend):
    """qkv_proj's tensors are the projections' concatenated along rows; its output split by the
    QKVSlice modules is each projection's output (Qwen2-MoE: with biases)."""
    attn = quantized("qwen2_moe").model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x = torch.randn(3, 5, 64)
    with torch.no_grad(), kernel_options(backend=backend):
        want = [p(x) for p in (q, k, v)]
        assert fuse_qkv(attn, device_type=None) == 1
        fused = attn.qkv_proj
        got = [attn.q_proj(fused(x)), attn.k_proj(fused(x)), attn.v_proj(fused(x))]
    assert isinstance(attn, FusedQKV) and isinstance(fused, CodeQuantLinear)
    for part in (*PARTS, "bias"):
        assert torch.equal(getattr(fused, part), torch.cat([getattr(p, part) for p in (q, k, v)])), part
    assert (fused.act, fused.hadamard_block, fused.in_features) == (q.act, q.hadamard_block, q.in_features)
    assert [(s.start, s.stop) for s in (attn.q_proj, attn.k_proj, attn.v_proj)] == [(0, 64), (64, 128), (128, 192)]
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert max_rel_err(a, b) < LOGITS_SAME_COMPUTATION


def test_one_linear_call_for_q_k_v(monkeypatch):
    """A fused block runs the packed linear twice (q/k/v, o) instead of four times."""
    model = quantized("qwen3_moe")
    attn = model.model.layers[0].self_attn
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, w, *a, **kw: calls.append(w.out_features) or real(x, w, *a, **kw))
    x = torch.randn(1, 4, 64)
    pos = model.model.rotary_emb(x, torch.arange(4)[None])
    with torch.no_grad():
        want = attn(x, pos, None)[0]
        assert calls == [64, 32, 32, 64]
        fuse_qkv(attn, device_type=None)
        calls.clear()
        got = attn(x, pos, None)[0]
    assert calls == [128, 64]
    assert max_rel_err(got, want) < LOGITS_SAME_COMPUTATION


def test_blocks_left_apart():
    """Not fused: projections of other input transforms, float projections, other devices than asked."""
    for name, change in [("act", ActQuantSpec(bits=16)), ("hadamard_block", 16)]:
        model = quantized("llama")
        setattr(model.model.layers[0].self_attn.k_proj, name, change)
        assert fuse_qkv(model, device_type=None) == 1, name  # layer 1 only
        assert isinstance(model.model.layers[0].self_attn.k_proj, CodeQuantLinear)
    assert fuse_qkv(tiny_model("llama"), device_type=None) == 0  # nn.Linear projections
    assert fuse_qkv(quantized("llama")) == 0  # default: CUDA only; the CPU keeps its own decode step


def test_concat_rows_of_grouped_codebooks():
    linears = [CodeQuantLinear.from_packed(random_uniform_packed((n, 64), n), act=ActQuantSpec(bits=4), hadamard_block=16)
               for n in (48, 16, 16)]
    fused = concat_rows(linears)
    assert fused.codebook.shape == (80, 2, 16) and fused.hadamard_block == 16 and fused.bias is None
    x = torch.randn(7, 64)
    with torch.no_grad():
        assert max_rel_err(fused(x), torch.cat([m(x) for m in linears], -1)) < LOGITS_SAME_COMPUTATION


def test_slices_repr_and_fused_model_not_saved(tmp_path):
    model = quantized("qwen3_moe")
    fuse_qkv(model, device_type=None)
    assert isinstance(model.model.layers[1].self_attn.v_proj, QKVSlice)
    assert "columns 96:128 of qkv_proj" in repr(model.model.layers[1].self_attn.v_proj)
    with pytest.raises(ValueError, match="save the model before fusing"):
        save_quantized(model, tmp_path / "ckpt")
