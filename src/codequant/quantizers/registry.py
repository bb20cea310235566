"""The weight quantizers by name (``Recipe.weights`` of :data:`codequant.config.METHODS`).

A new weight method is one file defining a :class:`~.weight_quantizer.WeightQuantizer` and one
line here."""

from __future__ import annotations

from .kmeans import KMEANS
from .gptq import GPTQ
from .uniform import RTN
from .weight_quantizer import WeightQuantizer

WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {
    "rtn": RTN,
    "gptq": GPTQ,
    "codebook": KMEANS,
}


def weight_quantizer(name: str) -> WeightQuantizer:
    """The weight quantizer registered as ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return WEIGHT_QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown weight quantizer {name!r} (known: {list(WEIGHT_QUANTIZERS)})") from None
