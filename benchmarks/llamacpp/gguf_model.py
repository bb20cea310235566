"""A random-weight Qwen3-MoE model as a GGUF file for llama.cpp (``llama-bench``), written with
the ``gguf`` package (``pip install gguf``, the ``bench`` extra).

What is written, for a transformers Qwen3-MoE config: the ``qwen3moe`` architecture's metadata
and tensors under the names llama.cpp's loader expects; attention q/k/v/o, the three expert
tensors (3D: experts x rows x columns) and the token embedding in Q4_0 (what
``llama-quantize ... Q4_0`` gives), the output head (lm_head) in BF16 (``--output-tensor-type
bf16``), the router and the RMSNorm scales in F32. Q4_0 blocks hold random 4-bit values with one
fixed fp16 scale (weights of about 0.02 std, no inf / NaN); speed does not depend on the values.
No tokenizer: tokenizer model "none" with ``vocab_size`` placeholder tokens, which is all
llama-bench needs (it decodes random token ids).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

Q4_0, BF16, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32
Q4_0_SCALE = np.float16(0.004)  # (q - 8) * scale, q uniform in 0..15: std about 0.018


def tensor_specs(config) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """(name, shape in numpy order (llama.cpp's ne reversed), type) of every tensor, in file order."""
    hidden, vocab, head_dim = config.hidden_size, config.vocab_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    experts, width = config.num_experts, config.moe_intermediate_size
    specs = [("token_embd.weight", (vocab, hidden), Q4_0), ("output_norm.weight", (hidden,), F32), ("output.weight", (vocab, hidden), BF16)]
    for i in range(config.num_hidden_layers):
        specs += [(f"blk.{i}.{name}.weight", shape, dtype) for name, shape, dtype in [
            ("attn_norm", (hidden,), F32), ("attn_q", (q_rows, hidden), Q4_0), ("attn_k", (kv_rows, hidden), Q4_0),
            ("attn_v", (kv_rows, hidden), Q4_0), ("attn_output", (hidden, q_rows), Q4_0), ("attn_q_norm", (head_dim,), F32),
            ("attn_k_norm", (head_dim,), F32), ("ffn_norm", (hidden,), F32), ("ffn_gate_inp", (experts, hidden), F32),
            ("ffn_gate_exps", (experts, width, hidden), Q4_0), ("ffn_up_exps", (experts, width, hidden), Q4_0),
            ("ffn_down_exps", (experts, hidden, width), Q4_0)]]
    return specs


def random_tensor(name: str, shape: tuple[int, ...], dtype: gguf.GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random data of one tensor as the writer takes it: Q4_0 as bytes (blocks of an fp16 scale and
    16 bytes of 4-bit values), BF16 as uint16 bits, norm scales 1."""
    if dtype == Q4_0:
        blocks = np.empty((*shape[:-1], shape[-1] // 32, 18), np.uint8)
        blocks[..., :2] = np.frombuffer(Q4_0_SCALE.tobytes(), np.uint8)
        blocks[..., 2:] = rng.integers(0, 256, blocks[..., 2:].shape, dtype=np.uint8)
        return blocks.reshape(*shape[:-1], -1)
    if dtype == BF16:
        return ((0.02 * rng.standard_normal(shape, dtype=np.float32)).view(np.uint32) >> 16).astype(np.uint16)
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    return 0.02 * rng.standard_normal(shape, dtype=np.float32)


def write_gguf(config, path: Path) -> Path:
    """Write the model of ``config`` (a transformers Qwen3-MoE config) to ``path`` (kept when
    already there), one tensor at a time (memory: the largest tensor)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(tmp, "qwen3moe")
    writer.add_name(f"random Qwen3-MoE, {config.num_hidden_layers} layers")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("none")
    specs = tensor_specs(config)
    for name, shape, dtype in specs:
        if dtype == Q4_0:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, Q4_0)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=Q4_0)
        else:
            np_dtype = np.dtype(np.uint16 if dtype == BF16 else np.float32)
            writer.add_tensor_info(name, shape, np_dtype, int(np.prod(shape)) * np_dtype.itemsize, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape, dtype in specs:
        writer.write_tensor_data(random_tensor(name, shape, dtype, rng))
    writer.close()
    tmp.rename(path)
    return path
