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
from ..modules.experts import CodeQuantExperts
from ..modules.linear import CodeQuantLinear
from ..modules.router import CodeQuantRouter, quantize_router
from ..utils import atomic_save_tensors


class LayerStore:
    """Installs packed weights as deployable modules, saves a quantized layer under ``partial``
    and restores it; ``report`` is the run's report, whose per-layer part travels with the layer."""

    def __init__(self, adapter: ArchitectureAdapter, act: ActQuantSpec, device: torch.device, partial: Path | None, report: dict):
        self.adapter, self.act, self.device, self.partial, self.report = adapter, act, device, partial, report

    def install(self, layer: nn.Module, t: QuantTarget, weight: PackedWeight, hadamard_block: int) -> None:
        if t.kind == "router":
            quantize_router(t.module, weight, self.act)
            return
        bias = None if t.module.bias is None else t.module.bias.detach().float()
        layer.set_submodule(t.name, CodeQuantLinear.from_packed(weight, bias, self.act, hadamard_block))

    def save_layer(self, layer: nn.Module, path: Path, layer_name: str) -> None:
        """The layer's checkpoint tensors (packed modules, biases, norms; not the weights of quantized
        routers, rebuilt at load), with its specs, the names of its parameters and its part of the
        report (unreached experts, ACCF losses)."""
        specs = {}
        for name, module in layer.named_modules():
            if isinstance(module, CodeQuantLinear):
                specs[name] = {"kind": "linear", "hadamard_block": module.hadamard_block}
            elif isinstance(module, CodeQuantExperts):
                specs[name] = {"kind": "experts", "hadamard_block": module.hadamard_block}
            elif isinstance(module, CodeQuantRouter):
                specs[name] = {"kind": "router", "hadamard_block": 0}
        skip = {f"{name}.weight" for name, spec in specs.items() if spec["kind"] == "router"}
        tensors = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items() if k not in skip}
        params = sorted(k for k, _ in layer.named_parameters() if k not in skip)
        report = {key: {k: v for k, v in self.report[key].items() if k.startswith(layer_name + ".")} for key in ("unreached_experts", "accf")}
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
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            specs = json.loads(f.metadata()["specs"])
            for key, part in json.loads(f.metadata()["report"]).items():
                self.report[key].update(part)
        tensors = load_file(str(path), device=str(self.device))
        for name, spec in specs.items():
            module = layer.get_submodule(name)
            pw = lambda prefix, k: PackedWeight(tensors[f"{name}.{prefix}indices"], tensors[f"{name}.{prefix}codebook"], tensors[f"{name}.{prefix}row_sum"], k)  # noqa: E731
            if spec["kind"] == "experts":
                new = CodeQuantExperts.from_packed(pw("gate_up_", module.gate_up_proj.shape[-1]), pw("down_", module.down_proj.shape[-1]), self.act, self.act, spec["hadamard_block"])
                layer.set_submodule(name, new)
            elif spec["kind"] == "router":
                quantize_router(module, pw("", module.weight.shape[-1]), self.act)
            else:
                bias = tensors.get(f"{name}.bias")
                layer.set_submodule(name, CodeQuantLinear.from_packed(pw("", module.in_features), bias, self.act, spec["hadamard_block"]))

    @staticmethod
    def set_backend(layer: nn.Module, backend: str | None) -> None:
        for m in layer.modules():
            if isinstance(m, (CodeQuantLinear, CodeQuantExperts)):
                m.backend = backend
