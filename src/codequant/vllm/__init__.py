"""Serve CodeQuant checkpoints with vLLM (``pip install "codequant[vllm]"``).

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it
starts; it registers the quantization method ``codequant``, which a checkpoint's
``config.json`` selects through ``quantization_config.quant_method``. Nothing of vLLM is
imported until vLLM itself runs the entry point.
"""

from __future__ import annotations


def register() -> None:
    """Register the ``codequant`` quantization method with vLLM (idempotent)."""
    from . import method  # noqa: F401  (importing registers the config class once)
