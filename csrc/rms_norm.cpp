// rms_norm: y = x / sqrt(mean(x^2) + eps) * w over the last dimension, float32 (what F.rms_norm
// computes, up to float32 summation order). Why a native op: at decode a row is a few hundred
// floats, and torch's composite rms_norm (pow, mean, add, rsqrt, mul, mul) costs ~40 us of op
// overhead per call on one core, twice per layer and per model: ~10% of a block-weight token.
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "ops.h"
#include "simd.h"

namespace nudgefast {
namespace {

NF_CLONES void normalize_rows(const float* x, const float* w, float* y, int64_t r0, int64_t r1, int64_t n,
                              float eps) {
  using simd::f32x8;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    f32x8 acc = simd::splat(0.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const f32x8 v = simd::load(xr + i);
      acc += v * v;
    }
    float sum = simd::hsum(acc);
    for (; i < n; ++i) sum += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
    for (i = 0; i + 8 <= n; i += 8) {
      const f32x8 v = simd::load(xr + i) * inv;
      simd::store(yr + i, w ? v * simd::load(w + i) : v);
    }
    for (; i < n; ++i) yr[i] = w ? xr[i] * inv * w[i] : xr[i] * inv;
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const std::optional<at::Tensor>& weight, double eps) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1,
                   "rms_norm: x must be float32 with at least one dimension, got ", x_in.scalar_type(),
                   " ", x_in.sizes());
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "rms_norm (native CPU op): x must be on the CPU");
  const int64_t n = x_in.size(-1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor w;
  if (weight.has_value()) {
    TORCH_CHECK_TYPE(weight->scalar_type() == at::kFloat && weight->dim() == 1 && weight->size(0) == n,
                     "rms_norm: weight must be float32 [", n, "], got ", weight->scalar_type(), " ",
                     weight->sizes());
    w = weight->contiguous();
  }
  at::Tensor y = at::empty_like(x);
  const int64_t rows = n ? x.numel() / n : 0;
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    normalize_rows(x.const_data_ptr<float>(), wp, y.mutable_data_ptr<float>(), r0, r1, n, static_cast<float>(eps));
  });
  return y;
}

}  // namespace nudgefast
