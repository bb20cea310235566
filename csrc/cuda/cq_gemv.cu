// CodeQuant decode kernels (M = 1..16 rows of x per weight) on the packed format v1, for sm_80+
// (built for sm_90 on an H200): dense W4A16 / W4A4 GEMV and the per-expert GEMVs of a fused MoE.
//
// Layout read (src/codequant/format.py): indices uint8 [E?, N, KP/2], per 64-column block 32 bytes,
// byte j = column 64b+j (low nibble) | column 64b+32+j (high nibble); codebook fp16 [E?, N, NG, 16].
//
// Design (one warp = R 16-row tiles over a K range; the warps of a block split K):
// * Each lane loads 16 B of indices of row g and of row g+8 (g = lane/4) per 128-column chunk:
//   lane t = lane%4 takes bytes 16(t&1)..16(t&1)+15 of block 2c + (t>>1). One byte holds the
//   column pair (j, j+32); the pair is one 32-bit operand register of mma.m16n8k16, so the dot
//   product runs on tensor cores with K permuted identically for x ("pair words" below).
// * Lookup in registers: the row's 16 codebook entries (in the dot type) are kept as 4 words of low
//   bytes and 4 words of high bytes; per 4 indices 4 prmt look up entries idx&7 in both halves of the
//   table, 2 prmt select by bit 3, 2 prmt interleave low and high bytes (8 prmt per 4 weights).
// * Latency: a register ring of D chunks of indices in flight, x of the next chunk prefetched (M <= 8),
//   two independent accumulator sets (the 8 mma of a chunk form two chains of 4).
// * fp32 accumulation; split-K across the warps of a block, reduced in shared memory; the epilogue
//   applies the per-row x scale (W4A4: x enters as exact integer codes q - z), bias, SwiGLU or the
//   routing weight and scatter of a MoE.
// * WBF16: the same kernel reading dense bf16 weights [E, N, K] instead (MoE comparison variant).
// * I8 (W4A4): int8 copies of the codebooks (per-row scale) looked up by 3 prmt per 4 weights straight
//   into the int8 operand registers of mma.m16n8k32.s8 against int8 activation codes q - z; exact
//   integer dot products, the scales applied in the epilogue (about 1.4 instructions per weight
//   against 4.8 for the 16-bit lookup).
//
// x enters either straight from a 16-bit [M, K] tensor (paired in registers) or as pair words
// xp [rows, KP/2] (word 32b+j = (x[64b+j], x[64b+32+j])) written by prep_x_kernel, which also
// gathers the tokens of MoE slots and quantizes per row (W4A4) exactly like
// codequant.quantizers.activations.quantize_activations.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cq_gemv.h"

namespace cq {

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}

__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ld_x(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

struct Table {
  uint32_t l[4], h[4];
};

// 16 fp16 entries at p (32 B, 16-B aligned) -> byte tables in the dot type.
template <bool BF16>
__device__ __forceinline__ void load_table(Table& T, const __half* p) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
  uint4 a = __ldg(q), b = __ldg(q + 1);
  uint32_t c[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  if (BF16) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      __half2 h = *reinterpret_cast<__half2*>(&c[i]);
      float2 f = __half22float2(h);
      __nv_bfloat162 bb = __floats2bfloat162_rn(f.x, f.y);
      c[i] = *reinterpret_cast<uint32_t*>(&bb);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T.l[i] = prmt(c[2 * i], c[2 * i + 1], 0x6420);
    T.h[i] = prmt(c[2 * i], c[2 * i + 1], 0x7531);
  }
}

// Four nibbles (selector halves in the low 16 bits of w7 / sel) -> two pair words:
// o0 = (C[n0], C[n1]), o1 = (C[n2], C[n3]) with n0 in the low 16 bits.
__device__ __forceinline__ void lookup4(const Table& T, uint32_t w7, uint32_t sel, uint32_t& o0, uint32_t& o1) {
  uint32_t xl = prmt(T.l[0], T.l[1], w7);
  uint32_t yl = prmt(T.l[2], T.l[3], w7);
  uint32_t xh = prmt(T.h[0], T.h[1], w7);
  uint32_t yh = prmt(T.h[2], T.h[3], w7);
  uint32_t L = prmt(xl, yl, sel);
  uint32_t H = prmt(xh, yh, sel);
  o0 = prmt(L, H, 0x5140);
  o1 = prmt(L, H, 0x7362);
}

// One 32-bit word of indices (4 bytes) -> 4 pair words, pair i from byte i.
__device__ __forceinline__ void lookup8(const Table& T, uint32_t w, uint32_t* o) {
  uint32_t w7 = w & 0x77777777u;
  uint32_t sel = ((w >> 1) & 0x44444444u) | 0x32103210u;
  lookup4(T, w7, sel, o[0], o[1]);
  lookup4(T, w7 >> 16, sel >> 16, o[2], o[3]);
}

// 8 words of 16-bit values at columns c..c+15 (lo) and c+32..c+47 (hi) -> 16 pair words.
__device__ __forceinline__ void pair16(const uint4& l0, const uint4& l1, const uint4& h0, const uint4& h1, uint32_t* o) {
  const uint32_t lw[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
  const uint32_t hw[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
  for (int v = 0; v < 8; ++v) {
    o[2 * v] = prmt(lw[v], hw[v], 0x5410);
    o[2 * v + 1] = prmt(lw[v], hw[v], 0x7632);
  }
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  if (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void imma16832(int* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One word of indices (4 bytes, 8 nibbles) -> two words of int8 entries from a 16-byte table t:
// o0 = (C[b0 lo], C[b0 hi], C[b1 lo], C[b1 hi]), o1 likewise for bytes 2 and 3 (3 prmt per 4 weights).
__device__ __forceinline__ void lookup8_i8(const uint32_t* t, uint32_t w, uint32_t& o0, uint32_t& o1) {
  const uint32_t w7 = w & 0x77777777u;
  const uint32_t sel = ((w >> 1) & 0x44444444u) | 0x32103210u;
  o0 = prmt(prmt(t[0], t[1], w7), prmt(t[2], t[3], w7), sel);
  const uint32_t w7h = w7 >> 16, selh = sel >> 16;
  o1 = prmt(prmt(t[0], t[1], w7h), prmt(t[2], t[3], w7h), selh);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int u) { return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w; }

__device__ __forceinline__ void store_out(void* y, size_t i, int otype, float v) {
  if (otype == 0)
    reinterpret_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v);
  else if (otype == 1)
    reinterpret_cast<__half*>(y)[i] = __float2half_rn(v);
  else
    reinterpret_cast<float*>(y)[i] = v;
}

__device__ __forceinline__ float load_in(const void* x, size_t i, int itype) {
  if (itype == 0) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(x)[i]);
  if (itype == 1) return __half2float(reinterpret_cast<const __half*>(x)[i]);
  return reinterpret_cast<const float*>(x)[i];
}

__device__ __forceinline__ uint32_t pack2(float a, float b, bool bf16) {
  uint32_t r;
  if (bf16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    r = *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(a, b);
    r = *reinterpret_cast<uint32_t*>(&v);
  }
  return r;
}

// ---------------------------------------------------------------------------------------- prologue

// One block per output row r of xp [rows, KP/2]: source row src(r) of x (the token of MoE slot
// rows[r] when rows is given, none for padding slots), paired, in bf16 or fp16; with quant, the
// row is quantized per token (bits, clip) and the pair words hold the exact codes q - z (fp16)
// and xscale[r] = s.
__global__ void prep_x_kernel(const PrepParams p) {
  const int r = blockIdx.x;
  int src = r;
  if (p.rows != nullptr) src = p.rows[r] < p.nslots ? (p.topk > 0 ? p.rows[r] / p.topk : r) : -1;
  const int half = p.KP >> 1;
  uint32_t* out = p.xp + (size_t)r * (p.i8 ? half / 2 : half);
  if (src < 0) {
    for (int i = threadIdx.x; i < (p.i8 ? half / 2 : half); i += blockDim.x) out[i] = 0u;
    if (p.quant && threadIdx.x == 0) p.xscale[r] = 0.f;
    return;
  }
  const void* x = p.x;
  const size_t base = (size_t)src * p.ldx;
  float scale = 1.f, zero = 0.f;
  const float qmax = (float)((1 << p.bits) - 1);
  if (p.quant) {
    __shared__ float smin[32], smax[32];
    float lo = 0.f, hi = 0.f;  // the clamps at 0 of the reference are the initial values
    for (int i = threadIdx.x; i < p.K; i += blockDim.x) {
      const float v = load_in(x, base + i, p.itype);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if ((threadIdx.x & 31) == 0) {
      smin[threadIdx.x >> 5] = lo;
      smax[threadIdx.x >> 5] = hi;
    }
    __syncthreads();
    lo = smin[0];
    hi = smax[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
      lo = fminf(lo, smin[w]);
      hi = fmaxf(hi, smax[w]);
    }
    hi = __fmul_rn(hi, p.clip);
    lo = __fmul_rn(lo, p.clip);
    scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), 1e-8f);
    zero = rintf(__fdiv_rn(-lo, scale));
    if (threadIdx.x == 0) p.xscale[r] = scale;
  }
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const int c0 = ((i >> 5) << 6) + (i & 31), c1 = c0 + 32;
    float v0 = c0 < p.K ? load_in(x, base + c0, p.itype) : 0.f;
    float v1 = c1 < p.K ? load_in(x, base + c1, p.itype) : 0.f;
    if (p.quant) {
      v0 = c0 < p.K ? fminf(fmaxf(rintf(__fdiv_rn(v0, scale)) + zero, 0.f), qmax) - zero : 0.f;
      v1 = c1 < p.K ? fminf(fmaxf(rintf(__fdiv_rn(v1, scale)) + zero, 0.f), qmax) - zero : 0.f;
    }
    if (p.i8)
      reinterpret_cast<uint16_t*>(p.xp)[(size_t)r * half + i] =
          (uint16_t)(uint8_t)(int8_t)v0 | ((uint16_t)(uint8_t)(int8_t)v1 << 8);
    else
      out[i] = pack2(v0, v1, p.bf16);
  }
}

// ---------------------------------------------------------------------------------------- GEMV

// R: 16-row tiles per warp (and block); NT: n8 token tiles (rows of x: M <= 8 * NT);
// BF16: dot type (else fp16); WBF16: dense bf16 weights instead of the lookup;
// V: latency variant, (chunks of weights in flight, x prefetched) = (1, no) (2, no) (4, yes):
// deeper rings hide more latency per warp but take registers, i.e. resident warps (V = 0 with
// NT = 1 is held to 64 registers: 32 warps per SM).
template <int V> struct Variant;
template <> struct Variant<0> { static constexpr int D = 1; static constexpr bool XPF = false; };
template <> struct Variant<1> { static constexpr int D = 2; static constexpr bool XPF = false; };
template <> struct Variant<2> { static constexpr int D = 4; static constexpr bool XPF = true; };

template <int R, int NT, bool BF16, bool WBF16, int V, bool I8>
__global__ void __launch_bounds__(R == 2 ? 256 : 512, (V == 0 && NT == 1 && !WBF16) ? 2 : 1) gemv_kernel(const GemvParams p) {
  extern __shared__ float red[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  int M = p.M;
  size_t row0 = 0;  // first x / output row of this block
  const uint8_t* idx = p.idx;
  const __half* cb = p.cb;
  const int8_t* cb8 = p.cb8;
  const float* wscale = p.wscale;
  const __nv_bfloat16* wd = p.wd;
  if (p.bexp != nullptr) {  // MoE: block y holds up to bm slots of expert bexp[y]
    const int e = p.bexp[blockIdx.y];
    if (e < 0) return;
    idx += (size_t)e * p.idx_es;
    cb += (size_t)e * p.cb_es;
    cb8 += (size_t)e * p.cb_es;
    wscale += (size_t)e * p.N;
    wd += (size_t)e * p.wd_es;
    row0 = (size_t)blockIdx.y * p.bm;
    M = p.bm;
  }
  const bool swiglu = p.epi == EPI_SWIGLU;
  const int tile_rows = swiglu ? 16 : 16 * R;
  const int n0 = blockIdx.x * tile_rows;
  const int ldi = p.KP >> 1, nblk = p.KP >> 6, nch = (nblk + 1) >> 1;
  const int c_begin = warp * p.cpw;
  const int c_end = min(c_begin + p.cpw, nch);
  const int boff = t >> 1, hoff = (t & 1) * 16;

  // indices of chunk cc of row n at rp + cc * cstride: the saved layout (rows of KP/2 bytes) or the
  // tiled copy [N/16][nch][16 rows][64 B], where a warp's load of 16 rows is 1 KB of contiguous memory
  int rown[R][2];
  const uint8_t* rp[R][2];
  const __nv_bfloat16* dp[R][2];
  const size_t cstride = p.tiled ? 1024 : 64;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = swiglu ? r * p.inter + n0 + 8 * h + g : n0 + 16 * r + 8 * h + g;
      rown[r][h] = min(n, p.N - 1);
      rp[r][h] = p.tiled ? idx + ((size_t)(rown[r][h] >> 4) * nch * 16 + (rown[r][h] & 15)) * 64 + 16 * t
                         : idx + (size_t)rown[r][h] * ldi + boff * 32 + hoff;
      dp[r][h] = wd + (size_t)rown[r][h] * p.K + hoff;
    }

  float acc[I8 ? 1 : 2][R][NT][4];
  int iacc[I8 ? 2 : 1][R][NT][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (I8) iacc[a & (I8 ? 1 : 0)][r][nt][i] = 0;
          else acc[a & (I8 ? 0 : 1)][r][nt][i] = 0.f;
        }

  Table tab[(WBF16 || I8) ? 1 : R][2];
  uint32_t t8[I8 ? R : 1][2][4];  // int8 tables (16 entries in 4 words)
  auto load_tables = [&](int gi) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const size_t off = ((size_t)rown[r][h] * p.NG + gi) * 16;
        if (I8) {
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(cb8 + off));
          t8[I8 ? r : 0][h][0] = v.x;
          t8[I8 ? r : 0][h][1] = v.y;
          t8[I8 ? r : 0][h][2] = v.z;
          t8[I8 ? r : 0][h][3] = v.w;
        } else if (!WBF16) {
          load_table<BF16>(tab[(WBF16 || I8) ? 0 : r][h], cb + off);
        }
      }
  };
  const bool grouped = p.NG > 1;
  int cur_g = -1;
  if (!WBF16 && !grouped) load_tables(0);

  // weights: D chunks in flight per warp (register ring, slots known at compile time)
  constexpr int WV = WBF16 ? 4 : 1;  // uint4 per row half per chunk
  constexpr int D = WBF16 ? 1 : Variant<V>::D;
  uint4 wb[D][R][2][WV];
  auto load_w = [&](uint4 (&dst)[R][2][WV], int cc) {
    const int b = 2 * cc + boff;
    const bool ok = cc < c_end && b < nblk;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (WBF16) {
          const __nv_bfloat16* q = dp[r][h] + (size_t)b * 64;
          dst[r][h][0] = ok ? ld_stream(q) : make_uint4(0, 0, 0, 0);
          dst[r][h][WV > 1 ? 1 : 0] = ok ? ld_stream(q + 8) : make_uint4(0, 0, 0, 0);
          dst[r][h][WV > 2 ? 2 : 0] = ok ? ld_stream(q + 32) : make_uint4(0, 0, 0, 0);
          dst[r][h][WV > 3 ? 3 : 0] = ok ? ld_stream(q + 40) : make_uint4(0, 0, 0, 0);
        } else {
          dst[r][h][0] = ok ? ld_stream(rp[r][h] + cc * cstride) : make_uint4(0, 0, 0, 0);
        }
      }
  };

  // x: raw loads of one chunk (4 uint4 per token tile); prefetched one chunk ahead when NT == 1
  constexpr bool XPF = NT == 1 && Variant<V>::XPF;
  const bool xdirect = p.xs != nullptr;
  uint4 xr[XPF ? 2 : 1][NT][4];
  auto load_x = [&](uint4 (&dst)[NT][4], int cc) {
    const int blk = 2 * cc + boff;
    const bool ok = cc < c_end && blk < nblk;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = nt * 8 + g;
      if (ok && m < M) {
        if (xdirect) {
          const uint16_t* q = p.xs + (row0 + m) * (size_t)p.ldx + blk * 64 + hoff;
          dst[nt][0] = ld_x(q);
          dst[nt][1] = ld_x(q + 8);
          dst[nt][2] = ld_x(q + 32);
          dst[nt][3] = ld_x(q + 40);
        } else if (I8) {  // int8 codes: 16 pairs of bytes = 2 uint4
          const uint32_t* q = p.xp + (row0 + m) * (size_t)(ldi >> 1) + blk * 16 + (hoff >> 1);
          dst[nt][0] = ld_x(q);
          dst[nt][1] = ld_x(q + 4);
        } else {
          const uint32_t* q = p.xp + (row0 + m) * (size_t)ldi + blk * 32 + hoff;
#pragma unroll
          for (int v = 0; v < 4; ++v) dst[nt][v] = ld_x(q + 4 * v);
        }
      } else {
#pragma unroll
        for (int v = 0; v < 4; ++v) dst[nt][v] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  auto compute = [&](const uint4 (&wc)[R][2][WV], const uint4 (&xc)[NT][4], int c) {
    if (!WBF16 && grouped) {
      const int gi = min(((2 * c + boff) * 64) / p.G, p.NG - 1);
      if (gi != cur_g) {
        cur_g = gi;
        load_tables(gi);
      }
    }
    if constexpr (I8) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        uint32_t a[R][2][2];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int h = 0; h < 2; ++h) lookup8_i8(t8[I8 ? r : 0][h], word(wc[r][h][0], u), a[r][h][0], a[r][h][1]);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            imma16832(iacc[u & (I8 ? 1 : 0)][r][nt], a[r][0][0], a[r][1][0], a[r][0][1], a[r][1][1], word(xc[nt][u >> 1], 2 * (u & 1)),
                      word(xc[nt][u >> 1], 2 * (u & 1) + 1));
      }
    } else {
    uint32_t xb[NT][16];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (xdirect) {
        pair16(xc[nt][0], xc[nt][1], xc[nt][2], xc[nt][3], xb[nt]);
      } else {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          xb[nt][4 * v] = xc[nt][v].x;
          xb[nt][4 * v + 1] = xc[nt][v].y;
          xb[nt][4 * v + 2] = xc[nt][v].z;
          xb[nt][4 * v + 3] = xc[nt][v].w;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t pw[R][2][4];  // pair words of the weights from bytes 4u..4u+3
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (WBF16) {
            const uint4& lo = wc[r][h][u >> 1];
            const uint4& hi = wc[r][h][WV > 2 ? 2 + (u >> 1) : 0];
            const uint32_t l0 = (u & 1) ? lo.z : lo.x, l1 = (u & 1) ? lo.w : lo.y;
            const uint32_t h0 = (u & 1) ? hi.z : hi.x, h1 = (u & 1) ? hi.w : hi.y;
            pw[r][h][0] = prmt(l0, h0, 0x5410);
            pw[r][h][1] = prmt(l0, h0, 0x7632);
            pw[r][h][2] = prmt(l1, h1, 0x5410);
            pw[r][h][3] = prmt(l1, h1, 0x7632);
          } else {
            lookup8(tab[(WBF16 || I8) ? 0 : r][h], word(wc[r][h][0], u), pw[r][h]);
          }
        }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int q = 2 * u + hh;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma16816<BF16>(acc[hh & (I8 ? 0 : 1)][r][nt], pw[r][0][2 * hh], pw[r][1][2 * hh], pw[r][0][2 * hh + 1], pw[r][1][2 * hh + 1],
                           xb[nt][2 * q], xb[nt][2 * q + 1]);
      }
    }
    }
  };

#pragma unroll
  for (int s = 0; s < D; ++s) load_w(wb[s], c_begin + s);
  if (XPF) load_x(xr[0], c_begin);
  for (int c0 = c_begin; c0 < c_end; c0 += D) {
#pragma unroll
    for (int s = 0; s < D; ++s) {
      const int c = c0 + s;
      if (c < c_end) {
        if (XPF) {
          load_x(xr[(s + 1) & 1], c + 1);
          compute(wb[s], xr[s & 1], c);
        } else {
          load_x(xr[0], c);
          compute(wb[s], xr[0], c);
        }
        load_w(wb[s], c + D);
      }
    }
  }

  // accumulators: c0 (row g, token 2t), c1 (row g, 2t+1), c2 (row g+8, 2t), c3 (row g+8, 2t+1)
  constexpr int TOK = NT * 8;
  float* rw = red + warp * (R * 16 * TOK);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int tok = nt * 8 + 2 * t;
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        v[i] = I8 ? (float)(iacc[0][r][nt][i] + iacc[I8 ? 1 : 0][r][nt][i]) : acc[0][r][nt][i] + acc[I8 ? 0 : 1][r][nt][i];
      rw[(r * 16 + g) * TOK + tok] = v[0];
      rw[(r * 16 + g) * TOK + tok + 1] = v[1];
      rw[(r * 16 + g + 8) * TOK + tok] = v[2];
      rw[(r * 16 + g + 8) * TOK + tok + 1] = v[3];
    }
  __syncthreads();
  const int out_rows = swiglu ? 16 : R * 16;
  const int n_lim = swiglu ? p.inter : p.N;
  for (int i = threadIdx.x; i < out_rows * M; i += blockDim.x) {
    const int row = i % out_rows, m = i / out_rows;
    const int n = n0 + row;
    if (n >= n_lim) continue;
    const size_t xrow = row0 + m;
    int slot = 0;
    if (p.rows != nullptr) {
      slot = p.rows[xrow];
      if (slot >= p.nslots) continue;
    }
    const float xs = p.xscale != nullptr ? p.xscale[xrow] : 1.f;
    float s = 0.f;
    for (int w = 0; w < W; ++w) s += red[w * (R * 16 * TOK) + row * TOK + m];
    s *= xs;
    if (I8) s *= wscale[n];
    if (swiglu) {
      float u = 0.f;
      for (int w = 0; w < W; ++w) u += red[w * (R * 16 * TOK) + (16 + row) * TOK + m];
      u *= xs;
      if (I8) u *= wscale[p.inter + n];
      s = s / (1.f + expf(-s)) * u;
      store_out(p.y, xrow * p.ldy + n, p.otype, s);
    } else if (p.epi == EPI_SCATTER) {
      store_out(p.y, (size_t)slot * p.ldy + n, p.otype, s * p.rw[slot]);
    } else {
      if (p.bias != nullptr) s += p.bias[n];
      store_out(p.y, xrow * p.ldy + n, p.otype, s);
    }
  }
}

template <int R, int NT, bool BF16, bool WBF16, int V, bool I8>
static cudaError_t launch(GemvParams p, int W, int blocks_y, cudaStream_t st) {
  const int nch = ((p.KP >> 6) + 1) >> 1;
  if (R == 2 && W > 8) W = 8;
  if (W > nch) W = nch < 1 ? 1 : nch;
  p.cpw = (nch + W - 1) / W;
  const int tile_rows = p.epi == EPI_SWIGLU ? 16 : 16 * R;
  const int rows = p.epi == EPI_SWIGLU ? p.inter : p.N;
  const dim3 grid((rows + tile_rows - 1) / tile_rows, blocks_y);
  const size_t smem = (size_t)W * R * 16 * NT * 8 * sizeof(float);
  gemv_kernel<R, NT, BF16, WBF16, V, I8><<<grid, 32 * W, smem, st>>>(p);
  return cudaGetLastError();
}

}  // namespace cq

int cq_prep_x(const PrepParams& p, int rows_out, cudaStream_t st) {
  if (rows_out <= 0) return 0;
  cq::prep_x_kernel<<<rows_out, 256, 0, st>>>(p);
  return (int)cudaGetLastError();
}

int cq_gemv(const GemvParams& p, int R, int W, int bf16_dot, int variant, int blocks_y, cudaStream_t st) {
  using namespace cq;
  const int nt = p.M <= 8 ? 1 : 2;
  if (p.M < 1 || p.M > 16 || (R != 1 && R != 2) || W < 1 || W > 16 || (p.NG > 1 && p.G % 64)) return (int)cudaErrorInvalidValue;
  if (p.epi == EPI_SWIGLU && R != 2) return (int)cudaErrorInvalidValue;
  if (p.wd != nullptr && (!bf16_dot || p.K % 64)) return (int)cudaErrorInvalidValue;
  const bool wbf16 = p.wd != nullptr, i8 = p.cb8 != nullptr;
  if (wbf16 || (i8 && variant > 1)) variant = 0;
#define CQ_CASE(RR, NTT, BF, WB, VV, I8_)                                                                \
  if (R == RR && nt == NTT && (bool)bf16_dot == BF && wbf16 == WB && variant == VV && i8 == I8_) \
    return (int)launch<RR, NTT, BF, WB, VV, I8_>(p, W, blocks_y, st);
#define CQ_V(RR, NTT, BF) \
  CQ_CASE(RR, NTT, BF, false, 0, false) CQ_CASE(RR, NTT, BF, false, 1, false) CQ_CASE(RR, NTT, BF, false, 2, false)
  CQ_V(1, 1, true) CQ_V(1, 2, true) CQ_V(2, 1, true) CQ_V(2, 2, true)
  CQ_V(1, 1, false) CQ_V(1, 2, false) CQ_V(2, 1, false) CQ_V(2, 2, false)
  CQ_CASE(1, 1, true, true, 0, false) CQ_CASE(1, 2, true, true, 0, false)
  CQ_CASE(2, 1, true, true, 0, false) CQ_CASE(2, 2, true, true, 0, false)
  CQ_CASE(1, 1, false, false, 0, true) CQ_CASE(1, 2, false, false, 0, true)
  CQ_CASE(2, 1, false, false, 0, true) CQ_CASE(2, 2, false, false, 0, true)
  CQ_CASE(1, 1, false, false, 1, true) CQ_CASE(1, 2, false, false, 1, true)
  CQ_CASE(2, 1, false, false, 1, true) CQ_CASE(2, 2, false, false, 1, true)
#undef CQ_V
#undef CQ_CASE
  return (int)cudaErrorInvalidValue;
}
