// CodeQuant CPU lookup-table kernels: shared declarations.
//
// Operands are the packed format v1 of src/codequant/format.py, read in place:
//   idx  uint8 [N, KP/2]: per 64-column block, byte j = column 64b+j (low nibble) and
//        column 64b+32+j (high nibble); KP = K rounded up to 64, padding index 0.
//   cb16 float16 [N, NG, 16]: the codebook of group g of row n (float-activation path).
// The integer-activation path reads int8 copies of the codebooks, prepared once per
// weight by the Python wrapper (src/codequant/kernels/cpu/__init__.py):
//   cb8  int8 [N, NG, 16] = round(cb / sc), sc [N, NG] = max|cb| / 127,
//   rs8  float [N, NA]: sum over the columns of activation group a of sc * cb8[idx].
// Integer activations are codes q in 0..2^bits-1 with scale s and zero z per token and
// activation group (exactly quantize_activations), so that
//   y[m, n] = sum_segments sc * s * sum_k cb8[idx_k] * q_k  -  sum_a s * z * rs8[n, a].
//
// The instruction-set files (cq_avx2.cpp, cq_avx512*.cpp) are compiled with their own -m flags
// (setup.py), so nothing they compile may be shared with the baseline files: a header inline
// function or std template instantiated there is a weak symbol the linker may pick for every
// caller, which would put AVX-512 code on the portable path. Hence this header includes no C++
// standard headers, and its helpers are `static inline` (one private copy per file); only the
// `isa_*` tables and cq_*_vbmi's entry point are exported by the instruction-set files.
#pragma once
#include <stddef.h>
#include <stdint.h>

// Unroll the next loop completely. For the loops over a kernel's rows, tokens and accumulators:
// unrolled before GCC's scalar replacement of aggregates, the accumulator arrays live in
// registers; otherwise every step stores and reloads them through the stack (the int8 kernel's
// sums were 2.5x slower from L2 that way). Clang reads the same pragma.
#define CQ_UNROLL _Pragma("GCC unroll 16")

namespace cq {

// The AVX-512 kernels read the indices from a copy interleaved at load time (the Python
// wrapper builds and caches it; the saved format is unchanged): rows padded to
// RB = q_columns(KP) / 2 bytes; rows 4t..4t+3 (t < N / 4) form one tile in which the
// 64-byte pieces of the four rows alternate ([row0 bytes 0-63, row1 0-63, row2, row3,
// row0 bytes 64-127, ...]), so four rows stream from one sequential run of memory; the
// last N % 4 rows follow as plain padded rows. Row n starts at il + n * RB either way.
struct Weight {
  const uint8_t* idx;
  const uint8_t* il;  // interleaved copy (may be null: the AVX-512 path is then not used)
  const uint16_t* cb16;
  const int8_t* cb8;
  const float* sc;
  const float* rs8;
  int64_t N, K, KP, G, NG;
};

// Float activations: x [M, ldx] float32, zero beyond K up to KP.
struct ActF {
  const float* x;
  int64_t ldx;
  int64_t M;
};

// Integer activations: q [M, ldq] uint8 in the layout the kernel asks for (natural, or
// interleaved per 128 columns as [0-31, 64-95, 32-63, 96-127]), zero beyond K;
// s, z [M, NA] per activation group of GA columns (GA = K: per token).
struct ActQ {
  const uint8_t* q;
  int64_t ldq;
  const float* s;
  const float* z;
  int64_t NA, GA, M;
  int bits;
};

// One instruction-set implementation. A kernel pointer is null where the ISA has no
// fast path for the group sizes; `*_ok` tell which configurations the ISA handles.
struct Isa {
  const char* name;
  bool (*f32_ok)(const Weight&);
  bool (*i8_ok)(const Weight&, const ActQ&);
  // Rows [n0, n1) for all M tokens; y[m * ldy + n] = dot + bias[n] (bias may be null).
  void (*f32_rows)(const Weight&, const ActF&, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1);
  void (*i8_rows)(const Weight&, const ActQ&, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1);
  bool q_interleave128;  // activation code layout this ISA's i8_rows reads
  // One token row x[0..K) to integer codes (interleaved per 128 columns when asked, zero
  // up to KQ) with scale s[a] and zero z[a] per activation group of GA columns; every ISA
  // gives codes, scales and zeros bit-identical to quantize_activations.
  void (*quantize_row)(const float* x, int64_t K, int bits, int64_t GA, float clip, int64_t KQ, bool interleave, uint8_t* q,
                       float* s, float* z);
  // A plain bf16 weight w [N, K] (an unquantized lm_head): rows [n0, n1) for M tokens,
  // y[m * ldy + n] = sum_k w[n * K + k] * x[m * ldx + k] in float32.
  void (*bf16_rows)(const uint16_t* w, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n0,
                    int64_t n1);
};

#define CQ_INF __builtin_inff()

// g = c / D, clamped to last, for columns c that only grow: a compare per call instead of a
// 64-bit division (a division per 32 columns was most of the grouped and AVX2 integer kernels'
// time: 10-20 cycles each). In an unnamed namespace: its member functions stay private to each
// file, as the static inline helpers here do.
namespace {
struct GroupCursor {
  int64_t D, last, g = 0, end;
  GroupCursor(int64_t d, int64_t last_group) : D(d), last(last_group), end(d) {}
  int64_t at(int64_t c) {
    while (c >= end) { ++g; end += D; }
    return g < last ? g : last;
  }
};
}  // namespace

// The scalar quantizer (cq_portable.cpp); the SIMD ones fall back to it where they must.
void quantize_row_scalar(const float* x, int64_t K, int bits, int64_t GA, float clip, int64_t KQ, bool interleave,
                         uint8_t* q, float* s, float* z);
// Scale and zero of an activation group with maximum mx and minimum mn, in quantize_activations'
// float32 operations: hi = max(mx, 0) clip, lo = min(mn, 0) clip, s = max((hi - lo) / qmax, 1e-8),
// z = round(-lo / s) (half to even).
// max(a, b) and min(a, b) as std::max / std::min define them (the first argument on ties and NaN).
static inline float max_f(float a, float b) { return a < b ? b : a; }
static inline float min_f(float a, float b) { return b < a ? b : a; }
static inline void group_scale_zero(float mx, float mn, float clip, float qmax, float& scale, float& zero) {
  const float hi = max_f(mx, 0.f) * clip;
  const float lo = min_f(mn, 0.f) * clip;
  scale = (hi - lo) / qmax;
  if (!(scale >= 1e-8f)) scale = 1e-8f;
  zero = __builtin_nearbyintf(-lo / scale);
}
// One code: clamp(round(x / s) + z, 0, qmax).
static inline uint8_t quantize_value(float x, float scale, float zero, float qmax) {
  return (uint8_t)min_f(max_f(__builtin_nearbyintf(x / scale) + zero, 0.f), qmax);
}
// Where a quantizer writes natural-order codes: q itself, or (interleave) a per-thread buffer of
// KQ bytes that interleave128 then copies into q (cq_portable.cpp).
uint8_t* codes_buffer(uint8_t* q, int64_t KQ, bool interleave);
// Reorders natural-order codes tmp[0..KQ) into q as [0-31, 64-95, 32-63, 96-127] per 128 columns.
static inline void interleave128(const uint8_t* tmp, int64_t KQ, uint8_t* q) {
  static const int64_t from[4] = {0, 64, 32, 96};
  for (int64_t c = 0; c < KQ; c += 128)
    for (int j = 0; j < 4; ++j) __builtin_memcpy(q + c + 32 * j, tmp + c + from[j], 32);
}

extern const Isa isa_portable;
extern const Isa isa_avx2;
extern const Isa isa_avx512;
// The AVX-512 "wide" integer kernel compiled for VBMI too (cq_avx512_vbmi.cpp); call only where
// the CPU has AVX-512 VBMI.
void i8_rows_wide_vbmi(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1);

// Switches for tests and experiments (_lut.tune(i, v)); all 0 by default.
enum { TUNE_NO_VBMI = 1 };  // 1: AVX-512 kernels use vpshufb + masks even where vpermb (VBMI) exists
extern int64_t g_tune[8];
// Prefetch every line of a weight stream into L2 ahead of use (set at import on Intel CPUs and AMD
// Zen 5; see the AVX-512 kernels). Zen 4's prefetchers do better with one prefetch per 4 KiB page step.
extern bool g_prefetch_lines;

static inline int64_t q_columns(int64_t KP) { return (KP + 127) / 128 * 128; }

// Start of row n in the interleaved copy and the distance between its 64-byte pieces.
static inline const uint8_t* il_row(const Weight& w, int64_t n, int64_t* step) {
  const int64_t rb = q_columns(w.KP) / 2, n4 = w.N / 4 * 4;
  if (n < n4) {
    *step = 256;
    return w.il + (n & ~(int64_t)3) * rb + (n & 3) * 64;
  }
  *step = 64;
  return w.il + n * rb;
}

static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

static inline float bf16_value(uint16_t v) {
  const uint32_t bits = (uint32_t)v << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

static inline int64_t gcd64(int64_t a, int64_t b) {
  while (b) { int64_t t = a % b; a = b; b = t; }
  return a;
}

}  // namespace cq
