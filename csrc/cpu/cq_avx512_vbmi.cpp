// The wide AVX-512 integer kernel (cq_avx512_wide.h) with vpermb lookups: compiled with the
// AVX-512 flags plus -mavx512vbmi (setup.py); cq_avx512.cpp calls it only on CPUs with VBMI.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cq_kernels.h"

namespace cq {
namespace {
#define CQ_VBMI 1
#include "cq_avx512_wide.h"
#undef CQ_VBMI
}  // namespace

void i8_rows_wide_vbmi(const Weight& w, const ActQ& a, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  i8_rows_wide(w, a, y, ldy, bias, n0, n1);
}

}  // namespace cq
#endif
