"""CodeQuant checkpoints of the bundled fixture (Qwen3-MoE) for the vLLM tests and benchmark.

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


def make_checkpoint(out: Path, act_bits: int, source: Path = FIXTURE, bits: int = 4, group_size: int | None = 32,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Quantize ``source`` (in ``dtype``) with ``bits``-bit codebooks of ``group_size`` columns (None: a row) and
    ``act_bits`` activations into ``out``."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    quantize_tiny(model, bits=bits, group_size=group_size)
    if act_bits >= 16:
        none = ActQuantSpec(bits=16)
        for module in model.modules():
            if isinstance(module, CodeQuantLinear):
                module.act = none
            elif isinstance(module, CodeQuantExperts):
                module.act = module.down_act = none
            elif isinstance(module, CodeQuantRouter):
                module.act = none
    save_quantized(model, out, tokenizer=AutoTokenizer.from_pretrained(source), extra={"test": f"W4A{act_bits}"})
    return out
