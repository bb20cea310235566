// AVX-512 kernels (F/BW/VL/VNNI/DQ + F16C/FMA), compiled with those -m flags (setup.py) and
// called only after the runtime check in cq_module.cpp; includes no C++ standard headers (see
// cq_kernels.h).
//
// Float activations (W4A16): 16 float centroids live in one zmm; vpermps looks up 16
// columns at once (it reads only the low 4 bits of each index, so the low nibble needs
// no mask and the high nibble one shift).
// Integer activations (W4A8/W4A4): one 64-byte load holds two 64-column blocks; the low
// and high nibbles index a 16-byte int8 codebook with vpshufb (vpermb where the CPU has
// VBMI: cq_avx512_vbmi.cpp, the same kernel cq_avx512_wide.h compiled with -mavx512vbmi),
// and vpdpbusd multiplies the int8 weights with the uint8 activation codes, which the
// caller stores interleaved per 128 columns ([0-31, 64-95, 32-63, 96-127]) so they line up
// with the nibbles.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cq_kernels.h"

namespace cq {
namespace {

bool f32_ok(const Weight& w) { return w.il && (w.NG == 1 || w.G % 32 == 0); }

// Codebook groups of whole rows or multiples of 128 columns and activation groups of whole rows or
// multiples of 64 ("wide": one table per 128-column step), or multiples of 32 ("narrow").
inline bool wide_ok(int64_t g, int64_t k) { return g == k || g % 128 == 0; }
bool i8_ok(const Weight& w, const ActQ& a) {
  return w.il && (w.NG == 1 || w.G % 32 == 0) && (a.NA == 1 || a.GA % 32 == 0);
}

template <int MB>
void f32_block(const Weight& w, const ActF& a, float* y, int64_t ldy, const float* bias, int64_t n, int64_t m0) {
  constexpr int NA = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  const int64_t nb = w.KP / 64;
  const uint8_t* p = w.idx + n * (w.KP / 2);
  const uint16_t* cbrow = w.cb16 + n * w.NG * 16;
  const float* x = a.x + m0 * a.ldx;
  __m512 acc[MB][NA];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm512_setzero_ps();
  const bool whole = w.NG == 1 || w.G % 64 == 0;
  const int64_t bpg = w.NG == 1 ? nb : w.G / 64;
  __m512 cb0 = _mm512_setzero_ps(), cb1 = _mm512_setzero_ps();
  GroupCursor cg(w.G, w.NG - 1);
  for (int64_t b = 0; b < nb; ++b) {
    if (whole) {
      if (b % bpg == 0) {
        cb0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(cbrow + 16 * (b / bpg))));
        cb1 = cb0;
      }
    } else {  // G a multiple of 32: the low nibbles (first 32 columns) and the high ones may differ
      const int64_t g0 = cg.at(64 * b), g1 = cg.at(64 * b + 32);
      cb0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(cbrow + 16 * g0)));
      cb1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(cbrow + 16 * g1)));
    }
    const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 32 * b)));
    const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 32 * b + 16)));
    const __m512 w0 = _mm512_permutexvar_ps(i0, cb0);
    const __m512 w1 = _mm512_permutexvar_ps(i1, cb0);
    const __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), cb1);
    const __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), cb1);
    const float* xb = x + 64 * b;
    for (int m = 0; m < MB; ++m) {
      const float* xm = xb + m * a.ldx;
      acc[m][0 % NA] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0 % NA]);
      acc[m][1 % NA] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1 % NA]);
      acc[m][2 % NA] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), acc[m][2 % NA]);
      acc[m][3 % NA] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), acc[m][3 % NA]);
    }
  }
  const float bn = bias ? bias[n] : 0.f;
  for (int m = 0; m < MB; ++m) {
    __m512 s = acc[m][0];
    for (int j = 1; j < NA; ++j) s = _mm512_add_ps(s, acc[m][j]);
    y[(m0 + m) * ldy + n] = _mm512_reduce_add_ps(s) + bn;
  }
}

// NR rows x MB tokens per pass: each activation vector is loaded once for NR rows and
// each unpacked weight vector is used for MB tokens (the activations of many tokens do
// not fit in L1, so reuse across rows is what keeps M > 1 compute-bound). Codebook per
// row or per group of a multiple of 64 columns.
template <int NR, int MB>
void f32_tile(const Weight& w, const ActF& a, float* y, int64_t ldy, const float* bias, int64_t n, int64_t m0) {
  constexpr int NA = MB == 1 ? 2 : 1;
  const int64_t nb = w.KP / 64;
  const int64_t bpg = w.NG == 1 ? nb : w.G / 64;
  int64_t step;  // NR = 4: a tile (rows 64 bytes apart); NR = 1: any single row
  const uint8_t* p = il_row(w, n, &step);
  const uint16_t* cbrow = w.cb16 + n * w.NG * 16;
  const float* x = a.x + m0 * a.ldx;
  __m512 acc[NR][MB][NA];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NA; ++j) acc[r][m][j] = _mm512_setzero_ps();
  __m512 cb[NR];
  for (int64_t b0 = 0, g = 0; b0 < nb; b0 += bpg, ++g) {
    for (int r = 0; r < NR; ++r) cb[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(cbrow + r * w.NG * 16 + 16 * g)));
    const int64_t b1 = b0 + bpg < nb ? b0 + bpg : nb;
    for (int64_t b = b0; b < b1; ++b)
    for (int half = 0; half < 2; ++half) {
      const uint8_t* pb = p + (b >> 1) * step + (b & 1) * 32 + 16 * half;
      __m512i ir[NR];
      for (int r = 0; r < NR; ++r) ir[r] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(pb + r * 64)));
      for (int hi = 0; hi < 2; ++hi) {
        __m512 wv[NR];
        for (int r = 0; r < NR; ++r) wv[r] = _mm512_permutexvar_ps(hi ? _mm512_srli_epi32(ir[r], 4) : ir[r], cb[r]);
        const int64_t col = 64 * b + 16 * half + 32 * hi;
        for (int m = 0; m < MB; ++m) {
          const __m512 xv = _mm512_loadu_ps(x + m * a.ldx + col);
          for (int r = 0; r < NR; ++r) acc[r][m][hi % NA] = _mm512_fmadd_ps(wv[r], xv, acc[r][m][hi % NA]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const float bn = bias ? bias[n + r] : 0.f;
    for (int m = 0; m < MB; ++m) {
      __m512 t = acc[r][m][0];
      for (int j = 1; j < NA; ++j) t = _mm512_add_ps(t, acc[r][m][j]);
      y[(m0 + m) * ldy + n + r] = _mm512_reduce_add_ps(t) + bn;
    }
  }
}

template <int NR>
void f32_tiles(const Weight& w, const ActF& a, float* y, int64_t ldy, const float* bias, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) f32_tile<NR, 4>(w, a, y, ldy, bias, n, m);
  if (a.M - m >= 2) { f32_tile<NR, 2>(w, a, y, ldy, bias, n, m); m += 2; }
  if (a.M - m >= 1) { f32_tile<NR, 1>(w, a, y, ldy, bias, n, m); m += 1; }
}

void f32_rows(const Weight& w, const ActF& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  if (w.NG == 1 || w.G % 64 == 0) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) f32_tiles<4>(w, a, y, ldy, bias, n);
    for (; n < n1; ++n) f32_tiles<1>(w, a, y, ldy, bias, n);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 16 <= a.M; m += 16) f32_block<16>(w, a, y, ldy, bias, n, m);
    if (a.M - m >= 8) { f32_block<8>(w, a, y, ldy, bias, n, m); m += 8; }
    if (a.M - m >= 4) { f32_block<4>(w, a, y, ldy, bias, n, m); m += 4; }
    if (a.M - m >= 2) { f32_block<2>(w, a, y, ldy, bias, n, m); m += 2; }
    if (a.M - m >= 1) { f32_block<1>(w, a, y, ldy, bias, n, m); m += 1; }
  }
}

inline __m512i load_step(const uint8_t* p, int64_t bytes_left) {
  if (bytes_left >= 64) return _mm512_loadu_si512((const void*)p);
  return _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p);  // one 32-byte block left
}

inline __m512i table4(const int8_t* t0, const int8_t* t1) {  // [t0, t0, t1, t1] (16 bytes each)
  const __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t0));
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t1));
  return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

inline float finish(__m512 accf, const ActQ& a, const float* rs, int64_t m) {
  float v = _mm512_reduce_add_ps(accf);
  const float* s = a.s + m * a.NA;
  const float* z = a.z + m * a.NA;
  for (int64_t g = 0; g < a.NA; ++g) v -= s[g] * z[g] * rs[g];
  return v;
}

#define CQ_VBMI 0
#include "cq_avx512_wide.h"
#undef CQ_VBMI

bool has_vbmi() {
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vbmi"));
  return v;
}

void i8_rows_wide_best(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  if (has_vbmi() && !g_tune[TUNE_NO_VBMI])
    i8_rows_wide_vbmi(w, a, y, ldy, bias, n0, n1);
  else
    i8_rows_wide(w, a, y, ldy, bias, n0, n1);
}

// Groups multiples of 32 columns: every 128-column step may see four codebooks and four
// activation scales; the low-nibble and high-nibble halves are scaled separately.
template <int MB>
void i8_narrow(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n, int64_t m0) {
  const int64_t rowbytes = w.KP / 2, KQ = q_columns(w.KP), nsteps = KQ / 128;
  const int64_t G = w.NG == 1 ? KQ : w.G, GA = a.NA == 1 ? KQ : a.GA;
  const uint8_t* p = w.idx + n * rowbytes;
  const int8_t* cb = w.cb8 + n * w.NG * 16;
  const float* sc = w.sc + n * w.NG;
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  __m512 accf[MB];
  CQ_UNROLL
  for (int m = 0; m < MB; ++m) accf[m] = _mm512_setzero_ps();
  GroupCursor cg(G, w.NG - 1), cga(GA, a.NA - 1);
  for (int64_t s = 0; s < nsteps; ++s) {
    const int64_t col = 128 * s;
    int64_t g[4], ga[4];  // groups of the quarters [0-31], [32-63], [64-95], [96-127]
    CQ_UNROLL
    for (int j = 0; j < 4; ++j) {
      g[j] = cg.at(col + 32 * j);
      ga[j] = cga.at(col + 32 * j);
    }
    const __m512i tlo = table4(cb + 16 * g[0], cb + 16 * g[2]);
    const __m512i thi = table4(cb + 16 * g[1], cb + 16 * g[3]);
    const __m512i v = load_step(p + 64 * s, rowbytes - 64 * s);
    const __m512i wlo = _mm512_shuffle_epi8(tlo, _mm512_and_si512(v, m0f));
    const __m512i whi = _mm512_shuffle_epi8(thi, _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f));
    CQ_UNROLL
    for (int m = 0; m < MB; ++m) {
      const uint8_t* q = a.q + (m0 + m) * a.ldq + col;
      const float* sm = a.s + (m0 + m) * a.NA;
      const __m512i dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512((const void*)q), wlo);
      const __m512i dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512((const void*)(q + 64)), whi);
      const __m512 flo = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[g[0]] * sm[ga[0]]), _mm512_set1_ps(sc[g[2]] * sm[ga[2]]));
      const __m512 fhi = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[g[1]] * sm[ga[1]]), _mm512_set1_ps(sc[g[3]] * sm[ga[3]]));
      accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dlo), flo, accf[m]);
      accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dhi), fhi, accf[m]);
    }
  }
  const float bn = bias ? bias[n] : 0.f;
  const float* rs = w.rs8 + n * a.NA;
  CQ_UNROLL
  for (int m = 0; m < MB; ++m) y[(m0 + m) * ldy + n] = finish(accf[m], a, rs, m0 + m) + bn;
}

#define CQ_I8_ROWS(NAME, KERNEL)                                                                       \
  void NAME(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) { \
    for (int64_t n = n0; n < n1; ++n) {                                                                \
      int64_t m = 0;                                                                                   \
      for (; m + 8 <= a.M; m += 8) KERNEL<8>(w, a, y, ldy, bias, n, m);                                \
      if (a.M - m >= 4) { KERNEL<4>(w, a, y, ldy, bias, n, m); m += 4; }                              \
      if (a.M - m >= 2) { KERNEL<2>(w, a, y, ldy, bias, n, m); m += 2; }                              \
      if (a.M - m >= 1) { KERNEL<1>(w, a, y, ldy, bias, n, m); m += 1; }                              \
    }                                                                                                  \
  }

CQ_I8_ROWS(i8_rows_narrow, i8_narrow)

void i8_rows(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  if (wide_ok(w.G, w.K) && (wide_ok(a.GA, w.K) || a.GA % 64 == 0))
    i8_rows_wide_best(w, a, y, ldy, bias, n0, n1);
  else
    i8_rows_narrow(w, a, y, ldy, bias, n0, n1);
}

// quantize_row_scalar lane-wise: the same float32 operations (IEEE division, round half to
// even, add, clamp) on 16 columns at a time, so the codes are bit-identical.
void quantize_row(const float* x, int64_t K, int bits, int64_t GA, float clip, int64_t KQ, bool interleave, uint8_t* q,
                  float* s, float* z) {
  const float qmax = (float)((1 << bits) - 1);
  uint8_t* dst = codes_buffer(q, KQ, interleave);
  for (int64_t k = K; k < KQ; ++k) dst[k] = 0;
  const __m512 vqmax = _mm512_set1_ps(qmax), vzero = _mm512_setzero_ps();
  for (int64_t a = 0; a * GA < K; ++a) {
    const float* xa = x + a * GA;
    __m512 vmx = _mm512_set1_ps(-CQ_INF), vmn = _mm512_set1_ps(CQ_INF);
    int64_t k = 0;
    for (; k + 16 <= GA; k += 16) {
      const __m512 v = _mm512_loadu_ps(xa + k);
      vmx = _mm512_max_ps(vmx, v);
      vmn = _mm512_min_ps(vmn, v);
    }
    if (k < GA) {
      const __mmask16 mk = (__mmask16)((1u << (GA - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mk, xa + k);
      vmx = _mm512_mask_max_ps(vmx, mk, vmx, v);
      vmn = _mm512_mask_min_ps(vmn, mk, vmn, v);
    }
    float scale, zero;
    group_scale_zero(_mm512_reduce_max_ps(vmx), _mm512_reduce_min_ps(vmn), clip, qmax, scale, zero);
    const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zero);
    uint8_t* da = dst + a * GA;
    for (k = 0; k < GA; k += 16) {
      const __mmask16 mk = GA - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (GA - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mk, xa + k);
      __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), vzero), vqmax);
      _mm512_mask_cvtepi32_storeu_epi8(da + k, mk, _mm512_cvttps_epi32(r));
    }
    s[a] = scale;
    z[a] = zero;
  }
  if (interleave) interleave128(dst, KQ, q);
}

// 16 bf16 weights as float32 (bf16 is the high half of a float32).
inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Two vectors of 16 weights per step (two accumulators), float32 FMA. On Intel
// (g_prefetch_lines) each 64-byte line is prefetched into L2 kBf16Prefetch bytes ahead of its
// use (rows are contiguous: one stream): on a Sapphire Rapids VM 8.1 -> 11.6 GB/s at 1 thread,
// 16.4 -> 23.4 GB/s at 2 (a 32000 x 2048 lm_head; into L1 instead: 9.2 / 20.6).
constexpr int64_t kBf16Prefetch = 8192;
void bf16_rows(const uint16_t* w, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        if (g_prefetch_lines) _mm_prefetch((const char*)(row + k) + kBf16Prefetch, _MM_HINT_T1);
        a0 = _mm512_fmadd_ps(load_bf16(row + k), _mm512_loadu_ps(xm + k), a0);
        a1 = _mm512_fmadd_ps(load_bf16(row + k + 16), _mm512_loadu_ps(xm + k + 16), a1);
      }
      const __m512 a = _mm512_add_ps(a0, a1);
      float sum = _mm512_reduce_add_ps(a);
      for (; k < K; ++k) sum += bf16_value(row[k]) * xm[k];
      y[m * ldy + n] = sum;
    }
  }
}

}  // namespace

const Isa isa_avx512 = {"avx512", f32_ok, i8_ok, f32_rows, i8_rows, true, quantize_row, bf16_rows};

}  // namespace cq
#endif
