"""CodeQuant checkpoints for the vLLM tests and benchmark: the bundled fixture (Qwen3-MoE, trained)
and tiny random models of the other architectures (tests.helpers.tiny_models).

Uniform-grid codebooks everywhere (the packed format is what vLLM must serve; the quantizer's
accuracy is tested elsewhere), online Hadamard blocks on o_proj / down_proj / experts, and
activations in 4 bits (W4A4) or unquantized (W4A16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from codequant.core.activations import ActQuantSpec
from codequant.io import save_quantized
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.modules.router import CodeQuantRouter
from tests.helpers.packed import quantize_tiny
from tests.helpers.paths import FIXTURE
from tests.helpers.tiny_models import char_tokenizer, tiny_model


def make_checkpoint(out: Path, act_bits: int, source: Path = FIXTURE, bits: int = 4, group_size: int | None = 32,
                    dtype: torch.dtype = torch.float32, lm_head: bool = False, act: ActQuantSpec | None = None) -> Path:
    """Quantize ``source`` (in ``dtype``) with ``bits``-bit codebooks of ``group_size`` columns (None: a row) and
    ``act_bits`` activations into ``out`` (``act``: every input quantized by it, and the online Hadamard blocks
    where ``codequant quantize`` puts them, instead of quantize_tiny's specs and blocks); ``lm_head``: the head
    too, weight-only (as ``--quantize-head`` makes it)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    quantize_tiny(model, bits=bits, group_size=group_size, lm_head=lm_head)
    if act is not None:
        from benchmarks.common import set_online_hadamard

        set_act(model, act)
        set_online_hadamard(model, down=act.enabled)
    else:
        _set_act_bits(model, act_bits)
    if lm_head:
        model.lm_head.act = ActQuantSpec(bits=16)
    label = f"W4A{act_bits}" + (" with lm_head" if lm_head else "")
    save_quantized(model, out, tokenizer=AutoTokenizer.from_pretrained(source), extra={"test": label})
    return out


# DeepSeek-V2 under vLLM: the CPU MLA decode kernel runs only latents of 512 + 64 rotary channels (head size
# 576, DeepSeek-V2's own); the config's derived head dims follow. A routed scale other than 1 is checked too,
# and, without a low-rank query, group-limited routing (4 groups of 2 experts: both experts of the best group).
_DEEPSEEK_V2 = dict(kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, qk_head_dim=80, routed_scaling_factor=2.5)
# config overrides of the tiny models under vLLM: its CPU attention runs head sizes 32, 64, 80, ... (not the
# tiny models' 16), so heads of 32 channels; DeepSeek-V2's above
VLLM_CONFIG = {
    "mixtral": dict(head_dim=32),
    "llama": dict(head_dim=32),
    "qwen3": dict(head_dim=32),
    "qwen3_moe": dict(head_dim=32),
    "qwen2_moe": dict(num_attention_heads=2, num_key_value_heads=2),  # head_dim = hidden / heads
    "olmoe": dict(num_attention_heads=2, num_key_value_heads=2),
    "deepseek_v2": dict(_DEEPSEEK_V2, topk_method="group_limited_greedy", n_group=4, topk_group=1),
    "deepseek_v2_q_lora": _DEEPSEEK_V2,
}


def make_tiny_checkpoint(out: Path, arch: str, act_bits: int | tuple[int, ...], seed: int = 0, **config) -> Path:
    """Quantize the tiny random ``arch`` model (a key of tests.helpers.tiny_models' SUPPORTED_TINY or TINY_VARIANTS,
    with :data:`VLLM_CONFIG` and ``config`` overrides) as :func:`make_checkpoint` does, with the character tokenizer of
    its 128-token vocabulary.

    ``act_bits``: one width for all layers, or one per decoder layer ((16, 4): layer 0 W4A16, layer 1 W4A4)."""
    model = quantize_tiny(tiny_model(arch, seed, **(VLLM_CONFIG.get(arch, {}) | config)))
    per_layer = act_bits if isinstance(act_bits, tuple) else (act_bits,) * len(model.model.layers)
    for layer, bits in zip(model.model.layers, per_layer, strict=True):
        _set_act_bits(layer, bits)
    label = "/".join(f"W4A{b}" for b in per_layer)
    save_quantized(model, out, tokenizer=char_tokenizer(), extra={"test": f"{arch} seed {seed} {label}"})
    return out


def _set_act_bits(model: torch.nn.Module, act_bits: int) -> None:
    """quantize_tiny quantizes activations to 4 bits; 16 and above: none (in every module of ``model``)."""
    if act_bits >= 16:
        set_act(model, ActQuantSpec(bits=16))


def set_act(model: torch.nn.Module, act: ActQuantSpec) -> None:
    """Every quantized input of ``model`` quantized by ``act``."""
    for module in model.modules():
        if isinstance(module, CodeQuantLinear):
            module.act = act
        elif isinstance(module, CodeQuantExperts):
            module.act = module.down_act = act
        elif isinstance(module, CodeQuantRouter):
            module.act = act
