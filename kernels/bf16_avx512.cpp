// bf16 x bf16 rows with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and accumulates in fp32.
// Decode reads each weight once per token, so this loop is bound by memory bandwidth: it reads
// the weights at ~90 % of torch.sum's rate where torch's own bf16 matrix-vector product (oneDNN)
// reaches about half (`hcx-cli bench --kernels`).
#include <immintrin.h>

#include "hcx_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

namespace {
inline __m512 dot(__m512 acc, const uint16_t* w, const uint16_t* x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}
}  // namespace

void hcx::bf16_rows_avx512bf16(const uint16_t* w, const uint16_t* x, int64_t K, int64_t rows, float* y) {
  for (int64_t r = 0; r < rows; r++, w += K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      HCX_PREFETCH(w + k);
      HCX_PREFETCH(w + k + 32);
      HCX_PREFETCH(w + k + 64);
      HCX_PREFETCH(w + k + 96);
      a0 = dot(a0, w + k, x + k);
      a1 = dot(a1, w + k + 32, x + k + 32);
      a2 = dot(a2, w + k + 64, x + k + 64);
      a3 = dot(a3, w + k + 96, x + k + 96);
    }
    for (; k < K; k += 32) {  // the last one masked
      const __mmask32 m = K - k >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << (K - k)) - 1);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k), (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

#pragma GCC pop_options
