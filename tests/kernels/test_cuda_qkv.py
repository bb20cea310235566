"""q/k/v as one CUDA launch (modules.attention.fuse_qkv) at real sizes: the fused linear against
the three separate launches it replaces (W4A16 and W4A4, 1-16 rows), a whole attention block
eager, in a CUDA graph and under torch.compile, and the fusion at checkpoint load. Skipped
without CUDA. Errors are relative Frobenius errors ||y - y_ref|| / ||y_ref||."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding  # noqa: E402

from codequant.core.activations import ActQuantSpec  # noqa: E402
from codequant.kernels import kernel_options, reference  # noqa: E402
from codequant.kernels.gpu import cuda_gemv  # noqa: E402
from codequant.modules.attention import FusedQKV, QKVSlice, concat_rows, fuse_qkv  # noqa: E402
from codequant.modules.linear import CodeQuantLinear  # noqa: E402
from tests.helpers.errors import max_rel_err, rel_err  # noqa: E402
from tests.helpers.limits import CUDA_BF16, CUDA_EXACT, LOGITS_SAME_COMPUTATION, OUTPUT_16BIT  # noqa: E402
from tests.helpers.packed import quantize_tiny, random_packed  # noqa: E402
from tests.helpers.tiny_models import tiny_input_ids, tiny_model  # noqa: E402

MODES = {"w4a16": ActQuantSpec(bits=16), "w4a4": ActQuantSpec(bits=4)}
# name: (q, k, v rows, K, biases)
SHAPES = {
    "qwen3-30b-a3b": ((4096, 512, 512), 2048, False),
    "llama-3-8b": ((4096, 1024, 1024), 4096, False),
    "qwen1.5-moe-a2.7b": ((2048, 2048, 2048), 2048, True),
}


@pytest.fixture
def launches(monkeypatch):
    """Calls of the CUDA decode GEMV and of its W4A4 prologue (cuda_gemv.linear, cuda_gemv._prep)."""
    counts = {"gemv": 0, "prep": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(cuda_gemv, "linear", counted("gemv", cuda_gemv.linear))
    monkeypatch.setattr(cuda_gemv, "_prep", counted("prep", cuda_gemv._prep))
    return counts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 2, 4, 8, 9, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_linear_matches_three_launches(shape, m, mode, launches):
    rows, k, biases = SHAPES[shape]
    act = MODES[mode]
    g = torch.Generator(device="cuda").manual_seed(sum(rows) + k + m)
    linears = [CodeQuantLinear.from_packed(random_packed(n, k, generator=g, device="cuda"),
                                           torch.randn(n, generator=g, device="cuda").bfloat16() if biases else None, act)
               for n in rows]
    fused = concat_rows(linears)
    x = (torch.randn(m, k, generator=g, device="cuda") * 2).bfloat16()
    prep = 1 if act.enabled else 0  # W4A16 reads bf16 x in place
    with torch.no_grad(), kernel_options(strict=True):
        want = [linear(x) for linear in linears]
        assert launches == {"gemv": 3, "prep": 3 * prep}
        y = fused(x)
    assert launches == {"gemv": 4, "prep": 4 * prep}  # one GEMV (and one quantization of x) for q, k and v
    ref = reference.linear(x.float(), fused.packed, act, fused.bias)
    assert rel_err(y, ref) < (CUDA_BF16 if mode == "w4a16" else OUTPUT_16BIT)
    for part, separate in zip(y.split(rows, -1), want):
        assert rel_err(part, separate) < OUTPUT_16BIT  # the same sums, rounded to bf16 (summed in another order)


def qwen3_attention(act: ActQuantSpec, seed: int):
    """A Qwen3-30B-A3B attention block (hidden 2048, 32 heads, 4 KV heads of 128) in bf16 on CUDA
    with random CodeQuantLinear projections, and its rotary embedding."""
    config = Qwen3MoeConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    config._attn_implementation = "sdpa"
    attn = Qwen3MoeAttention(config, layer_idx=0).to("cuda", torch.bfloat16).eval()
    for i, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
        dense = getattr(attn, name)
        packed = random_packed(dense.out_features, dense.in_features, seed=seed + i, device="cuda")
        setattr(attn, name, CodeQuantLinear.from_packed(packed, act=act))
    return attn, Qwen3MoeRotaryEmbedding(config).to("cuda")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 4, 16])
def test_fused_attention_block_eager_and_in_cuda_graph(m, mode):
    attn, rotary = qwen3_attention(MODES[mode], seed=m)
    g = torch.Generator(device="cuda").manual_seed(m)
    x, x_next = (torch.randn(2, 1, m, 2048, generator=g, device="cuda") * 2).bfloat16()
    pos = rotary(x, torch.arange(m, device="cuda")[None])
    with torch.no_grad(), kernel_options(strict=True):
        want = attn(x, pos, None)[0]
        assert fuse_qkv(attn) == 1 and isinstance(attn, FusedQKV) and isinstance(attn.k_proj, QKVSlice)
        got = attn(x, pos, None)[0]
        # q, k, v within bf16 rounding of the separate launches, carried through attention and o_proj
        assert rel_err(got, want) < CUDA_BF16
        x_buf = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            attn(x_buf, pos, None)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attn(x_buf, pos, None)[0]
        x_buf.copy_(x_next)
        graph.replay()
        eager = attn(x_next, pos, None)[0]
    assert rel_err(out, eager) < CUDA_EXACT  # the same launches, replayed on the new input


@pytest.mark.parametrize("mode", MODES)
def test_fused_attention_block_compiles_fullgraph(mode):
    """The fused block under Inductor (q_norm, RoPE fused around the codequant::linear op) gives the eager outputs."""
    torch._dynamo.reset()
    attn, rotary = qwen3_attention(MODES[mode], seed=5)
    x = (torch.randn(1, 1, 2048, device="cuda") * 2).bfloat16()
    pos = rotary(x, torch.tensor([[7]], device="cuda"))
    fuse_qkv(attn)
    with torch.no_grad():
        want = attn(x, pos, None)[0]
        got = torch.compile(attn, fullgraph=True)(x, pos, None)[0]
    torch._dynamo.reset()
    assert rel_err(got, want) < CUDA_BF16  # Inductor's q_norm / RoPE may round differently


def test_checkpoint_loaded_on_cuda_is_fused(tmp_path):
    """from_pretrained onto the GPU fuses every attention block's q/k/v; loaded on the CPU (and then
    moved) it keeps the three projections; both give the same logits."""
    from transformers import AutoModelForCausalLM

    from codequant.io import save_quantized

    save_quantized(quantize_tiny(tiny_model("qwen3_moe", seed=3)), tmp_path / "ckpt")
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="cuda").eval()
    apart = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").cuda().eval()
    assert all(isinstance(layer.self_attn, FusedQKV) for layer in fused.model.layers)
    assert not any(isinstance(layer.self_attn, FusedQKV) for layer in apart.model.layers)
    ids = tiny_input_ids(2, 12).cuda()
    with torch.no_grad():
        assert max_rel_err(fused(ids).logits, apart(ids).logits) < LOGITS_SAME_COMPUTATION
