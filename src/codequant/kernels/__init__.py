"""Kernel dispatch: every op has a reference implementation and optional fast backends.

A backend registers ``linear`` and/or ``moe`` with the same signatures as
:mod:`codequant.kernels.reference`. ``select_backend`` picks the fastest available one
for a tensor's device; ``CODEQUANT_BACKEND=reference|cpu|gpu`` or the ``backend``
argument overrides it.
"""

from __future__ import annotations

import os
from typing import Callable

from . import reference

_BACKENDS: dict[str, dict[str, Callable]] = {"reference": {"linear": reference.linear, "moe": reference.moe}}
_DEVICE_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("gpu", "reference")}


def register_backend(name: str, **ops: Callable) -> None:
    _BACKENDS.setdefault(name, {}).update(ops)


def available_backends() -> list[str]:
    _load_optional_backends()
    return sorted(_BACKENDS)


def select_backend(op: str, device_type: str, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to run on ``device_type``."""
    _load_optional_backends()
    wanted = backend or os.environ.get("CODEQUANT_BACKEND") or None
    if wanted:
        if wanted not in _BACKENDS or op not in _BACKENDS[wanted]:
            raise ValueError(f"kernel backend {wanted!r} has no {op!r} here; available: {available_backends()}")
        return _BACKENDS[wanted][op]
    for name in _DEVICE_PREFERENCE.get(device_type, ("reference",)):
        if op in _BACKENDS.get(name, {}):
            return _BACKENDS[name][op]
    return _BACKENDS["reference"][op]


_loaded = False


def _load_optional_backends() -> None:
    """Import the compiled CPU and Triton GPU backends if they are present; they register themselves."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in ("codequant.kernels.cpu", "codequant.kernels.gpu"):
        try:
            __import__(module)
        except ImportError:
            pass
