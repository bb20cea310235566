"""Memory planning and stage accounting for the layer-by-layer driver.

GPU memory of one layer's calibration (``GiB`` = 2^30 bytes), with P the layer's parameters in
float32 (the layer sits on the device in float32 while it is calibrated), D the routed experts'
down projections (one float32 copy with the online Hadamard folded in), e the largest expert
(gate_up + down, float32) and T the token batch times the widest feature row:

    need = P + D + 8 e + 24 T  bytes          (the minimum: one expert and one batch at a time)

Everything that grows with the calibration set (the residual stream, the captured inputs, the
MoE block's reference outputs) stays on the host and is streamed to the device in batches, so
the need does not grow with nsamples x seqlen. Above the minimum, the spare budget sets how
many experts k-means, reassignment and packing handle at once (chunks of 8 e each).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("codequant")

GIB = 2**30
DEFAULT_SPARE_GIB = 4.0  # working room for expert chunks when no --max-gpu-memory is given


@dataclass(frozen=True)
class MemoryPlan:
    """How one run bounds its device memory: experts per chunk, tokens per batch."""

    expert_chunk: int
    token_batch: int
    min_bytes: int  # the least the largest layer needs (one expert at a time)
    need_bytes: int  # estimated peak of the largest layer at this plan


def _layer_bytes(layer: nn.Module, experts: nn.Module | None) -> tuple[int, int, int, int]:
    """(float32 parameter bytes, float32 down-projection stack bytes, bytes of one expert, widest row)."""
    params = sum(p.numel() for p in layer.parameters()) * 4
    widest = max((p.shape[-1] for p in layer.parameters() if p.dim() >= 2), default=1)
    widest = max([widest] + [p.shape[-2] for p in layer.parameters() if p.dim() >= 2])
    if experts is None:
        return params, 0, 0, widest
    gate_up, down = experts.gate_up_proj, experts.down_proj
    one_expert = (gate_up[0].numel() + down[0].numel()) * 4
    return params, down.numel() * 4, one_expert, widest


def plan_memory(layers: list[nn.Module], experts_of, token_batch: int, max_gpu_gib: float | None) -> MemoryPlan:
    """The plan for the largest of ``layers`` (``experts_of(layer)``: its routed experts or None).

    Raises ValueError naming the minimum when ``max_gpu_gib`` is below what one layer needs.
    """
    worst = None
    for i, layer in enumerate(layers):
        p, d, e, widest = _layer_bytes(layer, experts_of(layer))
        floor = p + d + 8 * e + 24 * token_batch * widest * 4
        if worst is None or floor > worst[0]:
            worst = (floor, e, i)
    floor, one_expert, index = worst
    if max_gpu_gib is not None and max_gpu_gib * GIB < floor:
        raise ValueError(
            f"--max-gpu-memory {max_gpu_gib:g} GiB is too small: decoder layer {index} needs at least "
            f"{floor / GIB:.2f} GiB (its float32 weights, one expert and one batch of {token_batch} tokens); "
            f"give --max-gpu-memory {floor / GIB:.2f} or more"
        )
    spare = (max_gpu_gib * GIB - floor) if max_gpu_gib is not None else DEFAULT_SPARE_GIB * GIB
    chunk = max(1, int(spare // (8 * one_expert))) if one_expert else 1
    return MemoryPlan(chunk, token_batch, floor, floor + 8 * one_expert * (chunk - 1))


def cap_device_memory(device: torch.device, max_gpu_gib: float | None) -> None:
    """Make ``max_gpu_gib`` a hard limit of torch's allocator on a CUDA ``device``."""
    if max_gpu_gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_gpu_gib * GIB / total), device)


def host_rss_peak_gib() -> float:
    """Peak resident set size of this process so far: Linux's VmHWM, which starts afresh at exec
    (ru_maxrss keeps the parent's peak across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except OSError:  # no procfs (macOS): ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30


@dataclass
class StageClock:
    """Wall time and peak memory per named stage; stages may repeat (summed, peak kept) and
    nest (a part of stage ``mlp`` is named ``mlp/part``; the outer peak includes its parts')."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_gpu: dict[str, int] = field(default_factory=dict)
    peak_gpu_total: int = 0
    _open: list[int] = field(default_factory=list)  # the peak so far of each open stage, outermost first

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time the block as stage ``name`` and record its peak GPU memory (and host RSS, logged)."""
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self._open.append(0)
        start = time.time()
        try:
            yield
        finally:
            seconds = time.time() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            peak = max(self._open.pop(), torch.cuda.max_memory_allocated() if cuda else 0)
            if self._open:
                self._open[-1] = max(self._open[-1], peak)
            if cuda:
                self.peak_gpu[name] = max(self.peak_gpu.get(name, 0), peak)
                self.peak_gpu_total = max(self.peak_gpu_total, peak)
            log.debug("stage %s: %.1f s, peak GPU %.2f GiB, peak host RSS %.2f GiB", name, seconds, peak / GIB, host_rss_peak_gib())

    def report(self) -> dict:
        out = {"seconds_per_stage": {k: round(v, 2) for k, v in self.seconds.items()},
               "peak_host_rss_gib": round(host_rss_peak_gib(), 3)}
        if torch.cuda.is_available():
            out["peak_gpu_gib"] = round(self.peak_gpu_total / GIB, 3)
            out["peak_gpu_gib_per_stage"] = {k: round(v / GIB, 3) for k, v in self.peak_gpu.items()}
        return out


def peak_memory() -> dict:
    """Peak host RSS and torch's peak GPU allocation since the last reset of its statistics."""
    out = {"peak_host_rss_gib": round(host_rss_peak_gib(), 3)}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out
