"""How fast can the decode kernel's index stream be read at all? Pure-read kernels over the
packed indices of one weight (no lookup, no math: xor of the loaded words), in the access
patterns a GEMV could use, next to the real decode kernel, torch.amax and cuBLAS bf16 on the
same bytes. Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 -m benchmarks gpu-probe-read --out benchmarks/results

Patterns (a block = 16 rows, W warps split each row's K range; a "chunk" = 16 rows x 64*S bytes,
one warp-load instruction = 512 B):
  rows S: lane e of load i reads 16 B of row (32 i + e) / 4S; S = 1 is the decode kernel's
          pattern (64 B from each of 16 rows per chunk);
  il:     the W warps of a block take chunks w, w + W, ... (else a contiguous range each);
  tiled:  the [N/16][chunks][16][64] copy, 1 KB contiguous per chunk;
  flat:   each warp reads a contiguous range of the buffer, 512 B per load.
Load flavours: nc (ld.global.nc.L1::no_allocate, the kernel's), l2_256 (same with the
L2::256B prefetch hint), cs (ld.global.cs), plain (ld.global). Timing as benchmarks.common.cuda_graph_us
(CUDA graph over weight copies > 4x L2). Writes gpu-read-probe.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from benchmarks.common import L2_BYTES, copies_beyond, cuda_graph_us, gpu_bandwidth, random_packed
from codequant.core.activations import ActQuantSpec
from codequant.kernels.gpu import cuda_gemv

CUDA_SRC = r"""
#include <torch/extension.h>
#include <cuda_runtime.h>
#include <ATen/cuda/CUDAContext.h>
#include <stdint.h>

template <int LD> __device__ __forceinline__ uint4 ld(const void* p) {
  uint4 v;
  if (LD == 0)
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else if (LD == 1)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else if (LD == 2)
    asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// PAT 0: rows (chunk = 16 rows x 64S B), 1: tiled (S = 1), 2: flat (warp-contiguous 512S B per chunk)
template <int PAT, int S, int D, bool IL, int LD>
__global__ void read_kernel(const uint8_t* __restrict__ w, long long ldi, int nch, uint32_t* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int cpw = (nch + W - 1) / W;
  const int cnt = IL ? (nch - warp + W - 1) / W : max(0, min(cpw, nch - warp * cpw));
  auto chunk = [&](int j) { return IL ? warp + j * W : warp * cpw + j; };
  auto addr = [&](int c, int i) -> const uint8_t* {
    if (PAT == 1) return w + ((size_t)blockIdx.x * nch + c) * 1024 + i * 512 + lane * 16;
    if (PAT == 2) return w + ((size_t)blockIdx.x * nch + c) * (1024 * S) + i * 512 + lane * 16;
    const int e = i * 32 + lane, row = e / (4 * S), col = e % (4 * S);
    return w + (size_t)(blockIdx.x * 16 + row) * ldi + (size_t)c * 64 * S + col * 16;
  };
  uint4 buf[D][2 * S];
  uint32_t acc = 0;
#pragma unroll
  for (int s = 0; s < D; ++s)
    if (s < cnt)
#pragma unroll
      for (int i = 0; i < 2 * S; ++i) buf[s][i] = ld<LD>(addr(chunk(s), i));
  for (int j0 = 0; j0 < cnt; j0 += D) {
#pragma unroll
    for (int s = 0; s < D; ++s) {
      const int j = j0 + s;
      if (j < cnt) {
#pragma unroll
        for (int i = 0; i < 2 * S; ++i) acc ^= buf[s][i].x ^ buf[s][i].y ^ buf[s][i].z ^ buf[s][i].w;
        if (j + D < cnt)
#pragma unroll
          for (int i = 0; i < 2 * S; ++i) buf[s][i] = ld<LD>(addr(chunk(j + D), i));
      }
    }
  }
  out[blockIdx.x * W + warp] = acc;
}

#define CASES(X) X(0,1,4,false,0) X(0,1,4,true,0) X(0,1,4,false,1) X(0,1,4,true,1) X(0,1,4,false,2) X(0,1,4,false,3) \
  X(0,1,1,false,0) X(0,1,8,false,0) X(0,2,2,false,0) X(0,4,2,false,0) X(0,8,1,false,0) X(0,4,2,true,0) X(0,2,2,false,1) \
  X(1,1,4,false,0) X(1,1,4,true,0) X(2,1,4,false,0) X(2,2,4,false,0) X(2,1,4,false,1)

void probe_read(torch::Tensor w, int64_t ldi, int64_t nch, int64_t blocks, int64_t warps, torch::Tensor out,
          int64_t pat, int64_t s, int64_t d, bool il, int64_t ldk) {
  auto st = at::cuda::getCurrentCUDAStream();
  const uint8_t* p = w.data_ptr<uint8_t>();
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<int>());
#define X(PA, SS, DD, IL, LDK) \
  if (pat == PA && s == SS && d == DD && il == IL && ldk == LDK) { read_kernel<PA, SS, DD, IL, LDK><<<blocks, 32 * warps, 0, st>>>(p, ldi, nch, o); return; }
  CASES(X)
#undef X
  TORCH_CHECK(false, "no such case");
}

void set_l2_fetch(int64_t bytes) { cudaDeviceSetLimit(cudaLimitMaxL2FetchGranularity, (size_t)bytes); }
int64_t get_l2_fetch() { size_t v = 0; cudaDeviceGetLimit(&v, cudaLimitMaxL2FetchGranularity); return (int64_t)v; }
"""
CPP_SRC = """
void probe_read(torch::Tensor w, int64_t ldi, int64_t nch, int64_t blocks, int64_t warps, torch::Tensor out,
          int64_t pat, int64_t s, int64_t d, bool il, int64_t ldk);
void set_l2_fetch(int64_t bytes);
int64_t get_l2_fetch();
"""
CASES = [  # (pattern, S, D, interleaved, load flavour), as CASES in the CUDA source
    (0, 1, 4, False, 0), (0, 1, 4, True, 0), (0, 1, 4, False, 1), (0, 1, 4, True, 1), (0, 1, 4, False, 2), (0, 1, 4, False, 3),
    (0, 1, 1, False, 0), (0, 1, 8, False, 0), (0, 2, 2, False, 0), (0, 4, 2, False, 0), (0, 8, 1, False, 0), (0, 4, 2, True, 0),
    (0, 2, 2, False, 1), (1, 1, 4, False, 0), (1, 1, 4, True, 0), (2, 1, 4, False, 0), (2, 2, 4, False, 0), (2, 1, 4, False, 1),
]
PATTERNS = {0: "rows", 1: "tiled", 2: "flat"}
LOADS = {0: "nc", 1: "l2_256", 2: "cs", 3: "plain"}
SHAPES = [(4096, 14336), (14336, 4096), (2048, 7168)]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from torch.utils.cpp_extension import load_inline

    ext = load_inline("cq_read_probe", CPP_SRC, cuda_sources=CUDA_SRC, functions=["probe_read", "set_l2_fetch", "get_l2_fetch"],
                      extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"])
    bw = gpu_bandwidth()
    print("bandwidth", bw, "L2 fetch granularity", ext.get_l2_fetch(), flush=True)
    recs = []

    def rec(**kw):
        kw["gbps"] = round(kw["bytes"] / kw["us"] / 1e3, 1)
        kw["pct_bw"] = round(100 * kw["gbps"] / bw["read_gbps"], 1)
        recs.append(kw)
        print(json.dumps(kw), flush=True)

    for n, k in SHAPES:
        ldi = k // 2
        nbytes = n * ldi
        copies = copies_beyond(L2_BYTES, nbytes)
        ws = [torch.randint(0, 256, (n, ldi), dtype=torch.uint8, device="cuda") for _ in range(copies)]
        out = torch.empty(n // 16 * 16, dtype=torch.int32, device="cuda")
        for warps in (8, 16):
            for pat, s, d, il, ldk in CASES:
                if warps == 16 and (pat, s, d, il, ldk) not in ((0, 1, 4, False, 0), (0, 1, 4, True, 0), (0, 1, 4, True, 1)):
                    continue
                nch = (ldi // 64) // s if pat != 2 else nbytes // (1024 * s) // (n // 16)
                t = cuda_graph_us([lambda w=w: ext.probe_read(w, ldi, nch, n // 16, warps, out, pat, s, d, il, ldk) for w in ws])
                rec(probe="read", N=n, K=k, pattern=PATTERNS[pat], S=s, D=d, interleaved=il, load=LOADS[ldk], warps=warps,
                    bytes=nbytes, us=round(t, 3))
        for gran in (32, 128):  # the current pattern under other L2 fetch granularities
            ext.set_l2_fetch(gran)
            t = cuda_graph_us([lambda w=w: ext.probe_read(w, ldi, ldi // 64, n // 16, 8, out, 0, 1, 4, False, 0) for w in ws])
            rec(probe="read", N=n, K=k, pattern="rows", S=1, D=4, interleaved=False, load="nc", warps=8, bytes=nbytes,
                us=round(t, 3), l2_fetch=gran)
        ext.set_l2_fetch(64)
        flat16 = [w.view(torch.bfloat16) for w in ws]
        amax_out = torch.empty((), device="cuda", dtype=torch.bfloat16)
        rec(probe="torch.amax", N=n, K=k, bytes=nbytes, us=round(cuda_graph_us([lambda w=w: torch.amax(w, out=amax_out) for w in flat16]), 3))
        x = torch.randn(1, ldi // 2, device="cuda", dtype=torch.bfloat16)
        rec(probe="cublas_bf16_same_bytes", N=n, K=k, bytes=nbytes,
            us=round(cuda_graph_us([lambda w=w: F.linear(x, w.view(torch.bfloat16)) for w in ws]), 3))
        del ws, flat16
        lut_w = [random_packed((), n, k, "cuda") for _ in range(copies)]
        xk = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        wbytes = lut_w[0].indices.numel() + lut_w[0].codebook.numel() * 2
        for st in (2, 4):
            t = cuda_graph_us([lambda w=w: cuda_gemv.linear(xk, w, ActQuantSpec(bits=16), None, y, stages=st) for w in lut_w])
            rec(probe="decode_kernel", N=n, K=k, stages=st, bytes=wbytes, us=round(t, 3))
        del lut_w
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    json.dump({"bandwidth": bw, "device": torch.cuda.get_device_name(), "records": recs},
              open(os.path.join(a.out, "gpu-read-probe.json"), "w"), indent=1)
