// int8 rows with AVX2 + FMA (weight-only int8: x stays in floating point, no activation
// quantization error). Each 8 weights: one sign-extending load to int32, one conversion, one FMA;
// the per-row scale is applied once to the sum by the caller.
#include <immintrin.h>

#include "hcx_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {
constexpr int64_t PREFETCH = 1024;  // bytes ahead in each row

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

template <int R>
inline void dot_rows(const int8_t* w, const float* x, int64_t K, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  const int64_t K16 = K & ~(int64_t)15;
  for (int64_t k = 0; k < K16; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < R; r++) {
      if ((k & 63) == 0) _mm_prefetch((const char*)(w + r * K + k + PREFETCH), _MM_HINT_T0);
      acc[r] = _mm256_fmadd_ps(widen8(w + r * K + k), x0, acc[r]);
      acc[r] = _mm256_fmadd_ps(widen8(w + r * K + k + 8), x1, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    float sum = hsum(acc[r]);
    for (int64_t k = K16; k < K; k++) sum += (float)w[r * K + k] * x[k];
    out[r] = sum;
  }
}
}  // namespace

void hcx::int8_rows_avx2(const int8_t* w, const float* x, int64_t K, int64_t rows, float* y) {
  if (rows == HCX_ROWS) return dot_rows<HCX_ROWS>(w, x, K, y);
  for (int64_t r = 0; r < rows; r++) dot_rows<1>(w + r * K, x, K, y + r);
}

#pragma GCC pop_options
