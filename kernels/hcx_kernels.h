// Row kernels for one-row (decode) linear layers: y[r] = dot(W[r, :], x) for r < rows.
//
// Plain C++ over raw pointers, no torch headers, so each variant file compiles in about a second;
// ops.cpp (the only file that includes torch) checks shapes, splits the rows over threads and
// applies scale and bias. Each variant file sets its own instruction set with
// `#pragma GCC target` around its functions, so ONE library holds every variant and the caller
// picks one at load from the CPU flags; a variant only runs on a CPU that has its instructions.
//
// W is row-major with K columns (row stride K). `rows` is at most HCX_ROWS: the kernels read
// that many weight rows at once (8 read streams per thread, x loaded once per step).
#pragma once
#include <cstdint>

#define HCX_ROWS 8

namespace hcx {

// bf16 weights (uint16 bit patterns), bf16 x, AVX512F + AVX512BW + AVX512-BF16 (vdpbf16ps).
void bf16_rows_avx512bf16(const uint16_t* w, const uint16_t* x, int64_t K, int64_t rows, float* y);

// bf16 weights, fp32 x in the layout of bf16_avx2_prepare_x, AVX2 + FMA.
void bf16_avx2_prepare_x(const float* x, int64_t K, float* xp);
void bf16_rows_avx2(const uint16_t* w, const float* xp, int64_t K, int64_t rows, float* y);

// int8 weights (the caller multiplies by the per-row scale), fp32 x.
void int8_rows_avx2(const int8_t* w, const float* x, int64_t K, int64_t rows, float* y);
void int8_rows_avx512(const int8_t* w, const float* x, int64_t K, int64_t rows, float* y);

}  // namespace hcx
