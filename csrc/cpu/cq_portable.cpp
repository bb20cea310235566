// Portable scalar kernels: every group size, every activation group, any K. Always
// correct; the SIMD files fall back here for configurations they do not handle.
#include <math.h>

#include <vector>

#include "cq_kernels.h"

namespace cq {

uint8_t* codes_buffer(uint8_t* q, int64_t KQ, bool interleave) {
  if (!interleave) return q;
  thread_local std::vector<uint8_t> tmp;
  if ((int64_t)tmp.size() < KQ) tmp.resize(KQ);
  return tmp.data();
}

// Per-token (per-group) asymmetric min-max quantization, operation for operation the
// float32 arithmetic of quantize_activations (round half to even), so codes, scales and
// zeros are bit-identical. The SIMD quantizers do the same operations lane-wise.
void quantize_row_scalar(const float* x, int64_t K, int bits, int64_t GA, float clip, int64_t KQ, bool interleave,
                         uint8_t* q, float* s, float* z) {
  const float qmax = (float)((1 << bits) - 1);
  uint8_t* dst = codes_buffer(q, KQ, interleave);
  for (int64_t k = K; k < KQ; ++k) dst[k] = 0;
  for (int64_t a = 0; a * GA < K; ++a) {
    const float* xa = x + a * GA;
    float mx = -INFINITY, mn = INFINITY;
    for (int64_t k = 0; k < GA; ++k) {
      mx = max_f(mx, xa[k]);
      mn = min_f(mn, xa[k]);
    }
    float scale, zero;
    group_scale_zero(mx, mn, clip, qmax, scale, zero);
    for (int64_t k = 0; k < GA; ++k) dst[a * GA + k] = quantize_value(xa[k], scale, zero, qmax);
    s[a] = scale;
    z[a] = zero;
  }
  if (interleave) interleave128(dst, KQ, q);
}

namespace {

inline int nibble(const uint8_t* row, int64_t k) {
  const uint8_t b = row[(k >> 6) * 32 + (k & 31)];
  return (k & 32) ? (b >> 4) : (b & 15);
}

bool f32_ok(const Weight&) { return true; }
bool i8_ok(const Weight&, const ActQ&) { return true; }

void f32_rows(const Weight& w, const ActF& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  float table[16];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.idx + n * (w.KP / 2);
    const uint16_t* cb = w.cb16 + n * w.NG * 16;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.ldx;
      double acc = 0.0;
      for (int64_t g = 0; g < w.NG; ++g) {
        for (int c = 0; c < 16; ++c) table[c] = half_to_float(cb[g * 16 + c]);
        float part = 0.f;
        for (int64_t k = g * w.G; k < (g + 1) * w.G; ++k) part += table[nibble(row, k)] * x[k];
        acc += part;
      }
      y[m * ldy + n] = (float)acc + (bias ? bias[n] : 0.f);
    }
  }
}

void i8_rows(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  const int64_t seg = gcd64(w.G, a.GA);  // columns sharing one codebook scale and one activation scale
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.idx + n * (w.KP / 2);
    const int8_t* cb = w.cb8 + n * w.NG * 16;
    const float* sc = w.sc + n * w.NG;
    const float* rs = w.rs8 + n * a.NA;
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* q = a.q + m * a.ldq;
      const float* s = a.s + m * a.NA;
      const float* z = a.z + m * a.NA;
      float acc = 0.f;
      for (int64_t k0 = 0; k0 < w.K; k0 += seg) {
        const int8_t* t = cb + (k0 / w.G) * 16;
        int32_t dot = 0;
        for (int64_t k = k0; k < k0 + seg; ++k) dot += (int32_t)t[nibble(row, k)] * (int32_t)q[k];
        acc += (float)dot * (sc[k0 / w.G] * s[k0 / a.GA]);
      }
      for (int64_t g = 0; g < a.NA; ++g) acc -= s[g] * z[g] * rs[g];
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

void bf16_rows(const uint16_t* w, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t k = 0;
      for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; ++j) acc[j] += bf16_value(row[k + j]) * xm[k + j];
      for (; k < K; ++k) acc[0] += bf16_value(row[k]) * xm[k];
      y[m * ldy + n] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  }
}

}  // namespace

const Isa isa_portable = {"portable", f32_ok, i8_ok, f32_rows, i8_rows, false, quantize_row_scalar, bf16_rows};

}  // namespace cq
