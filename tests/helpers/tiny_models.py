"""Tiny random instances of the real transformers classes, one per supported architecture.

``tiny_model(arch, seed)`` builds a float32, eval-mode ``*ForCausalLM`` from a config written
here: 2 decoder layers, hidden 64, head_dim 16, 8 experts (top-2), vocab 128, every
in_features a multiple of 64. All weights are random, including every norm scale (and
LayerNorm bias) and every bias, so that folding and rotating stages are really exercised;
the router scale is large enough that tokens spread over many experts.

``SUPPORTED_TINY`` lists one key per supported architecture (a ``config.model_type``);
``TINY_VARIANTS`` adds layouts of the same architectures that are worth testing too
(DeepSeek-V2 with a low-rank query, ``q_lora_rank``). ``char_tokenizer()`` is a tokenizer for
their vocabulary, for tests that save a checkpoint with one or generate text.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

SUPPORTED_TINY = ["deepseek_v2", "llama", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3", "qwen3_moe"]
TINY_VARIANTS = ["deepseek_v2_q_lora"]

VOCAB = 128
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
EXPERTS = 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.08, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _deepseek(q_lora_rank):
    return DeepseekV2Config(
        **_COMMON,
        intermediate_size=128,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=64,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        moe_intermediate_size=64,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
    )


_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **_COMMON, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
        moe_intermediate_size=64, num_experts=EXPERTS, num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **_COMMON, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        moe_intermediate_size=64, shared_expert_intermediate_size=128, num_experts=EXPERTS, num_experts_per_tok=2,
        qkv_bias=True,
    ),
    "mixtral": lambda: MixtralConfig(
        **_COMMON, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
        num_local_experts=EXPERTS, num_experts_per_tok=2,
    ),
    "deepseek_v2": lambda: _deepseek(None),
    "deepseek_v2_q_lora": lambda: _deepseek(64),
    "phimoe": lambda: PhimoeConfig(
        **_COMMON, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=2,
        num_local_experts=EXPERTS, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
    ),
    "olmoe": lambda: OlmoeConfig(
        **_COMMON, intermediate_size=64, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        num_experts=EXPERTS, num_experts_per_tok=2,
    ),
    "llama": lambda: LlamaConfig(
        **_COMMON, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
    ),
    "qwen3": lambda: Qwen3Config(
        **_COMMON, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
        tie_word_embeddings=True,
    ),
}


def tiny_config(arch: str, **overrides):
    """The tiny config of ``arch``, with ``overrides`` set on it (e.g. a head_dim vLLM's CPU attention supports)."""
    if arch not in _CONFIGS:
        raise KeyError(f"no tiny config for {arch!r}; have {sorted(_CONFIGS)}")
    config = _CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    return config


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A float32, eval-mode tiny ``*ForCausalLM`` of the real class for ``arch`` (config ``overrides``: tiny_config)."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            module = model.get_submodule(name.rsplit(".", 1)[0])
            is_norm = "norm" in type(module).__name__.lower()
            if is_norm and leaf == "weight":  # norm scales around 1
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(config.initializer_range * torch.randn(p.shape, generator=g))
        for name, module in model.named_modules():  # routers: spread tokens over experts
            if name.endswith("mlp.gate") or name.endswith("mlp.router"):
                module.weight.mul_(4.0)
    return model.eval()


def tiny_input_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 2..96), newline 97, <unk> 0, <eos> 1, and
    placeholder words <t98>..<t127> (never produced by encoding): every id of vocab 128 decodes."""
    vocab = {"<unk>": 0, "<eos>": 1, **{chr(c): c - 30 for c in range(32, 127)}, "\n": 97}
    vocab.update({f"<t{i}>": i for i in range(98, 128)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
