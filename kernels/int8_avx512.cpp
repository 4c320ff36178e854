// int8 rows with AVX512F + AVX512BW: as the AVX2 variant, 16 weights per step, masked tails.
#include <immintrin.h>

#include "hcx_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

namespace {
constexpr int64_t PREFETCH = 1024;  // bytes ahead in each row

template <int R>
inline void dot_rows(const int8_t* w, const float* x, int64_t K, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    for (int r = 0; r < R; r++) {
      if ((k & 63) == 0) _mm_prefetch((const char*)(w + r * K + k + PREFETCH), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))), x0, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))), x1, acc[r]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    for (int r = 0; r < R; r++) {
      const __m128i v = _mm_maskz_loadu_epi8(m, w + r * K + k);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
}  // namespace

void hcx::int8_rows_avx512(const int8_t* w, const float* x, int64_t K, int64_t rows, float* y) {
  if (rows == HCX_ROWS) return dot_rows<HCX_ROWS>(w, x, K, y);
  for (int64_t r = 0; r < rows; r++) dot_rows<1>(w + r * K, x, K, y + r);
}

#pragma GCC pop_options
