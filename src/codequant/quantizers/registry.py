"""The weight quantizers by name (``Recipe.weights`` of :data:`codequant.config.METHODS`).

A new weight method is one file defining a :class:`~.weight_quantizer.WeightQuantizer` and one
line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kmeans import KMEANS
from .gptq import GPTQ
from .uniform import RTN
from .weight_quantizer import WeightQuantizer

if TYPE_CHECKING:
    from ..config import QuantConfig

WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {
    "rtn": RTN,
    "gptq": GPTQ,
    "codebook": KMEANS,
}


def weight_quantizer(config: "QuantConfig") -> WeightQuantizer:
    """The weight quantizer of ``config``'s method."""
    return WEIGHT_QUANTIZERS[config.recipe.weights]
