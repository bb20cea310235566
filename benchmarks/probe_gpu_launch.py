"""W4A16 dense decode GEMV at fixed launch configs, PDL on and off: (R row tiles per warp, W warps
per block) on the small shapes where the launch, not the weight stream, sets the time (Qwen3-30B-A3B
expert and attention shapes, 2048-row GEMVs), M = 1 and 16, with cuBLAS bf16 and torch int4 timed in
the same process. Timing as in bench_gpu (benchmarks.common.cuda_graph_us over weight copies beyond
the L2); each side is the better of two interleaved rounds. Run on a CUDA machine from the
repository root:

    PYTHONPATH=src python3 -m benchmarks gpu-probe-launch --out benchmarks/results

Writes gpu-decode-launch.json: per shape, M and config the PDL and plain times in us (``default``:
the config cuda_gemv.linear picks).
"""

import argparse
import json
import os

import torch

from benchmarks.bench_gpu import MODES, baseline_us, weight_sets
from benchmarks.common import command_line, cuda_graph_us
from codequant.kernels.gpu import cuda_gemv

SHAPES = [(2048, 768), (768, 2048), (2048, 2048), (2048, 4096), (2048, 7168), (4096, 2048)]
CFGS = [(1, 2), (1, 4), (1, 8), (1, 16), (2, 2), (2, 4), (2, 8)]


def default_config(n: int, k: int) -> tuple[int, int]:
    """(R, W) of cuda_gemv.linear for W4A16 with x read in place."""
    return cuda_gemv.dense_config(-(-n // 16), k, torch.cuda.get_device_properties(0).multi_processor_count, True)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    act = MODES["w4a16"]
    recs = []
    print(torch.cuda.get_device_name(), flush=True)
    for n, k in SHAPES:
        lut_w, bf16_w, int4_w = weight_sets(n, k)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tb, ti = baseline_us(x, bf16_w, int4_w)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            for r, w in CFGS:
                res = {True: [], False: []}
                for _ in range(2):
                    for on in (True, False):
                        res[on].append(cuda_graph_us([lambda wt=wt: cuda_gemv.linear(x, wt, act, None, y, r=r, w=w, pdl=on) for wt in lut_w]))
                rec = dict(M=m, N=n, K=k, R=r, W=w, default=(r, w) == default_config(n, k), pdl=round(min(res[True]), 3),
                           plain=round(min(res[False]), 3), bf16=round(tb, 3), int4=ti and round(ti, 3))
                recs.append(rec)
                print(" ".join(f"{key}={v}" for key, v in rec.items()), flush=True)
        del lut_w, bf16_w, int4_w
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": command_line("gpu-probe-launch", argv),
               "records": recs}, open(os.path.join(a.out, "gpu-decode-launch.json"), "w"), indent=1)
