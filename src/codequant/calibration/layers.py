"""Running decoder layers standalone: on the calibration device in float32, in token batches."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..adapters import ArchitectureAdapter


class LayerRunner:
    """Runs decoder layer i of ``model`` standalone on [n, S, H] streams, in batches: the
    stream stays on the host, each batch visits the device."""

    def __init__(self, model, adapter: ArchitectureAdapter, device: torch.device, batch_size: int = 8):
        self.model, self.adapter, self.device, self.batch_size = model, adapter, device, batch_size

    @torch.no_grad()
    def __call__(self, i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for s in range(0, x.shape[0], self.batch_size):
            h = x[s : s + self.batch_size].to(self.device)
            y = layer(h, **self.adapter.layer_kwargs(self.model, h, None, i))
            out[s : s + self.batch_size] = (y[0] if isinstance(y, tuple) else y).to(out.device)
        return out


class InMemoryLayers:
    """The decoder layers of a model already in memory: nothing to read or free."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter):
        self.model, self.adapter = model, adapter

    def load(self, i: int) -> nn.Module:
        return self.adapter.layers(self.model)[i]

    def release(self, i: int, reset: bool) -> None:
        pass


def block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An MLP / MoE block's output for tokens x [T, H], as float32 [T, H]."""
    out = block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape).float()


@contextlib.contextmanager
def on_device(layer: nn.Module, device: torch.device):
    """Hold ``layer`` on ``device`` in float32 for the block; then back on the CPU in its dtype."""
    dtype = next(layer.parameters()).dtype
    layer.to(device, torch.float32)
    try:
        yield layer
    finally:
        layer.to("cpu")
        cast_float_params(layer, dtype)


def cast_float_params(layer: nn.Module, dtype: torch.dtype) -> None:
    for p in layer.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
