"""The registry of quantized module kinds: checkpoint ``kind`` string -> module class.

A module kind is one class deriving :class:`QuantizedModule` and decorated with
:func:`register_module_kind`; checkpoint writing, checking and loading, the transformers
quantizer and the pipeline's resume find everything they need on the class:

``kind``            the ``kind`` string of its spec in a checkpoint's ``quantization_config``
``spec_keys``       the keys of that spec ("kind" included)
``packed_parts``    the tensor-name prefixes of its packed weights ("" or e.g. "gate_up_", "down_")
``rebuilt_tensors`` its state-dict tensors that are not stored (rebuilt from the packed ones at load)
``spec(bits)``      the spec of this module, its indices stored at ``bits`` bits
``from_spec(spec, dtype, device, replaced)``  an empty module of the spec's shapes, ready to load into
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.format import PackedWeight

_KINDS: dict[str, type["QuantizedModule"]] = {}


class QuantizedModule(nn.Module):
    """What every registered module kind declares (defaults: no packed weights, every tensor stored)."""

    kind: str
    spec_keys: frozenset[str]
    packed_parts: tuple[str, ...] = ()
    rebuilt_tensors: tuple[str, ...] = ()

    def spec(self, bits: int) -> dict:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device=None, replaced: nn.Module | None = None) -> nn.Module:
        """An uninitialized module as ``spec`` describes; ``replaced`` is the model's module it takes the place of."""
        raise NotImplementedError

    @classmethod
    def packed_layout(cls, spec: dict) -> dict[str, tuple[tuple[int, ...], int, int]]:
        """{packed part: (leading dims + (N,), K, G)} of the packed weights ``spec`` describes."""
        return {}

    @classmethod
    def float_tensors(cls, spec: dict) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} of the float tensors (any float dtype) the module stores besides its packed ones."""
        return {}

    @classmethod
    def spec_problem(cls, spec: dict) -> str | None:
        """Why a spec of this kind cannot be deployed (worded to follow "module NAME has"), or None."""
        return None

    def packed_weights(self) -> dict[str, PackedWeight]:
        """{packed part: PackedWeight} of the module."""
        return {}

    def finish_loading(self) -> None:
        """Called once its packed tensors hold loaded, checked values in the in-memory layout."""


def register_module_kind(cls: type[QuantizedModule]) -> type[QuantizedModule]:
    """Class decorator: make ``cls`` the module of checkpoint kind ``cls.kind``."""
    if cls.kind in _KINDS:
        raise ValueError(f"quantized module kind {cls.kind!r} is already registered by {_KINDS[cls.kind].__name__}")
    _KINDS[cls.kind] = cls
    return cls


def module_kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def module_kind(name: str) -> type[QuantizedModule]:
    """The module class of kind ``name``."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown quantized module kind {name!r} (known: {list(_KINDS)})") from None


def install_from_spec(model: nn.Module, name: str, spec: dict, dtype: torch.dtype, device=None) -> QuantizedModule:
    """An empty module of ``spec``'s kind (:meth:`QuantizedModule.from_spec`) in place of ``model``'s module ``name``."""
    current = model.get_submodule(name)
    module = module_kind(spec["kind"]).from_spec(spec, dtype, device, replaced=current)
    if module is not current:
        model.set_submodule(name, module)
    return module


def quantized_modules(model: nn.Module) -> dict[str, QuantizedModule]:
    """{name: module} of every module of ``model`` whose class is a registered kind."""
    kinds = tuple(_KINDS.values())
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}
