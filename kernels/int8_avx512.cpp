// int8 x int16 rows with AVX512BW: as the AVX2 variant with 32 weights per operation, masked tail.
#include <immintrin.h>

#include "hcx_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

namespace {
constexpr int64_t FLUSH = 4096;  // see int8_avx2.cpp

inline __m512i dot32(__m512i acc, __m256i w, const int16_t* x) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_cvtepi8_epi16(w), _mm512_loadu_si512(x)));
}
}  // namespace

void hcx::int8_rows_avx512(const int8_t* w, const int16_t* x, int64_t K, int64_t rows, float* y) {
  for (int64_t r = 0; r < rows; r++, w += K) {
    __m512 total = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += FLUSH) {
      const int64_t k1 = k0 + FLUSH < K ? k0 + FLUSH : K;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = k0;
      for (; k + 128 <= k1; k += 128) {
        HCX_PREFETCH(w + k);
        HCX_PREFETCH(w + k + 64);
        a0 = dot32(a0, _mm256_loadu_si256((const __m256i*)(w + k)), x + k);
        a1 = dot32(a1, _mm256_loadu_si256((const __m256i*)(w + k + 32)), x + k + 32);
        a2 = dot32(a2, _mm256_loadu_si256((const __m256i*)(w + k + 64)), x + k + 64);
        a3 = dot32(a3, _mm256_loadu_si256((const __m256i*)(w + k + 96)), x + k + 96);
      }
      for (; k < k1; k += 32) {  // x is zero-padded to HCX_INT8_PAD; only the weights need a mask
        const __mmask32 m = k1 - k >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << (k1 - k)) - 1);
        a0 = dot32(a0, _mm256_maskz_loadu_epi8(m, w + k), x + k);
      }
      total = _mm512_add_ps(total, _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(a0, a1),
                                                                        _mm512_add_epi32(a2, a3))));
    }
    y[r] = _mm512_reduce_add_ps(total);
  }
}

#pragma GCC pop_options
