"""Quantized modules into a layer, and a finished layer to and from its ``OUT.partial`` file
(the resume I/O)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..adapters import ArchitectureAdapter, QuantTarget
from ..core.activations import ActQuantSpec
from ..core.format import PackedWeight
from ..io.checkpoint import checkpoint_state_dict
from ..modules.experts import CodeQuantExperts
from ..modules.linear import CodeQuantLinear
from ..modules.registry import install_from_spec, quantized_modules
from ..modules.router import CodeQuantRouter, quantize_router
from ..utils import atomic_save_tensors


class LayerStore:
    """Installs packed weights as deployable modules, saves a quantized layer under ``partial``
    and restores it; ``bits`` is the run's index bit width (of the saved specs), ``report`` the
    run's report, whose per-layer part travels with the layer."""

    def __init__(self, adapter: ArchitectureAdapter, bits: int, device: torch.device, partial: Path | None, report: dict):
        self.adapter, self.bits, self.device, self.partial, self.report = adapter, bits, device, partial, report

    def install(self, layer: nn.Module, t: QuantTarget, weight: PackedWeight, hadamard_block: int, act: ActQuantSpec) -> None:
        """``act``: how the linear or router quantizes its inputs."""
        if t.kind == "router":
            if isinstance(t.module, CodeQuantRouter):  # re-tuned after its first install
                t.module.set_packed(weight)
            else:
                quantize_router(t.module, weight, act)
            return
        bias = None if t.module.bias is None else t.module.bias.detach().float()
        layer.set_submodule(t.name, CodeQuantLinear.from_packed(weight, bias, act, hadamard_block))

    def save_layer(self, layer: nn.Module, path: Path, layer_name: str) -> None:
        """The layer's checkpoint tensors (:func:`~codequant.io.checkpoint.checkpoint_state_dict`: packed
        modules, biases, norms; not what quantized modules rebuild at load), the spec of each quantized
        module, the names of its parameters and its part of the report (unreached experts, ACCF and block-tuning losses, searched clip ratios)."""
        specs = {name: module.spec(self.bits) for name, module in quantized_modules(layer).items()}
        tensors = checkpoint_state_dict(layer)
        params = sorted(k for k, _ in layer.named_parameters() if k in tensors)
        report = {key: {k: v for k, v in self.report[key].items() if k == layer_name or k.startswith(layer_name + ".")} for key in ("unreached_experts", "accf", "block_tuning", "act_clip")}
        atomic_save_tensors(tensors, path, {"specs": json.dumps(specs), "params": json.dumps(params), "report": json.dumps(report)})

    def saved_layer_tensors(self, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of freed layer ``i`` (names relative to the model) from its
        ``OUT.partial`` file, float parameters cast to ``dtype`` as the in-memory path does."""
        from safetensors import safe_open

        prefix = self.adapter.layer_name(i) + "."
        with safe_open(str(self.partial / f"layer_{i:04d}.safetensors"), "pt") as f:
            params = set(json.loads(f.metadata()["params"]))
            out = {}
            for key in f.keys():
                t = f.get_tensor(key)
                out[prefix + key] = t.to(dtype) if key in params and t.is_floating_point() else t
        return out

    def restore_layer(self, layer: nn.Module, path: Path) -> None:
        """Put the quantized modules saved by :meth:`save_layer` into ``layer`` (prepared as when it was
        saved), as a checkpoint load does: an empty module of each spec
        (:func:`~codequant.modules.registry.install_from_spec`) takes the saved tensors as they are
        (dtype, device) and finishes loading (routers rebuild W_hat)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            specs = json.loads(f.metadata()["specs"])
            for key, part in json.loads(f.metadata()["report"]).items():
                self.report[key].update(part)
        tensors = load_file(str(path), device=str(self.device))
        for name, spec in specs.items():
            module = install_from_spec(layer, name, spec, torch.float32, self.device)  # float tensors: assigned as saved
            state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            state.update((t, getattr(module, t)) for t in module.rebuilt_tensors)  # not saved; finish_loading rebuilds them
            module.load_state_dict(state, assign=True)
            module.finish_loading()

    @staticmethod
    def set_backend(layer: nn.Module, backend: str | None) -> None:
        for m in layer.modules():
            if isinstance(m, (CodeQuantLinear, CodeQuantExperts)):
                m.backend = backend
