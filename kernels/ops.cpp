// torch.ops.hcx_server.*: the one-row (decode) linear kernels as torch operators, one per
// variant, so that tests and benchmarks can call each variant explicitly. This file is the
// only one that includes torch: it checks shapes and CPU features, puts x in the layout the
// variant reads, splits the weight rows over torch's threads and applies scale and bias.
//
//   gemv_bf16_avx512bf16(x, w, b)      bf16 weights; x bf16
//   gemv_bf16_avx2(x, w, b)            bf16 weights; x bf16 or fp32
//   gemv_int8_avx2(x, w, scale, b)     int8 weights, y = (x w^T) * scale + b; x bf16 or fp32,
//                                      rounded to int16 (one absmax scale) for integer products
//   gemv_int8_avx512(x, w, scale, b)   the same with AVX512F/BW
//   quantize_int8(w, q, scale)         WEIGHTS=int8 at load: symmetric int8 per row, into q and scale
//
// x holds ONE row (any leading shape of ones); y has x's shape with the last size N and x's dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "hcx_kernels.h"

namespace {

constexpr int64_t ROWS = 64;  // rows per task: one sequential stream of 64 rows per thread at a time

enum class Variant { bf16_avx512bf16, bf16_avx2, int8_avx2, int8_avx512 };

bool cpu_runs(Variant v) {
  __builtin_cpu_init();
  switch (v) {
    case Variant::bf16_avx512bf16:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    case Variant::int8_avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    default:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

at::Tensor gemv(Variant v, const char* name, const at::Tensor& x, const at::Tensor& w,
                const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(cpu_runs(v), name, ": this CPU lacks the instructions of this kernel variant");
  const bool int8 = v == Variant::int8_avx2 || v == Variant::int8_avx512;
  TORCH_CHECK(w.device().is_cpu() && x.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), name, ": the weight must be a contiguous 2-d tensor");
  TORCH_CHECK(w.scalar_type() == (int8 ? at::kChar : at::kBFloat16), name, ": the weight must be ",
              int8 ? "int8" : "bfloat16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || (x.scalar_type() == at::kFloat && v != Variant::bf16_avx512bf16),
              name, ": x must be bfloat16", v == Variant::bf16_avx512bf16 ? "" : " or float32");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.numel() == K && x.size(-1) == K, name, ": x must be one row of ", K, " values");
  TORCH_CHECK(!int8 || (scale.has_value() && scale->numel() == N), name, ": one scale per weight row");
  TORCH_CHECK(!b.has_value() || b->numel() == N, name, ": one bias per weight row");

  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  at::Tensor xk;  // x in the layout the variant reads
  float x_scale = 1.f;
  if (v == Variant::bf16_avx512bf16) {
    xk = x.contiguous();
  } else {
    at::Tensor xf = x.to(at::kFloat).contiguous();
    const float* X = xf.data_ptr<float>();
    if (v == Variant::bf16_avx2) {
      xk = at::empty({K}, xf.options());
      hcx::bf16_avx2_prepare_x(X, K, xk.data_ptr<float>());
    } else {  // int8: x rounded to int16 with one absmax scale (zero-padded to HCX_INT8_PAD)
      float absmax = 0.f;
      for (int64_t k = 0; k < K; k++) absmax = std::max(absmax, std::abs(X[k]));
      x_scale = absmax > 0.f && std::isfinite(absmax) ? absmax / 32767.f : 1.f;
      const float inverse = 1.f / x_scale;
      const int64_t padded = (K + hcx::HCX_INT8_PAD - 1) / hcx::HCX_INT8_PAD * hcx::HCX_INT8_PAD;
      xk = at::zeros({padded}, xf.options().dtype(at::kShort));
      int16_t* Q = xk.data_ptr<int16_t>();
      for (int64_t k = 0; k < K; k++) Q[k] = (int16_t)std::lrintf(X[k] * inverse);
    }
  }
  at::Tensor sc = int8 ? scale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bias = b.has_value() ? b->to(at::kFloat).contiguous() : at::Tensor();
  const float* S = sc.defined() ? sc.data_ptr<float>() : nullptr;
  const float* B = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const void* W = w.data_ptr();
  const void* X = xk.data_ptr();
  const bool out_bf16 = y.scalar_type() == at::kBFloat16;
  void* Y = y.data_ptr();

  // torch's own OpenMP pool and thread count; dynamic tasks of ROWS contiguous rows, so that a
  // thread the OS preempts (cores shared with other work) delays the product by one task only
  const int64_t tasks = (N + ROWS - 1) / ROWS;
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks / 4));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; task++) {
    float out[ROWS];
    const int64_t n0 = task * ROWS, rows = std::min<int64_t>(ROWS, N - n0);
    switch (v) {
      case Variant::bf16_avx512bf16:
        hcx::bf16_rows_avx512bf16((const uint16_t*)W + n0 * K, (const uint16_t*)X, K, rows, out);
        break;
      case Variant::bf16_avx2:
        hcx::bf16_rows_avx2((const uint16_t*)W + n0 * K, (const float*)X, K, rows, out);
        break;
      case Variant::int8_avx2:
        hcx::int8_rows_avx2((const int8_t*)W + n0 * K, (const int16_t*)X, K, rows, out);
        break;
      case Variant::int8_avx512:
        hcx::int8_rows_avx512((const int8_t*)W + n0 * K, (const int16_t*)X, K, rows, out);
        break;
    }
    for (int64_t r = 0; r < rows; r++) {
      const float value = out[r] * x_scale * (S ? S[n0 + r] : 1.f) + (B ? B[n0 + r] : 0.f);
      if (out_bf16) ((uint16_t*)Y)[n0 + r] = to_bf16(value);
      else ((float*)Y)[n0 + r] = value;
    }
  }
  return y;
}

at::Tensor gemv_bf16_avx512bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  return gemv(Variant::bf16_avx512bf16, "gemv_bf16_avx512bf16", x, w, std::nullopt, b);
}
at::Tensor gemv_bf16_avx2(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  return gemv(Variant::bf16_avx2, "gemv_bf16_avx2", x, w, std::nullopt, b);
}
at::Tensor gemv_int8_avx2(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                          const std::optional<at::Tensor>& b) {
  return gemv(Variant::int8_avx2, "gemv_int8_avx2", x, w, scale, b);
}
at::Tensor gemv_int8_avx512(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const std::optional<at::Tensor>& b) {
  return gemv(Variant::int8_avx512, "gemv_int8_avx512", x, w, scale, b);
}

// WEIGHTS=int8 at load: symmetric int8 per row (int8_quantize_row_avx2), rows over the threads.
void quantize_int8(const at::Tensor& w, at::Tensor& q, at::Tensor& scale) {
  TORCH_CHECK(cpu_runs(Variant::int8_avx2), "quantize_int8: this CPU lacks AVX2 + FMA");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
              (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat),
              "quantize_int8: a contiguous 2-d bfloat16 or float32 CPU tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.numel() == N * K && scale.scalar_type() == at::kFloat &&
              scale.is_contiguous() && scale.numel() == N, "quantize_int8: q int8 like w, scale float32 [rows]");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const uint16_t* W16 = bf16 ? (const uint16_t*)w.data_ptr() : nullptr;
  const float* W32 = bf16 ? nullptr : w.data_ptr<float>();
  int8_t* Q = q.data_ptr<int8_t>();
  float* S = scale.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<uint32_t> row(bf16 ? K : 0);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      const float* values = W32 ? W32 + n * K : nullptr;
      if (bf16) {  // widening is a shift: a bf16 is the top half of an fp32
        for (int64_t k = 0; k < K; k++) row[k] = (uint32_t)W16[n * K + k] << 16;
        values = (const float*)row.data();
      }
      S[n] = hcx::int8_quantize_row_avx2(values, K, Q + n * K);
    }
  }
}

}  // namespace

TORCH_LIBRARY(hcx_server, m) {
  m.def("quantize_int8(Tensor w, Tensor(a!) q, Tensor(b!) scale) -> ()");
  m.def("gemv_bf16_avx512bf16(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("gemv_bf16_avx2(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("gemv_int8_avx2(Tensor x, Tensor w, Tensor scale, Tensor? b) -> Tensor");
  m.def("gemv_int8_avx512(Tensor x, Tensor w, Tensor scale, Tensor? b) -> Tensor");
}

TORCH_LIBRARY_IMPL(hcx_server, CPU, m) {
  m.impl("quantize_int8", &quantize_int8);
  m.impl("gemv_bf16_avx512bf16", &gemv_bf16_avx512bf16);
  m.impl("gemv_bf16_avx2", &gemv_bf16_avx2);
  m.impl("gemv_int8_avx2", &gemv_int8_avx2);
  m.impl("gemv_int8_avx512", &gemv_int8_avx512);
}
