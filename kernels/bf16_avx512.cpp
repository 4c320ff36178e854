// bf16 x bf16 rows with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and accumulates in fp32.
// Decode reads each weight once per token, so this loop is bound by memory bandwidth; it reads
// the weights at ~90 % of torch.sum's rate where torch's own bf16 matrix-vector product
// (oneDNN) reaches about half (see `hcx-cli bench --kernels`).
#include <immintrin.h>

#include "hcx_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

namespace {
constexpr int64_t PREFETCH = 512;  // elements (1 KB) ahead in each row: +5-10 % bandwidth here

template <int R>
inline void dot_rows(const uint16_t* w, const uint16_t* x, int64_t K, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char*)(w + r * K + k + PREFETCH), _MM_HINT_T0);  // never faults, even past the end
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * K + k), xv);
    }
  }
  if (k < K) {
    __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
    for (int r = 0; r < R; r++)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * K + k), xv);
  }
  for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
}  // namespace

void hcx::bf16_rows_avx512bf16(const uint16_t* w, const uint16_t* x, int64_t K, int64_t rows, float* y) {
  if (rows == HCX_ROWS) return dot_rows<HCX_ROWS>(w, x, K, y);
  for (int64_t r = 0; r < rows; r++) dot_rows<1>(w + r * K, x, K, y + r);
}

#pragma GCC pop_options
