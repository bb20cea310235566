"""Where a compiled decode step of the Qwen3-30B-A3B-shaped model spends its GPU time.

    PYTHONPATH=src python3 -m benchmarks gpu-profile-e2e

The model of bench_gpu_e2e.py (bf16, then CodeQuant W4A16 with random packed weights, with
transformers' routers, then fused ones, then q/k/v fused too, then W4A4 with both fused;
``--no-bf16`` skips the first, ``--fused-only`` the two W4A16 steps before q/k/v fusion), every
decoder layer under torch.compile; five decode steps under torch.profiler (no CUDA graph:
kernel durations are the same, the gaps are not counted), then the step as one CUDA graph (median
replay time: kernels plus the gaps between them). Prints the kernel time per step by
category and the largest kernels (us per step, launches per step).
"""

from __future__ import annotations

import collections

import torch

from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from benchmarks.bench_gpu_e2e import compile_layers, gpu_model, quantize_randomly, set_act
from benchmarks.common import cuda_graph_us
from codequant.core.activations import ActQuantSpec
from codequant.modules.attention import fuse_qkv
from codequant.modules.router import fuse_routers

# (substring of the kernel name, category), first match wins
CATEGORIES = [
    ("cq::gemv", "codequant gemv"), ("cq::topk_sum", "codequant topk_sum"), ("cq::moe_align", "codequant route"),
    ("cq::prep_x", "codequant prologue"), ("cq::route_", "codequant router (fused)"), ("triton", "inductor (fused elementwise, norms, softmax)"),
    ("sdpa", "attention (sdpa)"), ("flash", "attention (sdpa)"), ("topk", "torch.topk (router)"),
    ("sortkv", "torch.topk (router)"), ("grouped_gemm", "bf16 grouped GEMM (experts)"), ("cutlass", "bf16 grouped GEMM (experts)"),
    ("nvjet", "cuBLAS GEMV (dense bf16, router, lm_head)"), ("splitkreduce", "cuBLAS GEMV (dense bf16, router, lm_head)"),
]


def category(name: str) -> str:
    n = name.lower()
    return next((c for key, c in CATEGORIES if key in n), "other")


def prof(model, label: str, layers: int, steps: int = 5):
    """Print the kernel time of one compiled decode step (mean over ``steps``) by category."""
    p = 16
    prompt = torch.randint(0, 1000, (1, p), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device="cuda"))
        compile_layers(model, True)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([p], device="cuda")
        for _ in range(3):
            model(input_ids=tok, past_key_values=cache, cache_position=pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(steps):
                model(input_ids=tok, past_key_values=cache, cache_position=pos)
            torch.cuda.synchronize()
        graph_us = cuda_graph_us([lambda: model(input_ids=tok, past_key_values=cache, cache_position=pos)])
    compile_layers(model, False)
    sums, counts, names, launches = (collections.Counter() for _ in range(4))
    for ev in pr.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            c = category(ev.name)
            sums[c] += ev.device_time_total / steps
            counts[c] += 1 / steps
            names[ev.name[:90]] += ev.device_time_total / steps
            launches[ev.name[:90]] += 1 / steps
    tot = sum(sums.values())
    print(f"== {label}: kernel time per step {tot:.0f} us ({tot / layers:.1f} us / layer), kernels per step "
          f"{sum(counts.values()):.0f}; the step as one CUDA graph {graph_us:.0f} us")
    for c, v in sums.most_common():
        print(f"   {c:44s} {v:8.0f} us  {counts[c]:6.0f} launches")
    for n, v in names.most_common(24):
        print(f"      {v:8.0f} us  {launches[n]:5.0f} x  {n}")


def main(argv: list[str]) -> None:
    if not set(argv) <= {"--no-bf16", "--fused-only"}:
        raise SystemExit("gpu-profile-e2e takes no arguments but --no-bf16 and --fused-only")
    layers = 48
    model = gpu_model(layers)
    if "--no-bf16" not in argv:
        prof(model, "bf16", layers)
    quantize_randomly(model, ActQuantSpec(bits=16))
    if "--fused-only" not in argv:
        prof(model, "W4A16, transformers routers", layers)
    fuse_routers(model)
    if "--fused-only" not in argv:
        prof(model, "W4A16, fused routers", layers)
    fuse_qkv(model)
    prof(model, "W4A16, fused routers and q/k/v", layers)
    set_act(model, ActQuantSpec(bits=4))
    prof(model, "W4A4, fused routers and q/k/v", layers)
