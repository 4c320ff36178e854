// Row kernels for one-row (decode) linear layers: y[r] = dot(W[r, :], x) for r < rows.
//
// Plain C++ over raw pointers, no torch headers, so each variant file compiles in about a second;
// ops.cpp (the only file that includes torch) checks shapes, puts x in the layout a variant
// reads, splits the rows over torch's threads and applies scales and bias. Each variant file sets
// its own instruction set with `#pragma GCC target` around its functions, so ONE library holds
// every variant and the caller picks one at load from the CPU flags; a variant only ever runs on
// a CPU that has its instructions.
//
// W is row-major with K columns. The kernels walk the rows one after another, so a thread reads
// one sequential stream (what the hardware prefetchers follow best; measured faster than
// interleaving 8 rows), with 4 independent accumulators per row to hide the FMA latency, and
// prefetch HCX_PREFETCH bytes ahead (past the row's end is the next row: the rows are contiguous).
// The prefetch is what lifts a core above a plain streaming loop such as torch.sum: one core's
// hardware prefetcher keeps too few lines in flight (measured on Zen 4: +20-40 %).
#pragma once
#include <cstdint>

#define HCX_PREFETCH(p) _mm_prefetch((const char*)(p) + 4096, _MM_HINT_T0)  // never faults

namespace hcx {

// bf16 weights (uint16 bit patterns) x bf16 x, AVX512F/BW/VL + AVX512-BF16 (vdpbf16ps).
void bf16_rows_avx512bf16(const uint16_t* w, const uint16_t* x, int64_t K, int64_t rows, float* y);

// bf16 weights x fp32 x in the layout of bf16_avx2_prepare_x, AVX2 + FMA.
void bf16_avx2_prepare_x(const float* x, int64_t K, float* xp);
void bf16_rows_avx2(const uint16_t* w, const float* xp, int64_t K, int64_t rows, float* y);

// int8 weights x int16 x (ops.cpp rounds x to int16 with one absmax scale per call; the weights'
// own int8 rounding is ~100x coarser): exact integer dot products, returned as floats.
// x holds K values padded with zeros to a multiple of HCX_INT8_PAD.
constexpr int64_t HCX_INT8_PAD = 64;
void int8_rows_avx2(const int8_t* w, const int16_t* x, int64_t K, int64_t rows, float* y);
void int8_rows_avx512(const int8_t* w, const int16_t* x, int64_t K, int64_t rows, float* y);

// WEIGHTS=int8 at load: one row to symmetric int8 (q = round-half-even(w / scale), scale =
// absmax / 127, as torch would compute it), AVX2; returns the scale.
float int8_quantize_row_avx2(const float* row, int64_t K, int8_t* q);

}  // namespace hcx
