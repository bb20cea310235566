"""Deployable checkpoints: the packed safetensors writer/reader and the transformers quantizer."""

from .checkpoint import (
    CheckpointError,
    atomic_directory,
    checkpoint_summary,
    read_quantization_config,
    save_quantized,
    verify_checkpoint,
)
from .hf_quantizer import CodeQuantConfig, CodeQuantHfQuantizer


def load_quantized(directory, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(directory, **kwargs)`` with the CodeQuant quantizer registered."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, **kwargs)


__all__ = [
    "CheckpointError",
    "CodeQuantConfig",
    "CodeQuantHfQuantizer",
    "atomic_directory",
    "checkpoint_summary",
    "load_quantized",
    "read_quantization_config",
    "save_quantized",
    "verify_checkpoint",
]
