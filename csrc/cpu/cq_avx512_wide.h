// The "wide" integer-activation AVX-512 kernel, included inside an anonymous namespace by two
// files: cq_avx512.cpp with CQ_VBMI 0 (vpshufb lookups, AVX-512 F/BW/VNNI) and
// cq_avx512_vbmi.cpp with CQ_VBMI 1, compiled with -mavx512vbmi too (vpermb lookups), so that
// no VBMI instruction can reach the functions that run on AVX-512 CPUs without it.
//
// Codebook groups whole rows or multiples of 128 columns, activation groups whole rows or multiples
// of 64 (HALF below for the odd multiples): one table per row and 128-column step. NR rows x MB tokens per pass (activation codes loaded once per
// NR rows, unpacked weights used for MB tokens); int32 sums are scaled into float at the
// end of each segment of columns sharing the codebook scale and the activation scale.
// With NR = 4 the four rows' sums are reduced together and scaled as one 4-lane vector
// (same float operations per row as the scalar form); with MB = 1 the low and high
// nibbles accumulate into separate registers (two dependency chains per row). The first
// token block prefetches (see below); later blocks find the tile in L1.

// [sum(b0), sum(b1), sum(b2), sum(b3)] of int32 lanes.
inline __m128i hsum4_epi32(__m256i b0, __m256i b1, __m256i b2, __m256i b3) {
  const __m256i d = _mm256_hadd_epi32(_mm256_hadd_epi32(b0, b1), _mm256_hadd_epi32(b2, b3));
  return _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
}
inline __m256i lo256(__m512i a) { return _mm512_castsi512_si256(a); }
inline __m256i hi256(__m512i a) { return _mm512_extracti64x4_epi64(a, 1); }
inline __m256i both256(__m512i a) { return _mm256_add_epi32(lo256(a), hi256(a)); }

// HALF: activation groups of an odd multiple of 64 columns. The codes of a 128-column step are stored
// [0-31, 64-95, 32-63, 96-127], so int32 lanes 0-7 of each accumulator sum columns 0-63 of the step and
// lanes 8-15 columns 64-127: every step is flushed, each 256-bit half with its own activation scale.
template <int NR, int MB, bool HALF>
void i8_wide(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n, int64_t m0) {
  constexpr int NACC = MB == 1 ? 2 : 1;  // accumulators per row and token
  const int64_t KQ = q_columns(w.KP), nsteps = KQ / 128;
  const int64_t G = w.NG == 1 ? KQ : w.G, GA = a.NA == 1 ? KQ : a.GA;
  const int64_t S = HALF ? 128 : gcd64(G, GA);
  int64_t step;
  const uint8_t* p = il_row(w, n, &step);
  const bool stream = a.M == 1 && ((uintptr_t)p & 63) == 0;
  const int8_t* cb = w.cb8 + n * w.NG * 16;
  const float* sc = w.sc + n * w.NG;
#if !CQ_VBMI
  const __m512i m0f = _mm512_set1_epi8(0x0F);
#endif
  __m512i acc[NR][MB][NACC];
  float part[NR][MB];    // NR = 1
  __m128 part4[MB];      // NR = 4: the four rows' partial results
  CQ_UNROLL
  for (int r = 0; r < NR; ++r)
    CQ_UNROLL
    for (int m = 0; m < MB; ++m) {
      CQ_UNROLL
      for (int j = 0; j < NACC; ++j) acc[r][m][j] = _mm512_setzero_si512();
      part[r][m] = 0.f;
    }
  for (int m = 0; m < MB; ++m) part4[m] = _mm_setzero_ps();
  if (m0 == 0) {  // the small per-row streams (int8 codebooks, scales, row sums), 8 rows ahead:
    _mm_prefetch((const char*)(cb + 8 * w.NG * 16), _MM_HINT_T0);  // their misses stall a whole tile
    _mm_prefetch((const char*)(sc + 8 * w.NG), _MM_HINT_T0);
    _mm_prefetch((const char*)(w.rs8 + (n + 8) * a.NA), _MM_HINT_T0);
  }
  __m512i tab[NR];
  int64_t next_group = 0, next_flush = S;  // column where the next codebook / segment starts
  for (int64_t s = 0; s < nsteps; ++s) {
    const int64_t col = 128 * s;
    if (col == next_group) {
      CQ_UNROLL
      for (int r = 0; r < NR; ++r)
        tab[r] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(cb + r * w.NG * 16 + 16 * (col / G))));
      next_group += G;
    }
    __m512i wlo[NR], whi[NR];
    // L2 prefetches in the index stream. AMD (Zen 4): one per step, 4 KiB ahead: it starts the
    // next page's stream (TLB walk, DRAM) before the hardware prefetcher, which stops at 4 KiB
    // pages, gets there (-5 to -13% time for the 0.8 MB expert matrices from DRAM; prefetching
    // into L1 instead, or every line, made it slower). Intel (g_prefetch_lines; Sapphire Rapids):
    // every line, 8 KiB ahead (from DRAM 9.0-10.1 -> 11.9-12.5 GB/s at 1 thread, 16.9-19.5 ->
    // 23.2-24.2 GB/s at 2, W4A8 4096x2048, 2048x4096, 1536x2048). AMD Zen 5 too (W4A8 2048x768
    // from DRAM, 1 thread: 41-43 -> 34-37 us a call from Python; end to end e2e-cpu-prefetch-epyc.json).
    if (m0 == 0) {
      if (g_prefetch_lines)
        for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(p + s * step + r * 64 + 8192), _MM_HINT_T1);
      else
        _mm_prefetch((const char*)(p + s * step + 4096), _MM_HINT_T1);
    }
    CQ_UNROLL
    for (int r = 0; r < NR; ++r) {
      // padded: whole 64-byte pieces. At one token (decode) each piece is used once: a
      // non-temporal load where aligned (-2 to -5% time from DRAM, and the stream leaves more
      // of the caches to the code between kernel calls).
      const void* piece = (const void*)(p + s * step + r * 64);
      const __m512i v = stream ? _mm512_stream_load_si512((void*)piece) : _mm512_loadu_si512(piece);
#if CQ_VBMI  // vpermb reads 6 index bits and the table repeats every 16 bytes: no masks
      wlo[r] = _mm512_permutexvar_epi8(v, tab[r]);
      whi[r] = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), tab[r]);
#else
      wlo[r] = _mm512_shuffle_epi8(tab[r], _mm512_and_si512(v, m0f));
      whi[r] = _mm512_shuffle_epi8(tab[r], _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f));
#endif
    }
    CQ_UNROLL
    for (int m = 0; m < MB; ++m) {
      const uint8_t* q = a.q + (m0 + m) * a.ldq + col;
      const __m512i ql = _mm512_loadu_si512((const void*)q), qh = _mm512_loadu_si512((const void*)(q + 64));
      CQ_UNROLL
      for (int r = 0; r < NR; ++r) {
        acc[r][m][0] = _mm512_dpbusd_epi32(acc[r][m][0], ql, wlo[r]);
        acc[r][m][NACC - 1] = _mm512_dpbusd_epi32(acc[r][m][NACC - 1], qh, whi[r]);
      }
    }
    if (col + 128 == next_flush || s == nsteps - 1) {
      next_flush += S;
      if (NACC == 2) {
        CQ_UNROLL
        for (int r = 0; r < NR; ++r)
          CQ_UNROLL
          for (int m = 0; m < MB; ++m) acc[r][m][0] = _mm512_add_epi32(acc[r][m][0], acc[r][m][NACC - 1]);
      }
      // activation groups of the step's two halves (HALF; glo alone otherwise); past K: zero codes
      const int64_t glo = col / GA, ghi = (col + 64) / GA < a.NA ? (col + 64) / GA : glo;
      if (NR == 4) {
        const __m128 scg = _mm_set_ps(sc[3 * w.NG + col / G], sc[2 * w.NG + col / G], sc[w.NG + col / G], sc[col / G]);
        CQ_UNROLL
        for (int m = 0; m < MB; ++m) {
          const float* sm = a.s + (m0 + m) * a.NA;
          if (HALF) {
            const __m128i lo = hsum4_epi32(lo256(acc[0][m][0]), lo256(acc[1 % NR][m][0]), lo256(acc[2 % NR][m][0]), lo256(acc[3 % NR][m][0]));
            const __m128i hi = hsum4_epi32(hi256(acc[0][m][0]), hi256(acc[1 % NR][m][0]), hi256(acc[2 % NR][m][0]), hi256(acc[3 % NR][m][0]));
            part4[m] = _mm_add_ps(part4[m], _mm_mul_ps(_mm_cvtepi32_ps(lo), _mm_mul_ps(scg, _mm_set1_ps(sm[glo]))));
            part4[m] = _mm_add_ps(part4[m], _mm_mul_ps(_mm_cvtepi32_ps(hi), _mm_mul_ps(scg, _mm_set1_ps(sm[ghi]))));
          } else {
            const __m128i sums = hsum4_epi32(both256(acc[0][m][0]), both256(acc[1 % NR][m][0]), both256(acc[2 % NR][m][0]), both256(acc[3 % NR][m][0]));
            part4[m] = _mm_add_ps(part4[m], _mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_mul_ps(scg, _mm_set1_ps(sm[glo]))));
          }
        }
      } else {
        CQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          const float scg = sc[r * w.NG + col / G];
          CQ_UNROLL
          for (int m = 0; m < MB; ++m) {
            const float* sm = a.s + (m0 + m) * a.NA;
            if (HALF) {
              part[r][m] += (float)_mm512_mask_reduce_add_epi32(0x00FF, acc[r][m][0]) * (scg * sm[glo]);
              part[r][m] += (float)_mm512_mask_reduce_add_epi32(0xFF00, acc[r][m][0]) * (scg * sm[ghi]);
            } else {
              part[r][m] += (float)_mm512_reduce_add_epi32(acc[r][m][0]) * (scg * sm[glo]);
            }
          }
        }
      }
      CQ_UNROLL
      for (int r = 0; r < NR; ++r)
        CQ_UNROLL
        for (int m = 0; m < MB; ++m)
          CQ_UNROLL
          for (int j = 0; j < NACC; ++j) acc[r][m][j] = _mm512_setzero_si512();
    }
  }
  if (NR == 4 && a.NA == 1) {  // v = part - s * z * rs8 + bias, four rows at once
    const __m128 rs = _mm_loadu_ps(w.rs8 + n);
    const __m128 bn = bias ? _mm_loadu_ps(bias + n) : _mm_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      const __m128 sz = _mm_set1_ps(a.s[m0 + m] * a.z[m0 + m]);
      _mm_storeu_ps(y + (m0 + m) * ldy + n, _mm_add_ps(_mm_sub_ps(part4[m], _mm_mul_ps(sz, rs)), bn));
    }
    return;
  }
  if (NR == 4)
    for (int m = 0; m < MB; ++m) {
      float t[4];
      _mm_storeu_ps(t, part4[m]);
      for (int r = 0; r < NR; ++r) part[r][m] = t[r];
    }
  for (int r = 0; r < NR; ++r) {
    const float bn = bias ? bias[n + r] : 0.f;
    const float* rs = w.rs8 + (n + r) * a.NA;
    for (int m = 0; m < MB; ++m) {
      float v = part[r][m];
      const float* sm = a.s + (m0 + m) * a.NA;
      const float* zm = a.z + (m0 + m) * a.NA;
      for (int64_t g = 0; g < a.NA; ++g) v -= sm[g] * zm[g] * rs[g];
      y[(m0 + m) * ldy + n + r] = v + bn;
    }
  }
}

template <int NR, bool HALF>
void i8_wide_tiles(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) i8_wide<NR, 4, HALF>(w, a, y, ldy, bias, n, m);
  if (a.M - m >= 2) { i8_wide<NR, 2, HALF>(w, a, y, ldy, bias, n, m); m += 2; }
  if (a.M - m >= 1) { i8_wide<NR, 1, HALF>(w, a, y, ldy, bias, n, m); m += 1; }
}

template <bool HALF>
void i8_rows_wide_as(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) i8_wide_tiles<4, HALF>(w, a, y, ldy, bias, n);
  for (; n < n1; ++n) i8_wide_tiles<1, HALF>(w, a, y, ldy, bias, n);
}

// Codebook groups of whole rows or multiples of 128 columns; activation groups of whole rows or multiples of 64.
void i8_rows_wide(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  if (a.NA > 1 && a.GA % 128)
    i8_rows_wide_as<true>(w, a, y, ldy, bias, n0, n1);
  else
    i8_rows_wide_as<false>(w, a, y, ldy, bias, n0, n1);
}
