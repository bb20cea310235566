"""GPU kernel benchmarks: CodeQuant LUT kernels vs cuBLAS bf16, PyTorch int4 and torch._grouped_mm.

Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 -m benchmarks gpu --out benchmarks/results

Every timing is a CUDA-graph replay of a batch of calls that rotate through weight copies
(and, for MoE, random routings) whose bytes exceed the 50 MB L2 several times over; the
per-call time is the median replay time over the batch size. The read bandwidth used for
``pct_bw`` is measured in the same run (a large reduction over a 4 GiB buffer); the copy
bandwidth is reported too. Weights are random (speed does not depend on the values).

Writes gpu-linear.json, gpu-moe.json (records as in benchmarks/README.md), gpu-meta.json
(bandwidths, accuracy of each path against the reference, config sweep) and gpu-speedup.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

# the W4A4 prefill rows time the opt-in FP8 path (see the ops doc)
os.environ.setdefault("CODEQUANT_GPU_W4A4_PREFILL", "fp8")
import torch.nn.functional as F

from benchmarks.common import ACT_BITS, L2_BYTES, command_line, copies_beyond, cuda_graph_us, gpu_bandwidth, moe_dims, random_packed
from codequant.core.activations import ActQuantSpec
from codequant.core.format import PackedWeight, pack
from codequant.core.swiglu import swiglu
from codequant import kernels
from codequant.kernels import reference
from codequant.kernels.gpu import ops

DENSE_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (7168, 2048), (2048, 7168)]
DENSE_MS = [1, 4, 16, 64, 512, 2048]
MOE_MODELS = {name: moe_dims(name) for name in ("qwen3_30b_a3b", "mixtral_8x7b", "deepseek_v2_lite")}
MOE_TOKENS = [1, 4, 16, 64, 512]
MODES = {mode: ActQuantSpec(bits=ACT_BITS[mode]) for mode in ("w4a16", "w4a4")}


def log(*a):
    print(*a, flush=True)


def lut_bytes(w: PackedWeight, experts: int | None = None) -> int:
    """Bytes the kernels read for a weight (indices + codebooks), for `experts` of a stack."""
    per = w.indices[0].numel() + w.codebook[0].numel() * 2 if w.indices.dim() == 3 else None
    if experts is None:
        return w.indices.numel() + w.codebook.numel() * 2
    return per * experts


def int4_weight(n, k):
    """PyTorch's tinygemm int4 weight (group 128) for torch.ops.aten._weight_int4pack_mm."""
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
    sz = (torch.rand(k // 128, n, 2, device="cuda") * 0.02).to(torch.bfloat16)
    return packed, sz


# ---------------------------------------------------------------- dense

def weight_sets(n: int, k: int):
    """(packed, bf16, int4 or None) weight copies for an N x K linear, each set together
    more than 4x the L2, so that cycling through them times DRAM, not the cache."""
    pw = random_packed((), n, k, "cuda")
    c_lut = copies_beyond(L2_BYTES, lut_bytes(pw))
    c_bf16 = copies_beyond(L2_BYTES, n * k * 2)
    lut_w = [pw] + [random_packed((), n, k, "cuda") for _ in range(c_lut - 1)]
    bf16_w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(c_bf16)]
    try:
        int4_w = [int4_weight(n, k) for _ in range(c_lut)]
    except Exception as e:  # noqa: BLE001
        log("int4 pack failed:", repr(e))
        int4_w = None
    return lut_w, bf16_w, int4_w


def baseline_us(x, bf16_w, int4_w):
    """(cuBLAS bf16 F.linear, torch int4 or None) microseconds per call for x over the weight copies."""
    t_bf16 = cuda_graph_us([lambda w=w: F.linear(x, w) for w in bf16_w])
    t_int4 = None
    if int4_w is not None:
        try:
            t_int4 = cuda_graph_us([lambda w=w: torch.ops.aten._weight_int4pack_mm(x, w[0], 128, w[1]) for w in int4_w])
        except Exception as e:  # noqa: BLE001
            log("int4 mm failed:", repr(e))
    return t_bf16, t_int4


def linear_record(mode, m, n, k, t, wbytes, t_bf16, t_int4, read_gbps) -> dict:
    """One dense result record (schema in benchmarks/README.md)."""
    gbps = wbytes / t / 1e3
    return dict(op="linear", mode=mode, M=m, N=n, K=k, experts=None, topk=None, us=round(t, 3), gbps=round(gbps, 1),
                pct_bw=round(100 * gbps / read_gbps, 1), vs_bf16=round(t_bf16 / t, 3),
                vs_int4=None if t_int4 is None else round(t_int4 / t, 3), vs_grouped_mm=None)


def bench_linear(shapes, ms, modes, read_gbps: float):
    recs = []
    for n, k in shapes:
        lut_w, bf16_w, int4_w = weight_sets(n, k)
        pw = lut_w[0]
        wbytes = lut_bytes(pw)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16, t_int4 = baseline_us(x, bf16_w, int4_w)
            for mode in modes:
                act = MODES[mode]
                t = cuda_graph_us([lambda w=w: kernels.linear(x, w, act) for w in lut_w])
                recs.append(linear_record(mode, m, n, k, t, wbytes, t_bf16, t_int4, read_gbps))
                gbps = recs[-1]["gbps"]
                log(f"linear {mode} M={m:5d} N={n:6d} K={k:6d}: {t:9.2f} us {gbps:7.0f} GB/s  bf16 {t_bf16:9.2f}  int4 {t_int4 and round(t_int4, 2)}  x{t_bf16 / t:.2f}")
        del lut_w, bf16_w, int4_w
        torch.cuda.empty_cache()
    return recs


# ---------------------------------------------------------------- MoE

def grouped_mm_moe(x, idx, w, gu, dn):
    """bf16 routed SwiGLU experts through torch._grouped_mm (sorted tokens, no host sync)."""
    t, k = idx.shape
    e = gu.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(0, flat.int(), torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // k
    xs = x[tok]
    h = swiglu(torch._grouped_mm(xs, gu.transpose(-2, -1), offs=offs))
    y = torch._grouped_mm(h, dn.transpose(-2, -1), offs=offs)
    y = y * w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tok, y)


def routing(t, e, k, shared):
    """Random (weights, expert indices) of t tokens over e experts, top-k plus every shared expert."""
    scores = torch.randn(t, e, device="cuda")
    w, idx = scores.softmax(-1).topk(k, -1)
    if shared:
        idx = torch.cat([idx, torch.arange(e, e + shared, device="cuda").expand(t, shared)], 1)
        w = torch.cat([w, torch.ones(t, shared, device="cuda")], 1)
    return w.to(torch.bfloat16), idx


def bench_moe(models, tokens, modes, read_gbps: float):
    recs = []
    for name, (e, k, h, i, shared) in models.items():
        et, kt = e + shared, k + shared
        gu = random_packed((et,), 2 * i, h, "cuda")
        dn = random_packed((et,), h, i, "cuda")
        per_expert = lut_bytes(gu, 1) + lut_bytes(dn, 1)
        bf16_bytes = et * 3 * h * i * 2
        c = max(2, min(4, math.ceil(8 * L2_BYTES / (per_expert * min(et, 8)))))
        c_bf = max(2, min(3, math.ceil(8 * L2_BYTES / bf16_bytes)))
        lut_w = [(gu, dn)] + [(random_packed((et,), 2 * i, h, "cuda"), random_packed((et,), h, i, "cuda")) for _ in range(c - 1)]
        bf_w = [(torch.randn(et, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02,
                 torch.randn(et, h, i, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(c_bf)]
        for t in tokens:
            calls = 8
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            routes = [routing(t, e, k, shared) for _ in range(calls)]
            active = statistics.mean(int(torch.unique(r[1]).numel()) for r in routes)
            t_gmm = cuda_graph_us([lambda j=j: grouped_mm_moe(x, routes[j][1], routes[j][0], *bf_w[j % c_bf]) for j in range(calls)], reps=10)
            t_fbf = cuda_graph_us([lambda j=j: kernels.moe(x, routes[j][1], routes[j][0], *bf_w[j % c_bf], MODES["w4a16"], MODES["w4a16"]) for j in range(calls)], reps=10)
            for mode in modes:
                act = MODES[mode]
                tq = cuda_graph_us([lambda j=j: kernels.moe(x, routes[j][1], routes[j][0], *lut_w[j % c], act, act) for j in range(calls)], reps=10)
                gbps = active * per_expert / tq / 1e3
                recs.append(dict(op="moe", mode=mode, M=t, N=h, K=i, experts=et, topk=kt, us=round(tq, 3), gbps=round(gbps, 1),
                                 pct_bw=round(100 * gbps / read_gbps, 1), vs_bf16=round(t_fbf / tq, 3), vs_int4=None,
                                 vs_grouped_mm=round(t_gmm / tq, 3)))
                log(f"moe {name} {mode} T={t:4d}: {tq:9.2f} us  {gbps:6.0f} GB/s ({active:.1f} experts)  fused-bf16 {t_fbf:9.2f}  grouped_mm {t_gmm:9.2f}")
        del lut_w, bf_w
        torch.cuda.empty_cache()
    return recs


# ---------------------------------------------------------------- accuracy of each path, config sweep

def accuracy():
    """Relative error vs the reference of each W4A4 / W4A16 path on k-means-like codebooks
    (sorted quantiles of weights with a few outlier columns): decode M = 16 (CUDA kernel)
    and prefill M = 512 (W4A16: dequantize + cuBLAS; W4A4: FP8 tensor cores)."""
    torch.manual_seed(0)
    res = {}
    n, k = 4096, 4096
    w = torch.randn(n, k, device="cuda") * 0.02
    w[:, :8] *= 20  # a few outlier columns, as in real weights
    qs = torch.quantile(w[:256].float(), torch.linspace(0.01, 0.99, 16, device="cuda"), dim=1).T  # [256, 16]
    cb = qs.repeat(n // 256, 1)
    cb[:, -1] = w.abs().amax(1)  # outlier centroid
    idx = (w[:, :, None] - cb[:, None, :]).abs().argmin(-1)
    pw = pack(idx, cb[:, None, :])
    for m in (16, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for mode in ("w4a16", "w4a4"):
            ref = reference.linear(x.float(), pw, MODES[mode]).double()
            y = kernels.linear(x, pw, MODES[mode]).double()
            res[f"{mode}_M{m}_rel_err"] = ((y - ref).norm() / ref.norm()).item()
    return res


def sweep():
    out = []
    for (n, k, m) in [(4096, 14336, 1), (14336, 4096, 1), (4096, 14336, 16), (4096, 14336, 64), (4096, 14336, 2048)]:
        ws = [random_packed((), n, k, "cuda") for _ in range(8)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cfgs = []
        if m <= 4:
            for lut in (2,):
                for bn, bk, nw, sp in [(16, 256, 4, 1), (32, 256, 4, 1), (16, 512, 4, 1), (8, 512, 2, 1), (16, 256, 4, 2), (32, 128, 4, 2), (64, 128, 8, 1)]:
                    cfgs.append(ops.Config("gemv", block_m=1, block_n=bn, block_k=bk, split=sp, num_warps=nw, num_stages=3, lut=lut))
            for lut in (2,):
                cfgs.append(ops.Config("mm", block_m=16, block_n=64, block_k=128, split=2, num_warps=4, lut=lut))
                cfgs.append(ops.Config("mm", block_m=16, block_n=32, block_k=256, split=1, num_warps=4, lut=lut))
        elif m <= 64:
            for lut in (2,):
                for bn, bk, nw, sp, st in [(64, 128, 4, 1, 3), (64, 128, 4, 2, 3), (32, 128, 4, 2, 3), (128, 128, 8, 1, 3), (64, 256, 4, 1, 2), (16, 256, 2, 1, 3)]:
                    cfgs.append(ops.Config("mm", block_m=max(16, m), block_n=bn, block_k=bk, split=sp, num_warps=nw, num_stages=st, lut=lut))
        else:
            for lut in (2,):
                for bm, bn, bk, nw, st in [(128, 128, 128, 8, 3), (256, 128, 128, 8, 3), (64, 128, 128, 4, 3)]:
                    cfgs.append(ops.Config("mm", block_m=bm, block_n=bn, block_k=bk, split=1, num_warps=nw, num_stages=st, lut=lut))
        for cfg in cfgs:
            for mode in ("w4a16",) if m > 1 else ("w4a16", "w4a4"):
                try:
                    t = cuda_graph_us([lambda w=w: ops.linear(x, w, MODES[mode], config=cfg) for w in ws], reps=10)
                except Exception as e:  # noqa: BLE001
                    log("sweep fail", cfg, repr(e)[:200])
                    continue
                gb = lut_bytes(ws[0]) / t / 1e3
                out.append(dict(M=m, N=n, K=k, mode=mode, cfg=cfg.__dict__, us=round(t, 2), gbps=round(gb)))
                log(f"sweep M={m} {n}x{k} {mode} {cfg}: {t:.2f} us {gb:.0f} GB/s")
    return out


def plot(recs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for mode, ls in (("w4a16", "-"), ("w4a4", "--")):
        for n, k in DENSE_SHAPES:
            rs = sorted((r for r in recs if r["op"] == "linear" and r["mode"] == mode and r["N"] == n and r["K"] == k), key=lambda r: r["M"])
            if rs:
                axes[0].plot([r["M"] for r in rs], [r["vs_bf16"] for r in rs], ls, marker="o", label=f"{mode} {n}x{k}")
        for name, (e, kk, h, i, sh) in MOE_MODELS.items():
            rs = sorted((r for r in recs if r["op"] == "moe" and r["mode"] == mode and r["K"] == i and r["N"] == h), key=lambda r: r["M"])
            if rs:
                axes[1].plot([r["M"] for r in rs], [r["vs_grouped_mm"] for r in rs], ls, marker="o", label=f"{mode} {name}")
    for ax, title in zip(axes, ("dense linear: speedup over cuBLAS bf16", "fused MoE: speedup over torch._grouped_mm bf16")):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("tokens (M)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", choices=["linear", "moe", "sweep", "all"], default="all")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    bw = gpu_bandwidth()
    log("bandwidth", bw, torch.cuda.get_device_name())
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": command_line("gpu", argv), **bw}
    if a.sweep or a.only == "sweep":
        meta["sweep"] = sweep()
        json.dump(meta, open(os.path.join(a.out, "gpu-sweep.json"), "w"), indent=1)
        if a.only == "sweep":
            return
    recs = []
    if a.only in ("linear", "all"):
        shapes = DENSE_SHAPES[:3] if a.quick else DENSE_SHAPES
        recs += bench_linear(shapes, DENSE_MS, list(MODES), bw["read_gbps"])
        json.dump(recs, open(os.path.join(a.out, "gpu-linear.json"), "w"), indent=1)
        meta["accuracy"] = accuracy()
        log("accuracy", meta["accuracy"])
    if a.only in ("moe", "all"):
        moe_recs = bench_moe(MOE_MODELS, MOE_TOKENS, list(MODES), bw["read_gbps"])
        json.dump(moe_recs, open(os.path.join(a.out, "gpu-moe.json"), "w"), indent=1)
        recs += moe_recs
    meta["seconds"] = round(time.time() - t0)
    json.dump(meta, open(os.path.join(a.out, "gpu-meta.json"), "w"), indent=1)
    plot(recs, os.path.join(a.out, "gpu-speedup.png"))
