"""Serve CodeQuant checkpoints with vLLM (``pip install "codequant[vllm]"``).

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it
starts; it registers the quantization method ``codequant``, which a checkpoint's
``config.json`` selects through ``quantization_config.quant_method``, and the model classes of
:mod:`codequant.vllm.models` (vLLM's own, plus the codequant routers; lazily imported). Nothing
of vLLM is imported until vLLM itself runs the entry point.
"""

from __future__ import annotations


def register() -> None:
    """Register the ``codequant`` quantization method and model classes with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from . import method  # noqa: F401  (importing registers the config class once)

    for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM", "DeepseekV2ForCausalLM"):
        ModelRegistry.register_model(arch, f"codequant.vllm.models:{arch}")
