// AVX2 kernels (AVX2 + FMA + F16C), for x86 CPUs without AVX-512.
//
// Float activations: vpshufb looks up the low and the high byte of 32 fp16 centroids at once,
// unpacking interleaves them and vcvtph2ps widens 8 at a time (lookup32).
// Integer activations: one 32-byte load is one 64-column block; low and high nibbles
// index the int8 codebook with vpshufb, and vpmaddubsw + vpmaddwd form the dot product
// with the uint8 codes (natural column order). 8-bit codes could saturate vpmaddubsw,
// so they are split as q = 128 * (q >> 7) + (q & 127) into two exact products.
//
// Compiled with -mavx2 -mfma -mf16c -mbmi2 (setup.py) and called only after the runtime check
// in cq_module.cpp; includes no C++ standard headers (see cq_kernels.h).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cq_kernels.h"

namespace cq {
namespace {

bool f32_ok(const Weight& w) { return w.NG == 1 || w.G % 32 == 0; }
bool i8_ok(const Weight& w, const ActQ& a) {
  return (w.NG == 1 || w.G % 32 == 0) && (a.NA == 1 || a.GA % 32 == 0);
}

// A codebook of 16 fp16 centroids as two byte tables, each in both 128-bit lanes: the low
// bytes of the centroids (lo) and their high bytes (hi).
struct Fp16Table {
  __m256i lo, hi;
};
inline Fp16Table fp16_table(const uint16_t* cb) {
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)cb),  // per lane: 8 low bytes, 8 high
                                            _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                             0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  const __m256i split = _mm256_permute4x64_epi64(bytes, 0xD8);  // lanes: [low bytes 0-15], [high bytes 0-15]
  return {_mm256_permute2x128_si256(split, split, 0x00), _mm256_permute2x128_si256(split, split, 0x11)};
}
// The centroids of 32 indices (low 4 bits of each byte) as float32, in four vectors of 8: columns
// 0-7, 8-15, 16-23, 24-31 of the 32. vpshufb looks up both bytes of each fp16 centroid, unpacking
// interleaves them (per 128-bit lane: columns 0-7 and 16-23, then 8-15 and 24-31), vcvtph2ps widens.
inline void lookup32(__m256i idx, Fp16Table t, __m256 w[4]) {
  const __m256i lo = _mm256_shuffle_epi8(t.lo, idx), hi = _mm256_shuffle_epi8(t.hi, idx);
  const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
  w[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
  w[1] = _mm256_cvtph_ps(_mm256_castsi256_si128(b));
  w[2] = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  w[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(b, 1));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MB>
void f32_block(const Weight& w, const ActF& a, float* y, int64_t ldy, const float* bias, int64_t n, int64_t m0) {
  constexpr int NA = MB >= 8 ? 1 : 8 / MB;  // 8 independent sums per block: one FMA per chain and token
  const int64_t nb = w.KP / 64;
  const uint8_t* p = w.idx + n * (w.KP / 2);
  const uint16_t* cbrow = w.cb16 + n * w.NG * 16;
  const float* x = a.x + m0 * a.ldx;
  __m256 acc[MB][NA];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm256_setzero_ps();
  int64_t gl = -1, gh = -1;
  Fp16Table t0{}, t1{};  // codebooks of the low / high 32 columns of a block
  GroupCursor cg(w.G, w.NG - 1);
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g0 = cg.at(64 * b), g1 = cg.at(64 * b + 32);
    if (g0 != gl) {
      t0 = fp16_table(cbrow + 16 * g0);
      gl = g0;
    }
    if (g1 != gh) {
      t1 = fp16_table(cbrow + 16 * g1);
      gh = g1;
    }
    const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * b));  // byte j: columns j and 32 + j
    __m256 wv[8];
    lookup32(_mm256_and_si256(v, m0f), t0, wv);
    lookup32(_mm256_and_si256(_mm256_srli_epi16(v, 4), m0f), t1, wv + 4);
    const float* xb = x + 64 * b;
    CQ_UNROLL
    for (int m = 0; m < MB; ++m) {
      const float* xm = xb + m * a.ldx;
      CQ_UNROLL
      for (int j = 0; j < 8; ++j) acc[m][j % NA] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xm + 8 * j), acc[m][j % NA]);
    }
  }
  const float bn = bias ? bias[n] : 0.f;
  for (int m = 0; m < MB; ++m) {
    __m256 s = acc[m][0];
    for (int j = 1; j < NA; ++j) s = _mm256_add_ps(s, acc[m][j]);
    y[(m0 + m) * ldy + n] = hsum8(s) + bn;
  }
}

void f32_rows(const Weight& w, const ActF& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 8 <= a.M; m += 8) f32_block<8>(w, a, y, ldy, bias, n, m);
    if (a.M - m >= 4) { f32_block<4>(w, a, y, ldy, bias, n, m); m += 4; }
    if (a.M - m >= 2) { f32_block<2>(w, a, y, ldy, bias, n, m); m += 2; }
    if (a.M - m >= 1) { f32_block<1>(w, a, y, ldy, bias, n, m); m += 1; }
  }
}

// int32 lanes of sum over byte pairs of u8 codes * s8 weights (no saturation: codes < 128).
inline __m256i dot_small(__m256i q, __m256i w) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, w), _mm256_set1_epi16(1));
}
// 8-bit codes as q = 128 * (q >> 7) + (q & 127), each part exact in vpmaddubsw: dot(q, w) =
// dot_small(lo, w) + 128 dot_small(hi, w). 4-bit codes need no split (lo = hi = q, hi unused).
struct Codes {
  __m256i lo, hi;
};
template <bool BITS8>
inline Codes codes(__m256i q) {
  if (!BITS8) return {q, q};
  return {_mm256_and_si256(q, _mm256_set1_epi8(0x7F)), _mm256_and_si256(_mm256_srli_epi16(q, 7), _mm256_set1_epi8(1))};
}
template <bool BITS8>
inline __m256i dot(Codes q, __m256i w) {
  if (!BITS8) return dot_small(q.lo, w);
  return _mm256_add_epi32(dot_small(q.lo, w), _mm256_slli_epi32(dot_small(q.hi, w), 7));
}

// NR rows x MB tokens: each block's weights are looked up once for the MB tokens and each token's
// codes loaded (and 8-bit codes split) once for the NR rows; NR = 4 runs at one token (decode),
// NR = 1 for the other rows and token counts. Every row and token gets the same integer sums and
// float steps whatever NR and MB are. With NR = 4 each row's stream is also prefetched into L2 a
// whole number of 4-row tiles, at least 8 KiB, ahead: from DRAM 4096x2048 W4A4 324 -> 170 us,
// 2048x768 66 -> 37-39 (AVX2 code on the AMD EPYC Zen 5 VM, 1 thread); the hardware prefetchers
// alone fall behind on four streams in 4 KiB pages. Only the loops over rows are unrolled
// (CQ_UNROLL): unrolled token loops made the 4-token tile 3-10% slower (16 ymm registers).
template <int NR, int MB, bool BITS8>
void i8_tile(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n, int64_t m0) {
  const int64_t nb = w.KP / 64, rowbytes = w.KP / 2;
  const int64_t G = w.NG == 1 ? w.KP : w.G, GA = a.NA == 1 ? w.KP : a.GA;
  const int64_t S = gcd64(G, GA);
  const uint8_t* p = w.idx + n * rowbytes;
  const int8_t* cb = w.cb8 + n * w.NG * 16;
  const float* sc = w.sc + n * w.NG;
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  __m256i acc[NR][MB], tl[NR], th[NR];
  __m256 accf[NR][MB];
  CQ_UNROLL
  for (int r = 0; r < NR; ++r) {
    tl[r] = th[r] = _mm256_setzero_si256();
    for (int m = 0; m < MB; ++m) {
      acc[r][m] = _mm256_setzero_si256();
      accf[r][m] = _mm256_setzero_ps();
    }
  }
  int64_t gl = -1, gh = -1;
  GroupCursor cg(G, w.NG - 1), fg(G, w.NG - 1), fga(GA, a.NA - 1);  // table groups; flushed segments' groups
  int64_t next_flush = S;  // column where the next segment starts
  const int64_t tile = NR * rowbytes, ahead = tile * ((8192 + tile - 1) / tile);
  auto flush = [&](int64_t col) {  // the segment holding column col ends here
    const int64_t g = fg.at(col), ga = fga.at(col);
    next_flush += S;
    CQ_UNROLL
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MB; ++m) {
        const float f = sc[r * w.NG + g] * a.s[(m0 + m) * a.NA + ga];
        accf[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][m]), _mm256_set1_ps(f), accf[r][m]);
        acc[r][m] = _mm256_setzero_si256();
      }
  };
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t col = 64 * b;
    const int64_t g0 = cg.at(col), g1 = cg.at(col + 32);
    if (g0 != gl) {
      CQ_UNROLL
      for (int r = 0; r < NR; ++r) tl[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(cb + r * w.NG * 16 + 16 * g0)));
      gl = g0;
    }
    if (g1 != gh) {
      CQ_UNROLL
      for (int r = 0; r < NR; ++r) th[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(cb + r * w.NG * 16 + 16 * g1)));
      gh = g1;
    }
    if (NR == 4 && !(b & 1))  // once per 64-byte line of each row: the same line `ahead` bytes on
      for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(p + r * rowbytes + 32 * b + ahead), _MM_HINT_T1);
    __m256i wl[NR], wh[NR];
    CQ_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(p + r * rowbytes + 32 * b));
      wl[r] = _mm256_shuffle_epi8(tl[r], _mm256_and_si256(v, m0f));
      wh[r] = _mm256_shuffle_epi8(th[r], _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f));
    }
    for (int m = 0; m < MB; ++m) {
      const Codes q = codes<BITS8>(_mm256_loadu_si256((const __m256i*)(a.q + (m0 + m) * a.ldq + col)));
      CQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_add_epi32(acc[r][m], dot<BITS8>(q, wl[r]));
    }
    if (col + 32 == next_flush) flush(col);  // the two halves belong to different segments
    for (int m = 0; m < MB; ++m) {
      const Codes q = codes<BITS8>(_mm256_loadu_si256((const __m256i*)(a.q + (m0 + m) * a.ldq + col + 32)));
      CQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_add_epi32(acc[r][m], dot<BITS8>(q, wh[r]));
    }
    if (col + 64 == next_flush || b == nb - 1) flush(col + 32);
  }
  CQ_UNROLL
  for (int r = 0; r < NR; ++r) {
    const float bn = bias ? bias[n + r] : 0.f;
    const float* rs = w.rs8 + (n + r) * a.NA;
    for (int m = 0; m < MB; ++m) {
      float v = hsum8(accf[r][m]);
      const float* s = a.s + (m0 + m) * a.NA;
      const float* z = a.z + (m0 + m) * a.NA;
      for (int64_t g = 0; g < a.NA; ++g) v -= s[g] * z[g] * rs[g];
      y[(m0 + m) * ldy + n + r] = v + bn;
    }
  }
}

template <bool BITS8>
void i8_rows_t(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  if (a.M == 1)
    for (; n0 + 4 <= n1; n0 += 4) i8_tile<4, 1, BITS8>(w, a, y, ldy, bias, n0, 0);
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) i8_tile<1, 4, BITS8>(w, a, y, ldy, bias, n, m);
    if (a.M - m >= 2) { i8_tile<1, 2, BITS8>(w, a, y, ldy, bias, n, m); m += 2; }
    if (a.M - m >= 1) { i8_tile<1, 1, BITS8>(w, a, y, ldy, bias, n, m); m += 1; }
  }
}

void i8_rows(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  if (a.bits >= 8)
    i8_rows_t<true>(w, a, y, ldy, bias, n0, n1);
  else
    i8_rows_t<false>(w, a, y, ldy, bias, n0, n1);
}

// quantize_row_scalar with 8 columns per step (same float32 operations, so bit-identical
// codes); natural column order, group tails scalar.
void quantize_row(const float* x, int64_t K, int bits, int64_t GA, float clip, int64_t KQ, bool interleave, uint8_t* q,
                  float* s, float* z) {
  if (interleave) {  // not used by this ISA's kernels
    quantize_row_scalar(x, K, bits, GA, clip, KQ, interleave, q, s, z);
    return;
  }
  const float qmax = (float)((1 << bits) - 1);
  for (int64_t k = K; k < KQ; ++k) q[k] = 0;
  const __m256 vqmax = _mm256_set1_ps(qmax), vzero = _mm256_setzero_ps();
  for (int64_t a = 0; a * GA < K; ++a) {
    const float* xa = x + a * GA;
    __m256 vmx = _mm256_set1_ps(-CQ_INF), vmn = _mm256_set1_ps(CQ_INF);
    int64_t k = 0;
    for (; k + 8 <= GA; k += 8) {
      const __m256 v = _mm256_loadu_ps(xa + k);
      vmx = _mm256_max_ps(vmx, v);
      vmn = _mm256_min_ps(vmn, v);
    }
    float mxa[8], mna[8];
    _mm256_storeu_ps(mxa, vmx);
    _mm256_storeu_ps(mna, vmn);
    float mx = -CQ_INF, mn = CQ_INF;
    for (int j = 0; j < 8; ++j) {
      mx = max_f(mx, mxa[j]);
      mn = min_f(mn, mna[j]);
    }
    for (int64_t t = k; t < GA; ++t) {
      mx = max_f(mx, xa[t]);
      mn = min_f(mn, xa[t]);
    }
    float scale, zero;
    group_scale_zero(mx, mn, clip, qmax, scale, zero);
    const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero);
    uint8_t* da = q + a * GA;
    for (k = 0; k + 8 <= GA; k += 8) {
      __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xa + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vz), vzero), vqmax);
      const __m256i i = _mm256_cvttps_epi32(r);  // 0..255: pack to bytes
      const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
      _mm_storel_epi64((__m128i*)(da + k), _mm_packus_epi16(w, w));
    }
    for (; k < GA; ++k) da[k] = quantize_value(xa[k], scale, zero, qmax);
    s[a] = scale;
    z[a] = zero;
  }
}

// 8 bf16 weights as float32 (bf16 is the high half of a float32).
inline __m256 load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// Two vectors of 8 weights per step (two accumulators), float32 FMA.
void bf16_rows(const uint16_t* w, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(load_bf16(row + k), _mm256_loadu_ps(xm + k), a0);
        a1 = _mm256_fmadd_ps(load_bf16(row + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
      }
      const __m256 a = _mm256_add_ps(a0, a1);
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      float sum = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
      for (; k < K; ++k) sum += bf16_value(row[k]) * xm[k];
      y[m * ldy + n] = sum;
    }
  }
}

}  // namespace

const Isa isa_avx2 = {"avx2", f32_ok, i8_ok, f32_rows, i8_rows, false, quantize_row, bf16_rows};

}  // namespace cq
#endif
