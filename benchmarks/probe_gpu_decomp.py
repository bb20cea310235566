"""Where the decode kernel's time goes (register lookup, smem_lut=False): the same kernel built three
more times from a patched copy of src/codequant/kernels/gpu/csrc/cq_gemv.cu (in /tmp), with the mma replaced by an xor of
its operands ("nomma"), the codebook lookup replaced by an xor of the index word ("nolut"), or both
("neither": the data movement alone), timed like bench_gpu (benchmarks.common.cuda_graph_us: CUDA graph over weight copies > 4x L2)
next to the real kernel ("base").
Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 -m benchmarks gpu-probe-decomp --out benchmarks/results

Writes gpu-decode-decomp.json. The patched builds compute wrong values on purpose: timing only.
"""

import argparse
import json
import os
import shutil

import torch
from torch.utils.cpp_extension import load

from benchmarks.common import L2_BYTES, copies_beyond, cuda_graph_us, random_packed
from codequant.core.activations import ActQuantSpec
from codequant.kernels.gpu import cuda_gemv

A16 = ActQuantSpec(bits=16)
# (text in cq_gemv.cu, the same text with the experiment's early return in front)
NO_MMA = ("""  if (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32""", """  if (EXP_NOMMA) { c[0] = __int_as_float(__float_as_int(c[0]) ^ a0 ^ a1 ^ a2 ^ a3 ^ b0 ^ b1); return; }
  if (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32""")
NO_LUT = ("""__device__ __forceinline__ void lookup8(const Table& T, uint32_t w, uint32_t* o) {
""", """__device__ __forceinline__ void lookup8(const Table& T, uint32_t w, uint32_t* o) {
  if (EXP_NOLUT) { o[0] = w ^ T.l[0]; o[1] = w ^ T.l[1]; o[2] = w ^ T.h[0]; o[3] = w ^ T.h[1]; return; }
""")
EXPERIMENTS = {"nomma": (1, 0), "nolut": (0, 1), "neither": (1, 1)}
SHAPES = [(4096, 14336), (14336, 4096), (2048, 7168)]


def run(tag, weights, recs):
    for (n, k), ws in weights.items():
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            t = cuda_graph_us([lambda w=w: cuda_gemv.linear(x, w, A16, None, y, smem_lut=False) for w in ws])
            gbps = ws[0].indices.numel() / t / 1e3
            recs.append(dict(build=tag, M=m, N=n, K=k, us=round(t, 3), index_gbps=round(gbps, 1)))
            print(f"{tag:8s} M={m:2d} {n}x{k}: {t:7.2f} us {gbps:6.0f} GB/s", flush=True)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    src = open("src/codequant/kernels/gpu/csrc/cq_gemv.cu").read()
    assert NO_MMA[0] in src and NO_LUT[0] in src, "src/codequant/kernels/gpu/csrc/cq_gemv.cu changed: update the patches"
    weights = {s: [random_packed((), *s, "cuda") for _ in range(copies_beyond(L2_BYTES, s[0] * s[1] // 2))] for s in SHAPES}
    recs = []
    cuda_gemv.load()
    run("base", weights, recs)
    for name, (no_mma, no_lut) in EXPERIMENTS.items():
        d = f"/tmp/cq_decomp_{name}"
        os.makedirs(d, exist_ok=True)
        patched = f"#define EXP_NOMMA {no_mma}\n#define EXP_NOLUT {no_lut}\n" + src.replace(*NO_MMA).replace(*NO_LUT)
        open(f"{d}/cq_gemv.cu", "w").write(patched)
        shutil.copy("src/codequant/kernels/gpu/csrc/cq_gemv_binding.cpp", d)
        shutil.copy("src/codequant/kernels/gpu/csrc/cq_gemv.h", d)
        cuda_gemv._EXT = load(name=f"cq_decomp_{name}", sources=[f"{d}/cq_gemv_binding.cpp", f"{d}/cq_gemv.cu"], extra_include_paths=[d],
                              extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"])
        run(name, weights, recs)
    os.makedirs(a.out, exist_ok=True)
    json.dump({"device": torch.cuda.get_device_name(), "records": recs}, open(os.path.join(a.out, "gpu-decode-decomp.json"), "w"), indent=1)
