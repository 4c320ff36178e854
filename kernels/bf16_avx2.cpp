// bf16 rows with AVX2 + FMA, for every x86-64 CPU of the last decade (no bf16 instructions).
// A bf16 is the top half of an fp32, so widening is one bit operation: in each 32-bit lane of
// 16 loaded bf16, `lane << 16` is the even element and `lane & 0xffff0000` the odd one. x is
// laid out once per call with the even and odd elements of each 16-block side by side
// (bf16_avx2_prepare_x), so 32 bytes of weights cost 2 integer operations + 2 FMAs.
#include <immintrin.h>

#include "hcx_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {
inline float widen(uint16_t v) {
  union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
  return bits.f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc_even += even(w[0:16]) * xp[0:8]; acc_odd += odd(w[0:16]) * xp[8:16]
inline void dot16(__m256& even, __m256& odd, const uint16_t* w, const float* xp) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)w);
  even = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xp), even);
  odd = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u))),
                        _mm256_loadu_ps(xp + 8), odd);
}
}  // namespace

void hcx::bf16_avx2_prepare_x(const float* x, int64_t K, float* xp) {
  const int64_t K16 = K & ~(int64_t)15;
  for (int64_t k = 0; k < K16; k += 16) {
    for (int i = 0; i < 8; i++) {
      xp[k + i] = x[k + 2 * i];
      xp[k + 8 + i] = x[k + 2 * i + 1];
    }
  }
  for (int64_t k = K16; k < K; k++) xp[k] = x[k];
}

void hcx::bf16_rows_avx2(const uint16_t* w, const float* xp, int64_t K, int64_t rows, float* y) {
  const int64_t K16 = K & ~(int64_t)15;
  for (int64_t r = 0; r < rows; r++, w += K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K16; k += 32) {
      HCX_PREFETCH(w + k);
      dot16(a0, a1, w + k, xp + k);
      dot16(a2, a3, w + k + 16, xp + k + 16);
    }
    if (k < K16) dot16(a0, a1, w + k, xp + k);
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (k = K16; k < K; k++) sum += widen(w[k]) * xp[k];
    y[r] = sum;
  }
}

#pragma GCC pop_options
