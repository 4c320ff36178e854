// bf16 rows with AVX2 + FMA, for every x86-64 CPU of the last decade (no bf16 instructions).
// A bf16 is the top half of an fp32, so widening is one bit operation: in each 32-bit lane of
// 16 loaded bf16, `lane << 16` is the even element and `lane & 0xffff0000` the odd one. x is
// stored once per call with its even and odd elements of each 16-block side by side
// (bf16_avx2_prepare_x), so a 32-byte load of weights costs 2 integer operations + 2 FMAs.
#include <immintrin.h>

#include "hcx_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {
constexpr int64_t PREFETCH = 512;  // elements ahead in each row

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

template <int R>
inline void dot_rows(const uint16_t* w, const float* xp, int64_t K, float* out) {
  const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  const int64_t K16 = K & ~(int64_t)15;
  for (int64_t k = 0; k < K16; k += 16) {
    const __m256 xe = _mm256_loadu_ps(xp + k), xo = _mm256_loadu_ps(xp + k + 8);
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char*)(w + r * K + k + PREFETCH), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
      acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), xo, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    float sum = hsum(acc[r]);
    for (int64_t k = K16; k < K; k++) sum += widen(w[r * K + k]) * xp[k];
    out[r] = sum;
  }
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
  if (rows == HCX_ROWS) return dot_rows<HCX_ROWS>(w, xp, K, y);
  for (int64_t r = 0; r < rows; r++) dot_rows<1>(w + r * K, xp, K, y + r);
}

#pragma GCC pop_options
