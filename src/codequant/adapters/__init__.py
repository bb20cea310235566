"""Architecture adapters: one :class:`Layout` of module names per supported architecture.

``get_adapter(model)`` picks the adapter by ``model.config.model_type``. Stages ask the
adapter where things are (see :class:`ArchitectureAdapter`) and never branch on a name.

Running one decoder layer on its own, with any adapter::

    layer = adapter.layers(model)[i]
    out = layer(h, **adapter.layer_kwargs(model, h, position_ids, layer_idx=i))
"""

from __future__ import annotations

from torch import nn

from .architectures import LAYOUTS
from .base import (
    ArchitectureAdapter,
    Layout,
    NormReaders,
    QuantTarget,
    StreamWeight,
    UnsupportedArchitectureError,
    ValueHeads,
)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(LAYOUTS))


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model`` (a ``*ForCausalLM``), by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"CodeQuant supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return ArchitectureAdapter(LAYOUTS[model_type])


__all__ = [
    "ArchitectureAdapter",
    "Layout",
    "NormReaders",
    "QuantTarget",
    "StreamWeight",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedArchitectureError",
    "ValueHeads",
    "get_adapter",
]
