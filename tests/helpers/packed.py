"""Packed weights for tests: random indices and codebooks, a plain-grid quantizer, and the tiny
models quantized with it (a stand-in for the pipeline)."""

from __future__ import annotations

import torch
from torch import nn

from codequant.core.activations import ActQuantSpec
from codequant.core.format import PackedWeight, pack
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.modules.norm import RMSNorm
from codequant.modules.router import quantize_router

ACT = ActQuantSpec(bits=4, group_size=32, clip=0.9)  # quantize_tiny's activations (all but o_proj / down_proj inputs)
DOWN_ACT = ActQuantSpec(bits=4, group_size=0, clip=1.0)  # quantize_tiny's activations into o_proj / down_proj


def random_packed(n: int, k: int, groups: int = 1, seed: int = 0, lead: tuple[int, ...] = (), *,
                  group_size: int | None = None, generator: torch.Generator | None = None, scale: float = 0.05,
                  device: str | torch.device = "cpu") -> PackedWeight:
    """A random 4-bit packed weight of shape ``lead + (n, k)``: indices uniform in [0, 16), codebooks
    ``groups`` per row (or one per ``group_size`` columns) of 16 entries drawn N(0, ``scale``^2).

    The numbers come from ``generator`` (its device; the global generator when it and ``seed`` are
    None), else from a generator on ``device`` seeded with ``seed``: indices first, then codebooks.
    The result is on ``device``."""
    if group_size is not None:
        groups = k // group_size
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    where = generator.device if generator is not None else "cpu"
    idx = torch.randint(0, 16, (*lead, n, k), generator=generator, device=where)
    codebook = torch.randn(*lead, n, groups, 16, generator=generator, device=where) * scale
    return pack(idx, codebook).to(device)


ROW_CHUNK = 4096  # rows of a 2-D weight uniform_codebook grids at once


def uniform_codebook(w: torch.Tensor, bits: int, group_size: int) -> PackedWeight:
    """A plain min-max grid of 2^bits centroids per group: enough to fill every packed tensor."""
    if w.dim() > 2:  # one expert at a time: the distances below take 2^bits times the weight's memory
        parts = [uniform_codebook(e, bits, group_size) for e in w]
        return PackedWeight(*(torch.stack([getattr(p, f) for p in parts]) for f in ("indices", "codebook", "row_sum")),
                            w.shape[-1])
    if w.shape[0] > ROW_CHUNK:  # a large head: ROW_CHUNK rows at a time, for the same reason
        parts = [uniform_codebook(rows, bits, group_size) for rows in w.split(ROW_CHUNK)]
        return PackedWeight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("indices", "codebook", "row_sum")),
                            w.shape[-1])
    *lead, n, k = w.shape
    wg = w.float().reshape(*lead, n, k // group_size, group_size)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    steps = torch.linspace(0, 1, 2**bits)
    cb = lo + (hi - lo) * steps  # [..., N, groups, 2^bits]
    idx = (wg.unsqueeze(-1) - cb.unsqueeze(-2)).abs().argmin(-1)
    return pack(idx.reshape(*lead, n, k), cb)


def random_uniform_packed(shape: tuple[int, ...], seed: int) -> PackedWeight:
    """A random N(0, 1) weight of ``shape`` on 4-bit min-max grids of 32 columns (uniform_codebook)."""
    g = torch.Generator().manual_seed(seed)
    return uniform_codebook(torch.randn(*shape, generator=g), 4, 32)


def quantize_tiny(model: nn.Module, bits: int = 4, group_size: int | None = 32, lm_head: bool = False) -> nn.Module:
    """Stand-in for the pipeline: packed linears, experts and routers everywhere, RMSNorm for LayerNorms.

    ``group_size`` None: one codebook per row."""
    replace = {}
    for name, module in model.named_modules():
        if not name.startswith("model.layers.") and not (lm_head and name == "lm_head"):
            continue
        if type(module).__name__.endswith(("Router", "TopkRouter")):
            quantize_router(module, uniform_codebook(module.weight.data, bits, group_size or module.weight.shape[-1]), ACT)
        elif isinstance(module, nn.Linear):
            k = module.in_features
            g = group_size if group_size and k % group_size == 0 else k
            hb = 16 if name.endswith(("o_proj", "down_proj")) else 0
            replace[name] = CodeQuantLinear.from_packed(
                uniform_codebook(module.weight.data, bits, g), module.bias, ACT if hb == 0 else DOWN_ACT, hb
            )
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            gate_up = uniform_codebook(module.gate_up_proj.data, bits, group_size or module.gate_up_proj.shape[-1])
            down = uniform_codebook(module.down_proj.data, bits, module.down_proj.shape[-1])
            replace[name] = CodeQuantExperts.from_packed(gate_up, down, ACT, DOWN_ACT, hadamard_block=32)
        elif isinstance(module, nn.LayerNorm):
            norm = RMSNorm(module.normalized_shape[0], module.eps)
            norm.weight.data.copy_(module.weight.data)
            replace[name] = norm
    if isinstance(model.model.norm, nn.LayerNorm):
        norm = RMSNorm(model.config.hidden_size, model.model.norm.eps)
        replace["model.norm"] = norm
    for name, module in replace.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    model.config.codequant_rms_norms = sorted(n for n, m in replace.items() if isinstance(m, RMSNorm))
    return model
