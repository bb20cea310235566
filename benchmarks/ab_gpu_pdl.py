"""Programmatic dependent launch on / off, side by side in one process: the CUDA dense GEMVs
(five issue shapes plus attention-projection shapes, M = 1, 4, 16) and the Qwen3-30B-A3B MoE.

    PYTHONPATH=src python3 benchmarks/ab_gpu_pdl.py

Timing as in bench_gpu.py (CUDA graphs of back-to-back calls over weight copies beyond the L2);
each side is the better of two interleaved rounds. Prints one line per case.
"""

from __future__ import annotations

import math

import torch

import bench_gpu as B
from codequant import kernels

SHAPES = B.DENSE_SHAPES + [(4096, 2048), (2048, 4096), (512, 2048)]


def pdl_and_plain(fns) -> tuple[float, float]:
    res = {True: [], False: []}
    for _ in range(2):
        for on in (True, False):
            with kernels.kernel_options(cuda_pdl=on):
                res[on].append(B.time_calls(fns))
    return min(res[True]), min(res[False])


def main():
    for n, k in SHAPES:
        copies = max(2, math.ceil(4 * B.L2_BYTES / (n * k // 2)))
        pw = [B.random_packed((), n, k) for _ in range(copies)]
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for mode in ("w4a16", "w4a4"):
                act = B.MODES[mode]
                on, off = pdl_and_plain([lambda w=w: kernels.linear(x, w, act) for w in pw])
                print(f"dense {n}x{k} M={m:2d} {mode}: PDL {on:7.2f} us  plain {off:7.2f} us  x{off / on:.3f}", flush=True)
        del pw
        torch.cuda.empty_cache()
    e, topk, h, i = B.MOE_MODELS["qwen3-30b-a3b"][:4]
    lut = [(B.random_packed((e,), 2 * i, h), B.random_packed((e,), h, i)) for _ in range(4)]
    for t in (1, 4, 16):
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        routes = [B.routing(t, e, topk, 0) for _ in range(8)]
        for mode in ("w4a16", "w4a4"):
            act = B.MODES[mode]
            on, off = pdl_and_plain([lambda j=j: kernels.moe(x, routes[j][1], routes[j][0], *lut[j % 4], act, act) for j in range(8)])
            print(f"moe qwen3 T={t:2d} {mode}: PDL {on:7.2f} us  plain {off:7.2f} us  x{off / on:.3f}", flush=True)


if __name__ == "__main__":
    main()
