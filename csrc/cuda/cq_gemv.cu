// CodeQuant W4A16 decode GEMM (M = 1..16 tokens) on the packed format v1, for sm_80+ (built sm_90).
//
// Layout read (src/codequant/format.py): indices uint8 [N, KP/2], per 64-column block 32 bytes,
// byte j = column 64b+j (low nibble) | column 64b+32+j (high nibble); codebook fp16 [N, NG, 16].
//
// Design (one warp = one or two 16-row tiles over a K range; warps of a block split K):
// * Each lane loads 16 B of indices of row g and of row g+8 (g = lane/4) per 128-column chunk:
//   lane t = lane%4 takes bytes 16(t&1)..16(t&1)+15 of block 2c + (t>>1). One byte holds the
//   column pair (j, j+32); the pair is one 32-bit operand register of mma.m16n8k16 (k = 2t, 2t+1
//   or 2t+8, 2t+9), so the dot product runs on tensor cores with K permuted identically for
//   x, whose pairs a tiny prologue kernel writes as [M, KP/2] 32-bit words (zero past K).
// * The lookup is done in registers: the row's 16 codebook entries (converted to the dot type)
//   are kept as 4 words of low bytes and 4 words of high bytes; per 4 indices 4 prmt look up
//   entries idx&7 in both halves of the table, 2 prmt select by bit 3, 2 prmt interleave low and
//   high bytes into the two 16-bit pairs (8 prmt per 4 weights, plus 5 ALU ops per 8 weights).
// * Accumulation in fp32 (mma accumulators), split-K across warps reduced in shared memory.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

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

__device__ __forceinline__ uint4 ld_x(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

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

// Four nibbles (selector halves in the low 16 bits of w7 / sel) -> two 32-bit pairs:
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

// One 32-bit word of indices (4 bytes) -> 4 pairs, pair i from byte i (low nibble in the low half).
__device__ __forceinline__ void lookup8(const Table& T, uint32_t w, uint32_t (&o)[4]) {
  uint32_t w7 = w & 0x77777777u;
  uint32_t sel = ((w >> 1) & 0x44444444u) | 0x32103210u;
  lookup4(T, w7, sel, o[0], o[1]);
  lookup4(T, w7 >> 16, sel >> 16, o[2], o[3]);
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int u) {
  return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// x [M, K] (row stride ldx) -> xp [M, KP/2] words: word 32b+j = (x[64b+j], x[64b+32+j]) in the dot type.
template <typename IT, bool BF16>
__global__ void pack_x_kernel(const IT* __restrict__ x, int ldx, uint32_t* __restrict__ xp, int K, int KP) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y;
  if (p >= (KP >> 1)) return;
  const int c0 = ((p >> 5) << 6) + (p & 31), c1 = c0 + 32;
  const IT* xr = x + (size_t)m * ldx;
  float v0 = c0 < K ? to_float<IT>(xr[c0]) : 0.f;
  float v1 = c1 < K ? to_float<IT>(xr[c1]) : 0.f;
  uint32_t r;
  if (BF16) {
    __nv_bfloat162 b = __floats2bfloat162_rn(v0, v1);
    r = *reinterpret_cast<uint32_t*>(&b);
  } else {
    __half2 h = __floats2half2_rn(v0, v1);
    r = *reinterpret_cast<uint32_t*>(&h);
  }
  xp[(size_t)m * (KP >> 1) + p] = r;
}

// R: 16-row tiles per warp (and block); NT: n8 token tiles (M <= 8 * NT).
// XDIRECT: x read straight from the caller's [M, K] 16-bit tensor (K % 64 == 0, 16-B aligned rows) and
// paired in registers (2 prmt per pair word); otherwise from the prologue's xp [M, KP/2] words.
template <int R, int NT, bool BF16, bool GROUPED, bool XDIRECT, typename OT>
__global__ void __launch_bounds__(R == 2 ? 256 : 512) gemv_kernel(const uint8_t* __restrict__ idx, const __half* __restrict__ cb,
                                                   const uint32_t* __restrict__ xp, const uint16_t* __restrict__ xs,
                                                   int ldx, const float* __restrict__ bias, OT* __restrict__ y, int M,
                                                   int N, int KP, int NG, int G, int cpw) {
  extern __shared__ float red[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16 * R;
  const int ldi = KP >> 1, nblk = KP >> 6, nch = (nblk + 1) >> 1;
  const int c_begin = warp * cpw;
  const int c_end = min(c_begin + cpw, nch);
  const int boff = t >> 1, hoff = (t & 1) * 16;

  int rown[R][2];
  const uint8_t* rp[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rown[r][h] = min(n0 + 16 * r + 8 * h + g, N - 1);
      rp[r][h] = idx + (size_t)rown[r][h] * ldi + hoff;
    }

  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.f;

  Table tab[R][2];
  int cur_g = -1;
  if (!GROUPED) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) load_table<BF16>(tab[r][h], cb + (size_t)rown[r][h] * NG * 16);
  }

  // D chunks of indices in flight per warp (a register ring, indices known at compile time).
  constexpr int D = R == 1 ? 4 : 2;
  uint4 wb[D][R][2];
  auto load_chunk = [&](uint4 (&dst)[R][2], int cc) {
    const int b = 2 * cc + boff;
    const bool ok = cc < c_end && b < nblk;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) dst[r][h] = ok ? ld_stream(rp[r][h] + (size_t)b * 32) : make_uint4(0, 0, 0, 0);
  };
  auto compute_chunk = [&](const uint4 (&wc)[R][2], int c) {
    const int blk = 2 * c + boff;
    const bool valid = blk < nblk;
    uint32_t xb[NT][16];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = nt * 8 + g;
      if (XDIRECT && valid && m < M) {
        const uint16_t* xr = xs + (size_t)m * ldx + blk * 64 + hoff;
        const uint4 l0 = ld_x(xr), l1 = ld_x(xr + 8), h0 = ld_x(xr + 32), h1 = ld_x(xr + 40);
        const uint32_t lw[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
        const uint32_t hw[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
        for (int v = 0; v < 8; ++v) {
          xb[nt][2 * v] = prmt(lw[v], hw[v], 0x5410);
          xb[nt][2 * v + 1] = prmt(lw[v], hw[v], 0x7632);
        }
      } else if (!XDIRECT && valid && m < M) {
        const uint32_t* xq = xp + (size_t)m * ldi + blk * 32 + hoff;
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          uint4 q = ld_x(xq + 4 * v);
          xb[nt][4 * v] = q.x;
          xb[nt][4 * v + 1] = q.y;
          xb[nt][4 * v + 2] = q.z;
          xb[nt][4 * v + 3] = q.w;
        }
      } else {
#pragma unroll
        for (int v = 0; v < 16; ++v) xb[nt][v] = 0u;
      }
    }
    if (GROUPED) {
      const int gi = min((blk * 64) / G, NG - 1);
      if (gi != cur_g) {
        cur_g = gi;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int h = 0; h < 2; ++h) load_table<BF16>(tab[r][h], cb + ((size_t)rown[r][h] * NG + gi) * 16);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t a[R][2][4];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) lookup8(tab[r][h], word(wc[r][h], u), a[r][h]);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int q = 2 * u + hh;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma16816<BF16>(acc[r][nt], a[r][0][2 * hh], a[r][1][2 * hh], a[r][0][2 * hh + 1], a[r][1][2 * hh + 1],
                           xb[nt][2 * q], xb[nt][2 * q + 1]);
      }
    }
  };
#pragma unroll
  for (int s = 0; s < D; ++s) load_chunk(wb[s], c_begin + s);
  for (int c0 = c_begin; c0 < c_end; c0 += D) {
#pragma unroll
    for (int s = 0; s < D; ++s) {
      const int c = c0 + s;
      if (c < c_end) {
        compute_chunk(wb[s], c);
        load_chunk(wb[s], c + D);
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
      rw[(r * 16 + g) * TOK + tok] = acc[r][nt][0];
      rw[(r * 16 + g) * TOK + tok + 1] = acc[r][nt][1];
      rw[(r * 16 + g + 8) * TOK + tok] = acc[r][nt][2];
      rw[(r * 16 + g + 8) * TOK + tok + 1] = acc[r][nt][3];
    }
  __syncthreads();
  for (int i = threadIdx.x; i < R * 16 * M; i += blockDim.x) {
    const int row = i % (R * 16), m = i / (R * 16);
    const int n = n0 + row;
    if (n >= N) continue;
    float s = 0.f;
    for (int w = 0; w < W; ++w) s += red[w * (R * 16 * TOK) + row * TOK + m];
    if (bias != nullptr) s += bias[n];
    y[(size_t)m * N + n] = from_float<OT>(s);
  }
}

template <int R, int NT, bool BF16, bool GROUPED, bool XDIRECT, typename OT>
static cudaError_t launch_gemv(const uint8_t* idx, const __half* cb, const uint32_t* xp, const void* x, int ldx,
                               const float* bias, void* y, int M, int N, int KP, int NG, int G, int W, cudaStream_t st) {
  const int nch = ((KP >> 6) + 1) >> 1;
  if (R == 2 && W > 8) W = 8;
  if (W > nch) W = nch < 1 ? 1 : nch;
  const int cpw = (nch + W - 1) / W;
  const int blocks = (N + 16 * R - 1) / (16 * R);
  const size_t smem = (size_t)W * R * 16 * NT * 8 * sizeof(float);
  gemv_kernel<R, NT, BF16, GROUPED, XDIRECT, OT><<<blocks, 32 * W, smem, st>>>(
      idx, cb, xp, reinterpret_cast<const uint16_t*>(x), ldx, bias, reinterpret_cast<OT*>(y), M, N, KP, NG, G, cpw);
  return cudaGetLastError();
}

}  // namespace cq

// Testing switch: always run the x prologue (set through cq_gemv_set_force_prologue).
static bool cq_force_prologue = false;
void cq_gemv_set_force_prologue(bool v) { cq_force_prologue = v; }

// xtype: 0 bf16 (bf16 dot, bf16 out), 1 fp16 (fp16 dot, fp16 out), 2 fp32 (bf16 dot, fp32 out).
// G: codebook group size in columns (a multiple of 64 when NG > 1).
// Returns a cudaError_t value (0: launched).
int cq_gemv_launch(const void* x, int xtype, int ldx, int M, int K, const uint8_t* idx, const void* cb, int N, int KP,
                   int NG, int G, const float* bias, void* y, void* xp, int R, int W, cudaStream_t st) {
  using namespace cq;
  if (M < 1 || M > 16 || (R != 1 && R != 2) || W < 1 || W > 16 || (NG > 1 && G % 64)) return (int)cudaErrorInvalidValue;
  const bool direct = xtype != 2 && K % 64 == 0 && ldx % 8 == 0 && ((uintptr_t)x % 16) == 0 && !cq_force_prologue;
  if (!direct) {
    dim3 grid(((KP >> 1) + 255) / 256, M);
    if (xtype == 0)
      pack_x_kernel<__nv_bfloat16, true><<<grid, 256, 0, st>>>((const __nv_bfloat16*)x, ldx, (uint32_t*)xp, K, KP);
    else if (xtype == 1)
      pack_x_kernel<__half, false><<<grid, 256, 0, st>>>((const __half*)x, ldx, (uint32_t*)xp, K, KP);
    else
      pack_x_kernel<float, true><<<grid, 256, 0, st>>>((const float*)x, ldx, (uint32_t*)xp, K, KP);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return (int)e;
  }
  const __half* c = (const __half*)cb;
  const uint32_t* xq = (const uint32_t*)xp;
  const bool grouped = NG > 1;
  const int nt = M <= 8 ? 1 : 2;
  cudaError_t e = cudaErrorInvalidValue;
#define CQ_DISPATCH(RR, NTT, BF, GR, OT)                                                                   \
  if (R == RR && nt == NTT && grouped == GR) {                                                             \
    if (direct && !std::is_same<OT, float>::value)                                                         \
      e = launch_gemv<RR, NTT, BF, GR, true, OT>(idx, c, xq, x, ldx, bias, y, M, N, KP, NG, G, W, st);     \
    else                                                                                                   \
      e = launch_gemv<RR, NTT, BF, GR, false, OT>(idx, c, xq, x, ldx, bias, y, M, N, KP, NG, G, W, st);    \
  }
#define CQ_ALL(BF, OT)                                                                                \
  CQ_DISPATCH(1, 1, BF, false, OT) CQ_DISPATCH(1, 2, BF, false, OT) CQ_DISPATCH(2, 1, BF, false, OT)  \
  CQ_DISPATCH(2, 2, BF, false, OT) CQ_DISPATCH(1, 1, BF, true, OT) CQ_DISPATCH(1, 2, BF, true, OT)    \
  CQ_DISPATCH(2, 1, BF, true, OT) CQ_DISPATCH(2, 2, BF, true, OT)
  if (xtype == 0) {
    CQ_ALL(true, __nv_bfloat16)
  } else if (xtype == 1) {
    CQ_ALL(false, __half)
  } else {
    CQ_ALL(true, float)
  }
#undef CQ_ALL
#undef CQ_DISPATCH
  return (int)e;
}
