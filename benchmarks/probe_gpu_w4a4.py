"""W4A4 decode against W4A16 on the CUDA kernels, split into its two launches: the prologue that
quantizes x (``prep_x``) and the GEMV on the prologue's codes, for the kernels of this tree and,
in the same process, for other builds: ``--baseline DIR`` (a copy of an earlier
``src/codequant/kernels/gpu/csrc``) and ``--l2-256`` (this tree's kernels with the L2::256B
prefetch hint on the weight copies, so that a warp's next chunks of a row are fetched into L2
with the first). W4A16 and W4A4 with the default launch, with PDL and plain; ``--stages``: W4A4
with other ring depths. Timing as in bench_gpu (benchmarks.common.cuda_graph_us:
CUDA graph over weight copies > 4x L2; the prologue alone: 8 back-to-back calls on one x).
Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 -m benchmarks gpu-probe-w4a4 --baseline /tmp/base_csrc --l2-256 --out benchmarks/results

Writes gpu-decode-w4a4{--tag}.json: per shape and M the times in us, and whether the other builds give
the same W4A4 outputs bit for bit.
"""

import argparse
import json
import os
import shutil

import torch
from torch.utils.cpp_extension import load

from benchmarks.bench_gpu import MODES, baseline_us, weight_sets
from benchmarks.common import command_line, cuda_graph_us, gpu_bandwidth
from codequant.kernels import reference
from codequant.kernels.gpu import cuda_gemv

A16, A4 = MODES["w4a16"], MODES["w4a4"]
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (2048, 768), (768, 2048), (2048, 2048), (2048, 4096)]
MS = [1, 4, 16]


CSRC = "src/codequant/kernels/gpu/csrc"
# (text in cq_gemv.cu, the patched text) of the --l2-256 build
L2_256 = ('asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"', 'asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;"')


def build(name: str, d: str):
    return load(name=name, sources=[f"{d}/cq_gemv_binding.cpp", f"{d}/cq_gemv.cu"], extra_include_paths=[d],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"])


def build_l2_256():
    src = open(f"{CSRC}/cq_gemv.cu").read()
    assert src.count(L2_256[0]) == 1, f"{CSRC}/cq_gemv.cu changed: update the patch"
    d = "/tmp/cq_gemv_l2_256"
    os.makedirs(d, exist_ok=True)
    open(f"{d}/cq_gemv.cu", "w").write(src.replace(*L2_256))
    for f in ("cq_gemv_binding.cpp", "cq_gemv.h"):
        shutil.copy(f"{CSRC}/{f}", d)
    return build("cq_gemv_l2_256", d)


def parts(ext, x, ws, m, n, k):
    """(prologue us, GEMV-on-codes us) of W4A4 for ext."""
    kp = ws[0].indices.shape[-1] * 2
    none = torch.empty(0, device="cuda")
    xp = torch.empty(m, kp // 2, dtype=torch.int32, device="cuda")
    xs = torch.empty(m, dtype=torch.float32, device="cuda")

    def prep():
        ext.prep_x(x, xp, xs, none, 0, 0, False, 4, 1.0, False, False)

    t_prep = cuda_graph_us([prep] * 8)
    prep()
    r, w = cuda_gemv.config(-(-n // 16), k)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    slut = k >= cuda_gemv.SMEM_LUT_MIN_K and m <= cuda_gemv.SMEM_LUT_MAX_M
    t_gemv = cuda_graph_us([lambda wt=wt: ext.gemv(xp, False, xs, wt.indices, wt.codebook, none, none, none, none, y, none, none, none,
                                                  m, k, 0, 0, 0, 0, False, r, w, cuda_gemv.STAGES, slut, 0, 0) for wt in ws])
    return t_prep, t_gemv


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default=None, help="csrc directory of the build to compare with")
    p.add_argument("--l2-256", action="store_true", help="also the build with the L2::256B prefetch hint")
    p.add_argument("--stages", type=int, nargs="+", default=[], help="also W4A4 with these ring depths")
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    new = cuda_gemv.load()
    assert new is not None, "CUDA kernel did not build"
    exts = {"new": new}
    if a.baseline:
        exts["base"] = build("cq_gemv_baseline", a.baseline)
    if a.l2_256:
        exts["l2"] = build_l2_256()
    bw = gpu_bandwidth()
    print("bandwidth", bw, torch.cuda.get_device_name(), flush=True)
    recs = []
    for n, k in SHAPES:
        lut_w, bf16_w, int4_w = weight_sets(n, k)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16, t_int4 = baseline_us(x, bf16_w, int4_w)
            rec = dict(M=m, N=n, K=k, bf16=round(t_bf16, 3), int4=t_int4 and round(t_int4, 3))
            ys = {}
            for tag, ext in exts.items():
                cuda_gemv._EXT = ext
                y16 = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                for pdl, suffix in ((None, ""), (True, "_pdl"), (False, "_plain")) if tag == "new" else ((None, ""),):
                    rec[("w4a16" if tag == "new" else f"w4a16_{tag}") + suffix] = round(
                        cuda_graph_us([lambda w=w: cuda_gemv.linear(x, w, A16, None, y16, pdl=pdl) for w in lut_w]), 3)
                y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                for pdl, suffix in ((None, ""), (True, "_pdl"), (False, "_plain")):
                    rec[f"w4a4_{tag}{suffix}"] = round(cuda_graph_us([lambda w=w: cuda_gemv.linear(x, w, A4, None, y, pdl=pdl)
                                                                     for w in lut_w]), 3)
                for v in a.stages:
                    rec[f"w4a4_{tag}_stages{v}"] = round(cuda_graph_us([lambda w=w: cuda_gemv.linear(x, w, A4, None, y, stages=v)
                                                                       for w in lut_w]), 3)
                rec[f"prep_{tag}"], rec[f"gemv_{tag}"] = (round(t, 3) for t in parts(ext, x, lut_w, m, n, k))
                ys[tag] = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                assert cuda_gemv.linear(x, lut_w[0], A4, None, ys[tag])
            ref = reference.linear(x.float(), lut_w[0], A4).double()
            rec["rel_err_new"] = ((ys["new"].double() - ref).norm() / ref.norm()).item()
            for tag in ys:
                if tag != "new":
                    rec[f"same_as_{tag}"] = bool(torch.equal(ys["new"], ys[tag]))
            cuda_gemv._EXT = new
            recs.append(rec)
            print(" ".join(f"{key}={v}" for key, v in rec.items()), flush=True)
        del lut_w, bf16_w, int4_w
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": command_line("gpu-probe-w4a4", argv), **bw, "records": recs},
              open(os.path.join(a.out, f"gpu-decode-w4a4{a.tag}.json"), "w"), indent=1)
    keys = [key for key in recs[0] if key not in ("M", "N", "K", "rel_err_new") and not key.startswith("same_as")]
    print("\n| M | N x K | " + " | ".join(keys) + " | W4A4 new / W4A16 | same |")
    for r in recs:
        same = all(v for key, v in r.items() if key.startswith("same_as"))
        print(f"| {r['M']} | {r['N']}x{r['K']} | " + " | ".join(str(r[key]) for key in keys)
              + f" | {r['w4a4_new'] / r['w4a16']:.2f} | {same} |")
