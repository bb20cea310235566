"""The GGUF writer of the llama.cpp rows: gguf's reader reads back the qwen3moe metadata and
every tensor with the name, shape and type llama.cpp's loader expects."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from benchmarks.common import model_config  # noqa: E402
from benchmarks.llamacpp.gguf_model import write_gguf  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def test_written_gguf_reads_back(tmp_path):
    config = model_config("qwen3_30b_a3b", 2, **SMALL)
    reader = gguf.GGUFReader(write_gguf(config, tmp_path / "m.gguf"))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "qwen3moe" and meta["tokenizer.ggml.model"] == "none"
    assert (meta["qwen3moe.block_count"], meta["qwen3moe.vocab_size"], meta["qwen3moe.expert_count"],
            meta["qwen3moe.expert_used_count"], meta["qwen3moe.expert_feed_forward_length"]) == (2, 64, 4, 2, 64)
    tensors = {t.name: t for t in reader.tensors}
    Q4, BF, F = "Q4_0", "BF16", "F32"
    expected = {"token_embd.weight": ([128, 64], Q4), "output.weight": ([128, 64], BF), "output_norm.weight": ([128], F)}
    for i in range(2):  # llama.cpp's ne order: columns first
        expected |= {f"blk.{i}.{k}.weight": v for k, v in {
            "attn_norm": ([128], F), "attn_q": ([128, 128], Q4), "attn_k": ([128, 64], Q4), "attn_v": ([128, 64], Q4),
            "attn_output": ([128, 128], Q4), "attn_q_norm": ([32], F), "attn_k_norm": ([32], F), "ffn_norm": ([128], F),
            "ffn_gate_inp": ([128, 4], F), "ffn_gate_exps": ([128, 64, 4], Q4), "ffn_up_exps": ([128, 64, 4], Q4),
            "ffn_down_exps": ([64, 128, 4], Q4)}.items()}
    assert {n: ([int(d) for d in t.shape], t.tensor_type.name) for n, t in tensors.items()} == expected
    experts = gguf.quants.dequantize(tensors["blk.1.ffn_down_exps.weight"].data, gguf.GGMLQuantizationType.Q4_0)
    assert np.isfinite(experts).all() and 0.01 < experts.std() < 0.03
