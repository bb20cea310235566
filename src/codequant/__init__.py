"""CodeQuant: 4-bit codebook weights and 4-bit activations for Mixture-of-Experts LLMs."""

from .format import FORMAT_VERSION, PackedWeight, pack
from .modules.experts import CodeQuantExperts
from .modules.linear import CodeQuantLinear, quantize_linear
from .quantizers.activations import ActQuantSpec

__version__ = "0.1.0"

from . import io  # noqa: E402  registers the "codequant" quantization config and quantizer with transformers
__all__ = ["FORMAT_VERSION", "PackedWeight", "pack", "CodeQuantExperts", "CodeQuantLinear", "quantize_linear", "ActQuantSpec"]
