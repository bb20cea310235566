"""Programmatic dependent launch on / off, side by side in one process: the CUDA dense GEMVs
(five issue shapes plus attention-projection shapes, M = 1, 4, 16) and the Qwen3-30B-A3B MoE.

    PYTHONPATH=src python3 -m benchmarks gpu-pdl

Timing as in bench_gpu (benchmarks.common.cuda_graph_us: CUDA graphs of back-to-back calls over weight copies beyond the L2);
each side is the better of two interleaved rounds. Prints one line per case.
"""

from __future__ import annotations

import torch

from benchmarks.bench_gpu import DENSE_SHAPES, MODES, routing
from benchmarks.common import L2_BYTES, QWEN3_30B_A3B, copies_beyond, cuda_graph_us, moe_dims, random_packed
from codequant import kernels

SHAPES = DENSE_SHAPES + [(4096, 2048), (2048, 4096), (512, 2048)]


def pdl_and_plain(fns) -> tuple[float, float]:
    res = {True: [], False: []}
    for _ in range(2):
        for on in (True, False):
            with kernels.kernel_options(cuda_pdl=on):
                res[on].append(cuda_graph_us(fns))
    return min(res[True]), min(res[False])


def main(argv: list[str]) -> None:
    if argv:
        raise SystemExit("gpu-pdl takes no arguments")
    for n, k in SHAPES:
        pw = [random_packed((), n, k, "cuda") for _ in range(copies_beyond(L2_BYTES, n * k // 2))]
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for mode in ("w4a16", "w4a4"):
                act = MODES[mode]
                on, off = pdl_and_plain([lambda w=w: kernels.linear(x, w, act) for w in pw])
                print(f"dense {n}x{k} M={m:2d} {mode}: PDL {on:7.2f} us  plain {off:7.2f} us  x{off / on:.3f}", flush=True)
        del pw
        torch.cuda.empty_cache()
    e, topk, h, i, _ = moe_dims(QWEN3_30B_A3B)
    lut = [(random_packed((e,), 2 * i, h, "cuda"), random_packed((e,), h, i, "cuda")) for _ in range(4)]
    for t in (1, 4, 16):
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        routes = [routing(t, e, topk, 0) for _ in range(8)]
        for mode in ("w4a16", "w4a4"):
            act = MODES[mode]
            on, off = pdl_and_plain([lambda j=j: kernels.moe(x, routes[j][1], routes[j][0], *lut[j % 4], act, act) for j in range(8)])
            print(f"moe qwen3 T={t:2d} {mode}: PDL {on:7.2f} us  plain {off:7.2f} us  x{off / on:.3f}", flush=True)
