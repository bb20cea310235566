"""CodeQuant: 4-bit codebook weights and 4-bit activations for Mixture-of-Experts LLMs.

    import codequant
    result = codequant.quantize("Qwen/Qwen3-30B-A3B", codequant.QuantConfig(device="cuda"), out_dir="qwen3-cq")
    model = transformers.AutoModelForCausalLM.from_pretrained("qwen3-cq")   # after `import codequant`
"""

__version__ = "0.1.0"

from . import io  # noqa: E402  registers the "codequant" quantization config and quantizer with transformers
from .calibration.pipeline import QuantResult, quantize
from .config import METHODS, QuantConfig
from .core.format import FORMAT_VERSION, PackedWeight, pack
from .modules.experts import CodeQuantExperts
from .modules.linear import CodeQuantLinear, quantize_linear
from .core.activations import ActQuantSpec

__all__ = [
    "FORMAT_VERSION", "METHODS", "ActQuantSpec", "CodeQuantExperts", "CodeQuantLinear", "PackedWeight",
    "QuantConfig", "QuantResult", "pack", "quantize", "quantize_linear",
]
