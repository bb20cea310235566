// CodeQuant decode kernels (M = 1..16 rows of x per weight) on the packed format v1, for sm_80+
// (built for sm_90 on an H200): dense W4A16 / W4A4 GEMV and the per-expert GEMVs of a fused MoE.
//
// Layout read (src/codequant/core/format.py): indices uint8 [E?, N, KP/2], per 64-column block 32 bytes,
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
// * SL (dense rows of K >= 8192, M <= 8): the lookup reads a 256-entry table of pair words
//   (C[b & 15], C[b >> 4]) per row in shared memory, one copy per lane (bank = lane): one LDS and
//   two ALU ops per index byte instead of 4 prmt + 1.25 ALU; the tables (64 KB per 16 rows) are built
//   once per block, which pays only on long rows.
// * Latency: each warp streams its chunks (weights and the matching x) through a private ring of D
//   stages in shared memory filled by cp.async, so D - 1 chunks are in flight while one is computed,
//   without holding registers (a register ring of the same depth measured no faster than depth 1:
//   benchmarks/notes-gpu.md); two independent accumulator sets (the 8 mma of a chunk form two chains).
// * fp32 accumulation; split-K across the warps of a block, reduced in shared memory; the epilogue
//   applies the per-row x scale (W4A4: x enters as exact integer codes q - z), bias, SwiGLU or the
//   routing weight and scatter of a MoE.
// * WBF16: the same kernel reading dense bf16 weights [E, N, K] instead (MoE comparison variant).
// * I8 (W4A4): int8 copies of the codebooks (per-row scale) looked up by 3 prmt per 4 weights straight
//   into the int8 operand registers of mma.m16n8k32.s8 against int8 activation codes q - z; exact
//   integer dot products, the scales applied in the epilogue (about 1.4 instructions per weight
//   against 4.8 for the 16-bit lookup).
// * MoE: blocks of bm x rows of one expert (slots grouped by moe_align_kernel), or with few slots one
//   block per (token, k) slot with its expert read from the router's indices; topk_sum_kernel sums
//   each token's slots.
// * PDL (sm_90): every kernel lets the next launch start early (a dense GEMV after its main loop),
//   and the GEMVs, prologues and top-k sums are launched with the PDL attribute (safe after any
//   kernel: nothing the previous launches write is read before the wait). A GEMV fetches its first
//   weight chunks and codebooks, then waits for the previous launch (which wrote its x) before
//   copying x; a MoE gate_up whose experts come from the router's indices, the prologues and the
//   top-k sum wait first, so only the launch latency overlaps.
//
// x enters either straight from a 16-bit [M, K] tensor (paired in registers; for a MoE, the token
// of each slot) or as pair words xp [rows, KP/2] (word 32b+j = (x[64b+j], x[64b+32+j])) written
// by prep_x_kernel, which also gathers the tokens of MoE slots and quantizes per row (W4A4)
// exactly like codequant.core.activations.quantize_activations.
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

// 16 B global -> shared, asynchronous, through L2 only (weights: read once) or L1 too (x: read by
// every block of the same rows); ok = false writes zeros and reads nothing.
template <bool L1 = false>
__device__ __forceinline__ void cp_async16(uint4* dst, const void* src, bool ok) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  if (L1)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(ok ? 16 : 0));
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

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

// One word of indices -> 4 pair words from a 256-entry table of pair words in shared memory,
// t[b * 32] = (C[b & 15], C[b >> 4]) (this lane's copy: one bank per lane, no conflicts).
__device__ __forceinline__ void lookup8_smem(const uint32_t* t, uint32_t w, uint32_t* o) {
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = t[((w >> (8 * i)) & 0xFFu) << 5];
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

// Programmatic dependent launch (sm_90): a kernel lets the next launch start early; one launched with
// the PDL attribute waits here until the previous launch has finished and its writes are visible.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
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

// 8 values of x row `base` from column c (c % 8 == 0), zeros from column K on: one 16-byte load
// (two for fp32) when vec (row starts 16-byte aligned), else element by element.
__device__ __forceinline__ void load8(const void* x, size_t base, int c, int K, int itype, bool vec, float* v) {
  if (vec && c + 8 <= K) {
    if (itype == 2) {
      const float4* q = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + base + c);
      const float4 a = q[0], b = q[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      const uint4 q = *reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(x) + base + c);
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = itype == 0 ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]))
                                    : __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = c + j < K ? load_in(x, base + c + j, itype) : 0.f;
  }
}

// Prologue threads per row: one unit of 8 pair words each (in registers) up to KP = 16 * 1024, so
// that rows up to that length are read once with all loads in flight together; longer rows are read
// a second time (the earlier kernel read every row twice, element by element, in a loop: H200, 3.9 us
// at K = 768 plus 0.3 us per 1024 columns, against 3.6 plus 0.2 now; benchmarks/notes-gpu.md).
constexpr int PREP_THREADS = 1024;

// One block per output row r of xp [rows, KP/2]: source row src(r) of x (MoE, nslots > 0: the token
// of slot rows[r], or of slot r without rows; none for padding slots), paired, in bf16 or fp16; with
// quant, the row is quantized per token (bits, clip) and the pair words hold the exact codes q - z
// (fp16) and xscale[r] = s. Thread unit u = pair words 8u..8u+7 = columns c0..c0+7 and c0+32..c0+39,
// c0 = 64 (u / 4) + 8 (u % 4), thread i holding unit i: loaded, reduced to the row's min / max and
// written from registers. With hblock, the row first goes to shared memory (fp32, KP floats of dynamic
// shared memory) and through the fast Walsh-Hadamard transform of each hblock run: log2(hblock)
// butterfly stages (a, b) -> (a + b, a - b) over all threads, then the units are read from there
// times 1 / sqrt(hblock) (the online Hadamard before a down or o projection, without launches of its own).
__global__ void __launch_bounds__(PREP_THREADS) prep_x_kernel(const PrepParams p) {
  launch_dependents();
  grid_dependency_wait();  // (returns at once unless launched with PDL)
  const int r = blockIdx.x;
  int src = r;
  if (p.nslots > 0) {
    const int slot = p.rows != nullptr ? p.rows[r] : r;
    src = slot < p.nslots ? (p.topk > 0 ? slot / p.topk : r) : -1;
  }
  const int half = p.KP >> 1, units = p.KP >> 4, nth = blockDim.x;
  uint32_t* out = p.xp + (size_t)r * (p.i8 ? half / 2 : half);
  if (src < 0) {
    for (int i = threadIdx.x; i < (p.i8 ? half / 2 : half); i += nth) out[i] = 0u;
    if (p.quant && threadIdx.x == 0) p.xscale[r] = 0.f;
    return;
  }
  const size_t base = (size_t)src * p.ldx;
  const bool vec = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && p.ldx % (p.itype == 2 ? 4 : 8) == 0;
  auto col0 = [](int u) { return ((u >> 2) << 6) + ((u & 3) << 3); };
  extern __shared__ float hrow[];  // [KP] with hblock
  const float hscale = p.hblock > 0 ? rsqrtf((float)p.hblock) : 1.f;
  auto load_unit = [&](int u, float* v) {
    if (p.hblock > 0) {
      const int c0 = col0(u);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[i] = hrow[c0 + i] * hscale;
        v[8 + i] = hrow[c0 + 32 + i] * hscale;
      }
    } else {
      load8(p.x, base, col0(u), p.K, p.itype, vec, v);
      load8(p.x, base, col0(u) + 32, p.K, p.itype, vec, v + 8);
    }
  };
  if (p.hblock > 0) {
    for (int c = threadIdx.x * 8; c < p.KP; c += nth * 8) load8(p.x, base, c, p.K, p.itype, vec, hrow + c);
    __syncthreads();
    for (int h = 1; h < p.hblock; h <<= 1) {  // pairs (i, i + h) inside each run of 2h columns
      for (int q = threadIdx.x; q < p.K / 2; q += nth) {
        const int i = (q / h) * 2 * h + q % h;
        const float a = hrow[i], b = hrow[i + h];
        hrow[i] = a + b;
        hrow[i + h] = a - b;
      }
      __syncthreads();
    }
  }
  float v[16];  // this thread's unit threadIdx.x
  if (threadIdx.x < units) {
    load_unit(threadIdx.x, v);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = 0.f;
  }
  float scale = 1.f, zero = 0.f;
  const float qmax = (float)((1 << p.bits) - 1);
  if (p.quant) {
    __shared__ float smin[32], smax[32];
    float lo = 0.f, hi = 0.f;  // the clamps at 0 of the reference are the initial values
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      lo = fminf(lo, v[i]);
      hi = fmaxf(hi, v[i]);
    }
    for (int u = threadIdx.x + nth; u < units; u += nth) {
      float t[16];
      load_unit(u, t);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        lo = fminf(lo, t[i]);
        hi = fmaxf(hi, t[i]);
      }
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
    for (int w = 1; w < (nth >> 5); ++w) {
      lo = fminf(lo, smin[w]);
      hi = fmaxf(hi, smax[w]);
    }
    hi = __fmul_rn(hi, p.clip);
    lo = __fmul_rn(lo, p.clip);
    scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), 1e-8f);
    zero = rintf(__fdiv_rn(-lo, scale));
    if (threadIdx.x == 0) p.xscale[r] = scale;
  }
  // unit u of the row -> xp: 8 pair words (two 16-byte stores) or 8 pairs of int8 codes (one)
  auto store_unit = [&](int u, float* v) {
    const int c0 = col0(u);
    if (p.quant) {
#pragma unroll
      for (int i = 0; i < 16; ++i)
        v[i] = c0 + (i & 7) + (i >> 3) * 32 < p.K ? fminf(fmaxf(rintf(__fdiv_rn(v[i], scale)) + zero, 0.f), qmax) - zero : 0.f;
    }
    uint32_t w[8];
    if (p.i8) {
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] = (uint32_t)(uint8_t)(int8_t)v[j] | ((uint32_t)(uint8_t)(int8_t)v[8 + j] << 8);
      *reinterpret_cast<uint4*>(reinterpret_cast<uint16_t*>(p.xp) + (size_t)r * half + 8 * u) =
          make_uint4(w[0] | w[1] << 16, w[2] | w[3] << 16, w[4] | w[5] << 16, w[6] | w[7] << 16);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] = pack2(v[j], v[8 + j], p.bf16);
      uint4* o = reinterpret_cast<uint4*>(out + 8 * u);
      o[0] = make_uint4(w[0], w[1], w[2], w[3]);
      o[1] = make_uint4(w[4], w[5], w[6], w[7]);
    }
  };
  if (threadIdx.x < units) store_unit(threadIdx.x, v);
  for (int u = threadIdx.x + nth; u < units; u += nth) {
    float t[16];
    load_unit(u, t);
    store_unit(u, t);
  }
}

// ---------------------------------------------------------------------------------------- GEMV

// R: 16-row tiles per warp (and block); NT: n8 token tiles (rows of x: M <= 8 * NT);
// BF16: dot type (else fp16); WBF16: dense bf16 weights instead of the lookup; D: ring stages;
// I8: int8 codebooks and codes.
template <int R, int NT, bool WBF16> struct Stage {
  static constexpr int WV = WBF16 ? 4 : 1;        // uint4 per lane per row half of a chunk
  static constexpr int W_U4 = R * 2 * WV;         // weights
  static constexpr int U4 = W_U4 + NT * 4;        // + x (4 uint4 per token tile at most)
};

// SL: pair-word tables in shared memory (dense, per-row codebooks) instead of the register lookup,
// [R][2 halves][256 bytes][32 lanes] words ahead of the ring.
__host__ __device__ constexpr size_t pair_table_bytes(int R) { return (size_t)R * 2 * 256 * 32 * 4; }

template <int R, int NT, bool BF16, bool WBF16, int D, bool I8, bool SL>
__global__ void __launch_bounds__(R == 2 ? 256 : 512, 1) gemv_kernel(const GemvParams p) {
  extern __shared__ uint4 smem[];
  // a MoE grid runs in waves: the next launch may start once its last wave has started; a dense
  // grid starts all its blocks at once, so it triggers after its main loop (below): an early trigger
  // put the next launch's blocks beside ours for the whole run (0.7-1.0x on small shapes, H200)
  const bool moe = p.bexp != nullptr;
  if (moe) launch_dependents();
  if (p.pdl == 2) grid_dependency_wait();
  const bool prefetch = p.pdl == 1;  // weights before the wait, x after
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  int M = p.M;
  size_t row0 = 0;  // first x / output row of this block
  const uint8_t* idx = p.idx;
  const __half* cb = p.cb;
  const int8_t* cb8 = p.cb8;
  const float* wscale = p.wscale;
  const __nv_bfloat16* wd = p.wd;
  if (moe) {  // MoE: block y holds up to bm slots of expert bexp[y]
    const int e = p.bexp64 ? (int)reinterpret_cast<const long long*>(p.bexp)[blockIdx.y] : reinterpret_cast<const int*>(p.bexp)[blockIdx.y];
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

  // this lane's 16 B of the indices of chunk cc of row n: rp + 64 cc (rows of KP/2 bytes)
  int rown[R][2];
  const uint8_t* rp[R][2];
  const __nv_bfloat16* dp[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = swiglu ? r * p.inter + n0 + 8 * h + g : n0 + 16 * r + 8 * h + g;
      rown[r][h] = min(n, p.N - 1);
      rp[r][h] = idx + (size_t)rown[r][h] * ldi + boff * 32 + hoff;
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
  uint32_t* ptab = reinterpret_cast<uint32_t*>(smem);
  // ring slot j of stage st of this lane: uint4 smem[((warp * D + st) * U4 + j) * 32 + lane]
  using S = Stage<R, NT, WBF16>;
  constexpr int WV = S::WV;
  uint4* ring = smem + (SL ? pair_table_bytes(R) / 16 : 0) + (size_t)warp * D * S::U4 * 32 + lane;
  const bool xdirect = p.xs != nullptr;
  auto slot_of = [&](size_t xrow) { return p.rows != nullptr ? p.rows[xrow] : (int)xrow; };
  bool xrow_ok[NT];  // x row of this lane's token in tile nt exists (MoE: and is not a padding slot, all zeros)
  const uint16_t* xsrc[NT];  // raw x: the row it reads (MoE with xtopk: the slot's token)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = nt * 8 + g;
    const int slot = m < M && moe ? slot_of(row0 + m) : 0;
    xrow_ok[nt] = m < M && (!moe || slot < p.nslots);
    const size_t src = p.xtopk > 0 ? (size_t)(slot / p.xtopk) : row0 + m;
    xsrc[nt] = xdirect && xrow_ok[nt] ? p.xs + src * (size_t)p.ldx : p.xs;
  }
  // start the copies of chunk cc (weights and / or x of each token tile) into stage st, zeros past
  // the last 64-column block (nothing past this warp's range)
  auto issue = [&](int cc, int st, bool with_w, bool with_x) {
    uint4* sl = ring + st * S::U4 * 32;
    const int b = 2 * cc + boff;
    const bool ok = b < nblk;
    if (cc < c_end) {
#pragma unroll
      for (int r = 0; r < R && with_w; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint4* d = sl + (r * 2 + h) * WV * 32;
          if (WBF16) {
            const __nv_bfloat16* q = dp[r][h] + (size_t)b * 64;
            cp_async16(d, q, ok);
            cp_async16(d + 32 * (WV > 1 ? 1 : 0), q + 8, ok);
            cp_async16(d + 32 * (WV > 2 ? 2 : 0), q + 32, ok);
            cp_async16(d + 32 * (WV > 3 ? 3 : 0), q + 40, ok);
          } else {
            cp_async16(d, rp[r][h] + (size_t)cc * 64, ok);
          }
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int m = nt * 8 + g;
        if (!xrow_ok[nt] || !with_x) continue;
        uint4* d = sl + (S::W_U4 + nt * 4) * 32;
        if (xdirect) {
          const uint16_t* q = xsrc[nt] + b * 64 + hoff;
          cp_async16<true>(d, q, ok);
          cp_async16<true>(d + 32, q + 8, ok);
          cp_async16<true>(d + 64, q + 32, ok);
          cp_async16<true>(d + 96, q + 40, ok);
        } else if (I8) {  // int8 codes: 16 pairs of bytes = 2 uint4
          const uint32_t* q = p.xp + (row0 + m) * (size_t)(ldi >> 1) + b * 16 + (hoff >> 1);
          cp_async16<true>(d, q, ok);
          cp_async16<true>(d + 32, q + 4, ok);
        } else {
          const uint32_t* q = p.xp + (row0 + m) * (size_t)ldi + b * 32 + hoff;
#pragma unroll
          for (int v = 0; v < 4; ++v) cp_async16<true>(d + 32 * v, q + 4 * v, ok);
        }
      }
    }
  };
  // registers of stage st (each lane reads back only what it copied: no warp sync needed)
  uint4 wreg[R][2][WV], xreg[NT][4];
  auto fetch = [&](int st) {
    const uint4* sl = ring + st * S::U4 * 32;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int v = 0; v < WV; ++v) wreg[r][h][v] = sl[((r * 2 + h) * WV + v) * 32];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int v = 0; v < 4; ++v)
        xreg[nt][v] = (xrow_ok[nt] && (v < 2 || !I8 || xdirect)) ? sl[(S::W_U4 + nt * 4 + v) * 32] : make_uint4(0, 0, 0, 0);
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
            if (SL)
              lookup8_smem(ptab + (r * 2 + h) * 256 * 32 + lane, word(wc[r][h][0], u), pw[r][h]);
            else
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

  // codebook tables first (measured 1-6% faster on the MoE and the long dense rows than after the
  // first copies, 2-3% slower on 4096x4096-class rows)
  if (!WBF16 && !grouped && !SL) load_tables(0);
  if constexpr (SL) {  // item i: lane copy ln of row half rh, entries with high nibble hn
    for (int i = threadIdx.x; i < R * 2 * 32 * 16; i += blockDim.x) {
      const int ln = i & 31, rh = (i >> 5) % (R * 2), hn = (i >> 5) / (R * 2);
      const int row = min(n0 + 8 * rh + (ln >> 2), p.N - 1);
      Table T;
      load_table<BF16>(T, cb + (size_t)row * 16);
      const uint32_t hb = prmt(T.l[hn >> 2], T.h[hn >> 2], 0x4000 + (hn & 3) * 0x1100) & 0xFFFF0000u;  // entry hn, bytes 2..3
#pragma unroll
      for (int lo = 0; lo < 16; ++lo)
        ptab[(rh * 256 + hn * 16 + lo) * 32 + ln] = (prmt(T.l[lo >> 2], T.h[lo >> 2], 0x40 + (lo & 3) * 0x11) & 0xFFFFu) | hb;
    }
    __syncthreads();
  }
  // with PDL x is the previous launch's output: weights and tables are fetched before the wait
#pragma unroll
  for (int st = 0; st < D - 1; ++st) {
    issue(c_begin + st, st, true, !prefetch);
    cp_async_commit();
  }
  if (prefetch) {
    grid_dependency_wait();
#pragma unroll
    for (int st = 0; st < D - 1; ++st) issue(c_begin + st, st, false, true);
    cp_async_commit();
  }

  int st = 0;
  for (int c = c_begin; c < c_end; ++c) {
    issue(c + D - 1, st == 0 ? D - 1 : st - 1, true, true);  // the stage computed last round
    cp_async_commit();
    if (prefetch && c == c_begin)
      cp_async_wait<1>();  // the prologue's groups (weights, then x) have landed
    else
      cp_async_wait<D - 1>();  // chunk c has landed
    fetch(st);
    compute(wreg, xreg, c);
    st = st == D - 1 ? 0 : st + 1;
  }
  cp_async_wait<0>();
  if (!moe) launch_dependents();
  __syncthreads();  // the ring's memory becomes the split-K reduction buffer

  // accumulators: c0 (row g, token 2t), c1 (row g, 2t+1), c2 (row g+8, 2t), c3 (row g+8, 2t+1)
  constexpr int TOK = NT * 8;
  float* red = reinterpret_cast<float*>(smem);
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
    if (moe) {
      slot = slot_of(xrow);
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
      store_out(p.y, (size_t)slot * p.ldy + n, p.otype, s * load_in(p.rw, slot, p.rwtype));
    } else {
      if (p.bias != nullptr) s += p.bias[n];
      store_out(p.y, xrow * p.ldy + n, p.otype, s);
    }
  }
}

// out[t, n] = sum over k of ys[t * topk + k, n] (the MoE's slots of token t), one rounding to otype.
__global__ void topk_sum_kernel(const float* __restrict__ ys, void* out, int otype, int H, int topk) {
  grid_dependency_wait();  // launched with PDL after the down projection
  const int t = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= H) return;
  const float* src = ys + (size_t)t * topk * H + n;
  float s = 0.f;
  for (int k = 0; k < topk; ++k) s += src[(size_t)k * H];
  store_out(out, (size_t)t * H + n, otype, s);
}

// Group the S (token, k) slots by expert, each expert's run padded to bm rows (one block):
// sorted[bm * b + r] = slot id (S in padding rows), bexp[b] = expert of block b (-1 past the last
// used block). Counts, then block offsets (a warp's scan), then one warp places 32 slots at a time,
// each at its expert's cursor plus its rank among the earlier lanes of the same expert (stable:
// slots of one expert stay in token order).
__global__ void moe_align_kernel(const void* ids, int ids64, int S, int E, int bm, int max_blocks, int* sorted, int* bexp) {
  extern __shared__ int sh[];  // count[E], first block[E + 1], cursor[E] (rows placed)
  int *count = sh, *first = sh + E, *cursor = sh + 2 * E + 1;
  const int tid = threadIdx.x, nth = blockDim.x;
  auto expert = [&](int i) { return ids64 ? (int)reinterpret_cast<const long long*>(ids)[i] : reinterpret_cast<const int*>(ids)[i]; };
  for (int e = tid; e < E; e += nth) count[e] = cursor[e] = 0;
  __syncthreads();
  for (int i = tid; i < S; i += nth) atomicAdd(&count[expert(i)], 1);
  __syncthreads();
  if (tid < 32) {  // lane l scans experts [l * per, (l + 1) * per)
    const int per = (E + 31) / 32, lo = min(tid * per, E), hi = min(lo + per, E);
    int run = 0;
    for (int e = lo; e < hi; ++e) run += (count[e] + bm - 1) / bm;
    int incl = run;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (tid >= o) incl += v;
    }
    int b = incl - run;
    for (int e = lo; e < hi; ++e) {
      first[e] = b;
      b += (count[e] + bm - 1) / bm;
    }
    if (tid == 31) first[E] = incl;
  }
  __syncthreads();
  for (int b = tid; b < max_blocks; b += nth) {  // the expert whose run holds block b
    int lo = 0, hi = E;                          // last e with first[e] <= b, among experts with blocks
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (first[mid] <= b) lo = mid; else hi = mid - 1;
    }
    bexp[b] = b < first[E] ? lo : -1;
  }
  for (int r = tid; r < max_blocks * bm; r += nth) sorted[r] = S;
  __syncthreads();  // padding written before the slots overwrite their rows
  if (tid >= 32) return;
  for (int base = 0; base < S; base += 32) {
    const int i = base + tid;
    const int e = i < S ? expert(i) : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    if (e >= 0) sorted[first[e] * bm + cursor[e] + __popc(same & ((1u << tid) - 1u))] = i;
    __syncwarp();
    if (e >= 0 && (same >> tid) == 1u) cursor[e] += __popc(same);  // the group's last lane
    __syncwarp();
  }
}

// ---------------------------------------------------------------- fused router (two launches per MoE layer)
// logits l[t, e] = sum_h x[t, h] W[e, h] (fp32 sums, rounded to the 16-bit type when round_logits, as
// F.linear in that type does), p[t] = softmax(l[t]) in fp32, the top_k experts by l (the order of p;
// ties to the lower expert index, NaN above every number as in torch.topk), their p renormalized to
// sum 1 when renorm, times scale.
// Launch 1 (route_logits_kernel): one expert row per warp, ROUTE_WARPS rows per block, fp32 logits
// to a workspace [T, E]; with PDL it fetches its weight rows before waiting for the launch that wrote
// x, and lets launch 2 start at once. Launch 2 (route_topk_kernel, one block, PDL): waits for launch 1,
// ranks every logit of a token against all others (rank = the logits before it in the order above;
// rank < top_k is a pick), softmax sums by block reduction. It never triggers its dependents early
// (see route_topk_kernel).
constexpr int ROUTE_WARPS = 4;  // warps (expert rows) per block of the logits launch
constexpr int ROUTE_SEG = 8;    // 16-B weight chunks per lane loaded together (2048 columns per warp)

template <bool BF16>
__device__ __forceinline__ float route_half(uint32_t u, int hi) {
  if (BF16) return __uint_as_float(hi ? (u & 0xffff0000u) : (u << 16));
  return __half2float(__ushort_as_half((unsigned short)(hi ? u >> 16 : u & 0xffffu)));
}

// sum of the 8 products of two 16-B chunks of 16-bit values, in fp32
template <bool BF16>
__device__ __forceinline__ float route_dot8(const uint4& a, const uint4& b, float s) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const uint32_t wa = word(a, u), wb = word(b, u);
    s = fmaf(route_half<BF16>(wa, 0), route_half<BF16>(wb, 0), s);
    s = fmaf(route_half<BF16>(wa, 1), route_half<BF16>(wb, 1), s);
  }
  return s;
}

// Launch 1: the logits of expert rows e = blockIdx.x * ROUTE_WARPS + warp (+ gridDim.x * ROUTE_WARPS ...)
// for every token, into p.ws [T, E] (fp32, rounded to the 16-bit type first when round_logits).
template <bool BF16>
__global__ void __launch_bounds__(ROUTE_WARPS * 32) route_logits_kernel(const RouteParams p) {
  launch_dependents();  // the top-k launch waits for this whole grid (griddepcontrol.wait)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nch = p.H >> 3;
  bool waited = !p.pdl;
  for (int e = blockIdx.x * ROUTE_WARPS + warp; e < p.E; e += gridDim.x * ROUTE_WARPS) {
    float acc[ROUTE_MAX_T];
#pragma unroll
    for (int t = 0; t < ROUTE_MAX_T; ++t) acc[t] = 0.f;
    const uint4* wr = reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(p.w) + (size_t)e * p.H);
    for (int c0 = 0; c0 < nch; c0 += 32 * ROUTE_SEG) {
      uint4 wv[ROUTE_SEG];
#pragma unroll
      for (int s = 0; s < ROUTE_SEG; ++s) {
        const int c = c0 + s * 32 + lane;
        wv[s] = c < nch ? __ldg(wr + c) : make_uint4(0, 0, 0, 0);
      }
      if (!waited) {
        grid_dependency_wait();
        waited = true;
      }
#pragma unroll
      for (int s = 0; s < ROUTE_SEG; ++s) {
        const int c = c0 + s * 32 + lane;
        if (c < nch) {
#pragma unroll
          for (int t = 0; t < ROUTE_MAX_T; ++t)
            if (t < p.T)
              acc[t] = route_dot8<BF16>(wv[s], __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(p.x) + (size_t)t * p.ldx) + c), acc[t]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < ROUTE_MAX_T; ++t) {
      if (t < p.T) {
        float v = acc[t];
#pragma unroll
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (p.round_logits) v = BF16 ? __bfloat162float(__float2bfloat16_rn(v)) : __half2float(__float2half_rn(v));
        if (lane == 0) p.ws[t * p.E + e] = v;
      }
    }
  }
  if (!waited) grid_dependency_wait();  // every write of this launch comes after the previous launch
}

// A logit as an unsigned key whose order is the router's: larger first, +0 = -0, NaN above +inf.
__device__ __forceinline__ uint32_t route_key(float v) {
  if (v != v) return 0xffffffffu;
  const uint32_t u = __float_as_uint(v == 0.f ? 0.f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Launch 2: shared memory holds the logits lg [T * E], their keys [T * E], the picks [T * topk] and
// the per-warp softmax sums [T * ROUTE_TOPK_WARPS].
__global__ void __launch_bounds__(ROUTE_TOPK_WARPS * 32) route_topk_kernel(const RouteParams p) {
  // No launch_dependents(): the launches after this one start when it has finished. The W4A4 MoE's
  // prologue (PDL) lets its gate_up GEMV start at once, and that GEMV reads the expert ids before it
  // waits (to fetch the expert's first weights), so a trigger here let it read expert ids not yet
  // written (an illegal address in the W4A4 end-to-end decode, tests/kernels/test_cuda_router.py).
  extern __shared__ float lg[];
  const int n = p.T * p.E, nth = ROUTE_TOPK_WARPS * 32, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  uint32_t* key = reinterpret_cast<uint32_t*>(lg + n);
  int* pick = reinterpret_cast<int*>(key + n);
  float* part = reinterpret_cast<float*>(pick + p.T * p.topk);
  grid_dependency_wait();  // the logits launch has finished and its writes are visible
  for (int i = tid; i < n; i += nth) {
    const float v = __ldcg(p.ws + i);
    lg[i] = v;
    key[i] = route_key(v);
    if (p.logits) store_out(p.logits, i, p.ltype, v);
  }
  __syncthreads();
  for (int i = tid; i < n; i += nth) {  // rank of (t, e): the logits of token t before it
    const int t = i / p.E, e = i - t * p.E;
    const uint32_t* kt = key + t * p.E;
    const uint32_t mine = kt[e];
    int above = 0, tied = 0;
    for (int j = 0; j < p.E; ++j) {
      const uint32_t o = kt[j];
      above += o > mine;
      tied += (o == mine) & (j < e);
    }
    const int r = above + tied;
    if (r < p.topk) pick[t * p.topk + r] = e;
  }
  __syncthreads();
  for (int t = 0; t < p.T; ++t) {  // softmax denominators: sum of exp(l - max), max = the first pick
    const float* l = lg + t * p.E;
    const float m = l[pick[t * p.topk]];
    float s = 0.f;
    for (int e = tid; e < p.E; e += nth) s += expf(l[e] - m);
#pragma unroll
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) part[t * ROUTE_TOPK_WARPS + warp] = s;
  }
  __syncthreads();
  for (int i = tid; i < p.T * p.topk; i += nth) {
    const int t = i / p.topk;
    const float* l = lg + t * p.E;
    const int* pt = pick + t * p.topk;
    const float m = l[pt[0]];
    float s = 0.f, z = 0.f;
#pragma unroll
    for (int w = 0; w < ROUTE_TOPK_WARPS; ++w) s += part[t * ROUTE_TOPK_WARPS + w];
    for (int j = 0; j < p.topk; ++j) z += expf(l[pt[j]] - m) / s;
    const int e = pt[i - t * p.topk];
    const float mine = expf(l[e] - m) / s;
    store_out(p.weights, i, p.wtype, (p.renorm ? mine / z : mine) * p.scale);
    p.index[i] = e;
  }
}

constexpr int MAX_SMEM = 227 * 1024;

// A launch, with programmatic stream serialization (PDL) when pdl: it may start while the previous
// launch on the stream runs, and must call grid_dependency_wait before reading that launch's output.
template <typename Kernel, typename... Args>
static cudaError_t launch_pdl(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t st, bool pdl, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Dynamic shared memory of a launch: the pair tables (SL), then the W rings of D stages, whose
// memory the split-K reduction reuses.
static size_t smem_bytes(int R, int NT, bool wbf16, bool sl, int W, int D) {
  const size_t stage = (size_t)(R * 2 * (wbf16 ? 4 : 1) + NT * 4) * 16 * 32;  // Stage::U4 uint4 per lane
  const size_t ring = (size_t)W * D * stage, red = (size_t)W * R * 16 * NT * 8 * sizeof(float);
  return (sl ? pair_table_bytes(R) : 0) + (ring > red ? ring : red);
}

template <int R, int NT, bool BF16, bool WBF16, int D, bool I8, bool SL>
static cudaError_t launch(GemvParams p, int W, int blocks_y, cudaStream_t st) {
  const int tile_rows = p.epi == EPI_SWIGLU ? 16 : 16 * R;
  const int rows = p.epi == EPI_SWIGLU ? p.inter : p.N;
  const dim3 grid((rows + tile_rows - 1) / tile_rows, blocks_y);
  const size_t smem = smem_bytes(R, NT, WBF16, SL, W, D);
  static bool attr = false;  // once per instantiation: allow more than 48 KB of dynamic shared memory
  if (!attr) {
    const cudaError_t e = cudaFuncSetAttribute(gemv_kernel<R, NT, BF16, WBF16, D, I8, SL>, cudaFuncAttributeMaxDynamicSharedMemorySize, MAX_SMEM);
    if (e != cudaSuccess) return e;
    attr = true;
  }
  return launch_pdl(gemv_kernel<R, NT, BF16, WBF16, D, I8, SL>, grid, dim3(32 * W), smem, st, p.pdl != 0, p);
}

}  // namespace cq

int cq_prep_x(const PrepParams& p, int rows_out, cudaStream_t st) {
  if (rows_out <= 0) return 0;
  // latency-bound: one unit of 8 pair words per thread where the row allows, at most PREP_THREADS
  const int units = p.KP >> 4, threads = units < cq::PREP_THREADS ? (units + 31) / 32 * 32 : cq::PREP_THREADS;
  const size_t smem = p.hblock > 0 ? (size_t)p.KP * sizeof(float) : 0;
  static bool attr = false;
  if (smem > 48 * 1024 && !attr) {
    const cudaError_t e = cudaFuncSetAttribute(cq::prep_x_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)(PREP_HADAMARD_MAX_KP * sizeof(float)));
    if (e != cudaSuccess) return (int)e;
    attr = true;
  }
  return (int)cq::launch_pdl(cq::prep_x_kernel, dim3(rows_out), dim3(threads), smem, st, p.pdl != 0, p);
}

int cq_moe_align(const void* ids, int ids64, int S, int E, int bm, int max_blocks, int* sorted, int* bexp, cudaStream_t st) {
  if (S <= 0) return 0;
  cq::moe_align_kernel<<<1, 1024, (3 * E + 1) * sizeof(int), st>>>(ids, ids64, S, E, bm, max_blocks, sorted, bexp);
  return (int)cudaGetLastError();
}

int cq_topk_sum(const float* ys, void* out, int otype, int T, int H, int topk, int pdl, cudaStream_t st) {
  if (T <= 0 || H <= 0) return 0;
  return (int)cq::launch_pdl(cq::topk_sum_kernel, dim3((H + 255) / 256, T), dim3(256), 0, st, pdl != 0, ys, out, otype, H, topk);
}

int cq_gemv(GemvParams p, int R, int W, int bf16_dot, int stages, int blocks_y, cudaStream_t st) {
  using namespace cq;
  const int nt = p.M <= 8 ? 1 : 2;
  if (p.M < 1 || p.M > 16 || (R != 1 && R != 2) || W < 1 || W > 16 || (p.NG > 1 && p.G % 64)) return (int)cudaErrorInvalidValue;
  if (p.epi == EPI_SWIGLU && R != 2) return (int)cudaErrorInvalidValue;
  if (p.wd != nullptr && (!bf16_dot || p.K % 64)) return (int)cudaErrorInvalidValue;
  const bool wbf16 = p.wd != nullptr, i8 = p.cb8 != nullptr;
  const int nch = ((p.KP >> 6) + 1) >> 1;
  if (R == 2 && W > 8) W = 8;
  if (W > nch) W = nch < 1 ? 1 : nch;
  p.cpw = (nch + W - 1) / W;
  // deepest ring up to `stages` (2..4) that fits in shared memory
  int D = stages < 2 ? 2 : stages > 4 ? 4 : stages;
  // pair tables in shared memory: dense per-row codebooks on the 16-bit path, ring of 2
  const bool sl = p.slut && !wbf16 && !i8 && p.NG == 1 && p.bexp == nullptr && p.epi == EPI_PLAIN &&
                  smem_bytes(R, nt, false, true, W, 2) <= (size_t)MAX_SMEM;
  if (sl) D = 2;
  while (D > 2 && smem_bytes(R, nt, wbf16, sl, W, D) > (size_t)MAX_SMEM) --D;
  if (smem_bytes(R, nt, wbf16, sl, W, D) > (size_t)MAX_SMEM) return (int)cudaErrorInvalidValue;
#define CQ_CASE(RR, NTT, BF, WB, DD, I8_, SL_)                                                                  \
  if (R == RR && nt == NTT && (bool)bf16_dot == BF && wbf16 == WB && D == DD && i8 == I8_ && sl == SL_) \
    return (int)launch<RR, NTT, BF, WB, DD, I8_, SL_>(p, W, blocks_y, st);
#define CQ_D(RR, NTT, BF, WB, I8_) \
  CQ_CASE(RR, NTT, BF, WB, 2, I8_, false) CQ_CASE(RR, NTT, BF, WB, 3, I8_, false) CQ_CASE(RR, NTT, BF, WB, 4, I8_, false)
#define CQ_RN(BF, WB, I8_) CQ_D(1, 1, BF, WB, I8_) CQ_D(1, 2, BF, WB, I8_) CQ_D(2, 1, BF, WB, I8_) CQ_D(2, 2, BF, WB, I8_)
#define CQ_SL(BF) \
  CQ_CASE(1, 1, BF, false, 2, false, true) CQ_CASE(1, 2, BF, false, 2, false, true) CQ_CASE(2, 1, BF, false, 2, false, true) CQ_CASE(2, 2, BF, false, 2, false, true)
  CQ_RN(true, false, false) CQ_RN(false, false, false) CQ_RN(true, true, false) CQ_RN(false, false, true) CQ_SL(true) CQ_SL(false)
#undef CQ_SL
#undef CQ_RN
#undef CQ_D
#undef CQ_CASE
  return (int)cudaErrorInvalidValue;
}

int cq_route(const RouteParams& p, cudaStream_t st) {
  using namespace cq;
  const size_t smem = route_smem_bytes(p.T, p.E, p.topk);
  if (p.T < 1 || p.T > ROUTE_MAX_T || p.E < 1 || p.E > ROUTE_MAX_E || p.topk < 1 || p.topk > ROUTE_MAX_K || p.topk > p.E ||
      p.H % 8 || smem > ROUTE_MAX_SMEM)
    return (int)cudaErrorInvalidValue;
  static bool attr = false;  // once: allow more than 48 KB of dynamic shared memory
  if (!attr) {
    const cudaError_t e = cudaFuncSetAttribute(route_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ROUTE_MAX_SMEM);
    if (e != cudaSuccess) return (int)e;
    attr = true;
  }
  const dim3 grid((p.E + ROUTE_WARPS - 1) / ROUTE_WARPS), block(ROUTE_WARPS * 32);
  cudaError_t e = p.xtype == 0 ? launch_pdl(route_logits_kernel<true>, grid, block, 0, st, p.pdl != 0, p)
                               : launch_pdl(route_logits_kernel<false>, grid, block, 0, st, p.pdl != 0, p);
  if (e != cudaSuccess) return (int)e;
  return (int)launch_pdl(route_topk_kernel, dim3(1), dim3(ROUTE_TOPK_WARPS * 32), smem, st, p.pdl != 0, p);
}
