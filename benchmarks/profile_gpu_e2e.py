"""Where a compiled decode step of the Qwen3-30B-A3B-shaped model spends its GPU time.

    PYTHONPATH=src python3 benchmarks/profile_gpu_e2e.py

The model of bench_gpu_e2e.py (bf16, then CodeQuant W4A16 with random packed weights), every
decoder layer under torch.compile; five decode steps under torch.profiler (no CUDA graph:
kernel durations are the same, the gaps are not counted). Prints the kernel time per step by
category and the largest kernels.
"""

from __future__ import annotations

import collections

import torch

from torch.profiler import ProfilerActivity, profile
from transformers import Qwen3MoeForCausalLM, StaticCache

import bench_gpu_e2e as E
from codequant.core.activations import ActQuantSpec

# (substring of the kernel name, category), first match wins
CATEGORIES = [
    ("cq::gemv", "codequant gemv"), ("cq::topk_sum", "codequant topk_sum"), ("cq::moe_align", "codequant route"),
    ("cq::prep_x", "codequant prologue"), ("triton", "inductor (fused elementwise, norms, softmax)"),
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
        E.compile_layers(model, True)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([p], device="cuda")
        for _ in range(3):
            model(input_ids=tok, past_key_values=cache, cache_position=pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(steps):
                model(input_ids=tok, past_key_values=cache, cache_position=pos)
            torch.cuda.synchronize()
    E.compile_layers(model, False)
    sums, counts, names = collections.Counter(), collections.Counter(), collections.Counter()
    for ev in pr.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            c = category(ev.name)
            sums[c] += ev.device_time_total / steps
            counts[c] += 1 / steps
            names[ev.name[:90]] += ev.device_time_total / steps
    tot = sum(sums.values())
    print(f"== {label}: kernel time per step {tot:.0f} us ({tot / layers:.1f} us / layer), kernels per step {sum(counts.values()):.0f}")
    for c, v in sums.most_common():
        print(f"   {c:44s} {v:8.0f} us  {counts[c]:6.0f} launches")
    for n, v in names.most_common(14):
        print(f"      {v:8.0f} us  {n}")


def main():
    torch.manual_seed(0)
    layers = 48
    cfg = E.qwen3_30b_a3b_config(layers)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    prof(model, "bf16", layers)
    E.quantize_randomly(model, ActQuantSpec(bits=16))
    prof(model, "W4A16", layers)


if __name__ == "__main__":
    main()
