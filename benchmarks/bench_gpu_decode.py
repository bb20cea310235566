"""Decode (M = 1, 4, 16), W4A16 and W4A4, on the CUDA C++ kernels vs cuBLAS bf16 and torch
int4 (tinygemm, group 128). Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 -m benchmarks gpu-decode --out benchmarks/results

Timing as in bench_gpu (benchmarks.common.cuda_graph_us): CUDA-graph replay of a batch of calls rotating through weight copies
larger than the 50 MB L2 (4x), median over replays; read bandwidth (4 GiB torch.amax) measured
in the same run. ``us`` times codequant.kernels.linear (the whole call: dispatch, output allocation, the kernel).
Writes gpu-decode-cuda.json (records), gpu-decode-cuda-meta.json (bandwidth, config sweep,
accuracy) and gpu-decode-cuda.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.bench_gpu import MODES, baseline_us, linear_record, log, lut_bytes, weight_sets
from benchmarks.common import command_line, cuda_graph_us, gpu_bandwidth
from codequant import kernels
from codequant.kernels import reference
from codequant.kernels.gpu import cuda_gemv

# the five dense shapes of issue #17, the Qwen3-30B-A3B expert shapes (down 2048x768, one half of gate_up 768x2048)
# and its attention projections (q 4096x2048, k / v 512x2048, o 2048x4096) and a 2048x2048 square
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (2048, 768), (768, 2048),
          (4096, 2048), (512, 2048), (2048, 4096), (2048, 2048)]
MS = [1, 4, 16]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--sweep", action="store_true", help="also time (stages, R, W) launch configs")
    p.add_argument("--sweep-ms", type=int, nargs="+", default=MS, help="M values of the sweep")
    p.add_argument("--sweep-modes", nargs="+", default=list(MODES), help="modes of the sweep")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    bw = gpu_bandwidth()
    log("bandwidth", bw, torch.cuda.get_device_name())
    assert cuda_gemv.load() is not None, "CUDA kernel did not build"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": command_line("gpu-decode", argv), **bw,
            "sweep": [], "accuracy": []}
    recs = []
    for n, k in SHAPES:
        lut_w, bf16_w, int4_w = weight_sets(n, k)
        pw = lut_w[0]
        wbytes = lut_bytes(pw)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16, t_int4 = baseline_us(x, bf16_w, int4_w)
            for mode, act in MODES.items():
                # accuracy on this shape (random weights / codebooks of benchmarks.common.random_packed)
                y = kernels.linear(x, pw, act)
                ref = reference.linear(x.float(), pw, act).double()
                err = ((y.double() - ref).norm() / ref.norm()).item()
                meta["accuracy"].append(dict(mode=mode, M=m, N=n, K=k, rel_err=err))
                t = cuda_graph_us([lambda w=w: kernels.linear(x, w, act) for w in lut_w])
                recs.append(linear_record(mode, m, n, k, t, wbytes, t_bf16, t_int4, bw["read_gbps"]))
                gbps = recs[-1]["gbps"]
                log(f"{mode} M={m:2d} {n:5d}x{k:5d}: cuda {t:7.2f} us {gbps:6.0f} GB/s ({100 * gbps / bw['read_gbps']:4.1f}%)  "
                    f"bf16 {t_bf16:7.2f}  int4 {t_int4 and round(t_int4, 2)}  x{t_bf16 / t:.2f} bf16  err {err:.1e}")
                if not a.sweep or m not in a.sweep_ms or mode not in a.sweep_modes:
                    continue
                r0, w0 = cuda_gemv.config(-(-n // 16), k)
                v0 = cuda_gemv.STAGES
                for v in (2, 3, 4):
                    for r in (1, 2):
                        for wn in (1, 2, 4, 8, 16):
                            if r == 2 and wn > 8:
                                continue
                            ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in lut_w]
                            try:
                                ts = cuda_graph_us([lambda w=w, yy=yy, r=r, wn=wn, v=v: cuda_gemv.linear(x, w, act, None, yy, r=r, w=wn, stages=v)
                                                 for w, yy in zip(lut_w, ys)], reps=10)
                            except Exception as e:  # noqa: BLE001
                                log("sweep fail", r, wn, v, repr(e)[:200])
                                continue
                            default = (r, wn, v) == (r0, w0, v0)
                            meta["sweep"].append(dict(mode=mode, M=m, N=n, K=k, R=r, W=wn, stages=v, default=default, us=round(ts, 3),
                                                      gbps=round(wbytes / ts / 1e3, 1)))
                            log(f"   sweep {mode} stages={v} R={r} W={wn:2d}: {ts:7.2f} us {wbytes / ts / 1e3:6.0f} GB/s{'  (default)' if default else ''}")
        del lut_w, bf16_w, int4_w
        torch.cuda.empty_cache()
    meta["seconds"] = round(time.time() - t0)
    json.dump(recs, open(os.path.join(a.out, "gpu-decode-cuda.json"), "w"), indent=1)
    json.dump(meta, open(os.path.join(a.out, "gpu-decode-cuda-meta.json"), "w"), indent=1)
    plot(recs, meta, os.path.join(a.out, "gpu-decode-cuda.png"))
    log("\n| mode | M | N x K | us | GB/s | % read BW | vs cuBLAS bf16 | vs int4 |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(recs, key=lambda r: (r["mode"], r["M"], r["N"], r["K"])):
        log(f"| {r['mode']} | {r['M']} | {r['N']}x{r['K']} | {r['us']:.2f} | {r['gbps']:.0f} | {r['pct_bw']:.1f} | {r['vs_bf16']:.2f} | "
            f"{r['vs_int4'] if r['vs_int4'] is None else round(r['vs_int4'], 2)} |")


def plot(recs, meta, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, ls in (("w4a16", "-"), ("w4a4", "--")):
        for n, k in SHAPES:
            rs = sorted((r for r in recs if r["N"] == n and r["K"] == k and r["mode"] == mode), key=lambda r: r["M"])
            axes[0].plot([r["M"] for r in rs], [r["vs_bf16"] for r in rs], ls, marker="o", label=f"{mode} {n}x{k}")
            axes[1].plot([r["M"] for r in rs], [r["pct_bw"] for r in rs], ls, marker="o", label=f"{mode} {n}x{k}")
    axes[0].set_title("CUDA decode: speedup over cuBLAS bf16")
    axes[1].set_title(f"% of read bandwidth ({meta['read_gbps']:.0f} GB/s)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (M)")
        ax.legend(fontsize=7)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
