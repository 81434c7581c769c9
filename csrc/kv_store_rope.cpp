// store_kv_rope: RoPE and the KV store in one call, float32 (kernels/kv_store.py store_kv_rope_ref):
// q [T, Hq, D] is rotated IN PLACE, k [T, Hkv, D] is rotated on its way into the pages (k itself is
// left as it was) and v is copied as it is, at slot_mapping (negative = skip). cos, sin: [P, D / 2]
// tables (kv_store.rope_cache), row positions[t].
//
// Why: on the CPU the model's rotation is ~14 small torch ops per layer (slices, neg, cat, mul, add
// for q and k) plus per-step table building; at decode a small model spends more time in their
// dispatch than in their arithmetic. Exact: rotate-half RoPE is x * cos + cat(-x2, x1) * sin, each
// product and the sum rounded to float32, the same operations in the same order as the torch ops
// (this file is compiled as ISO C++, so no multiply-add is contracted into an FMA).
#include <cstring>
#include <initializer_list>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "ops.h"

namespace nudgefast {
namespace {

// Rows x[h, 0 .. D) of one token (row stride sh between heads), rotated into out (stride so).
void rotate_heads(const float* x, int64_t sh, float* out, int64_t so, int64_t heads, int64_t half, const float* c,
                  const float* s) {
  for (int64_t h = 0; h < heads; ++h) {
    const float* xr = x + h * sh;
    float* yr = out + h * so;
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = xr[j], x2 = xr[j + half];
      const float lo_c = x1 * c[j], lo_s = -x2 * s[j];  // x * cos, rotated * sin (rotated = -x2)
      const float hi_c = x2 * c[j], hi_s = x1 * s[j];   // (rotated = x1)
      yr[j] = lo_c + lo_s;
      yr[j + half] = hi_c + hi_s;
    }
  }
}

}  // namespace

void store_kv_rope(at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pages,
                   at::Tensor& v_pages, const at::Tensor& slot_mapping, const at::Tensor& positions,
                   const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                       k_pages.scalar_type() == at::kFloat && v_pages.scalar_type() == at::kFloat &&
                       cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
                   "store_kv_rope (native CPU op): q, k, v, the pages and the cos/sin tables must be float32");
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
                        q.size(2) == k.size(2),
                    "store_kv_rope: q must be [T, n_q_heads, D] and k, v [T, n_kv_heads, D], got ", q.sizes(),
                    ", ", k.sizes(), ", ", v.sizes());
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), half = D / 2;
  TORCH_CHECK_VALUE(D % 2 == 0, "store_kv_rope: head_dim must be even for rotary embeddings, got ", D);
  TORCH_CHECK_VALUE(k_pages.dim() == 4 && k_pages.sizes() == v_pages.sizes() && k_pages.size(2) == Hkv &&
                        k_pages.size(3) == D && k_pages.is_contiguous() && v_pages.is_contiguous(),
                    "store_kv_rope: the pages must be contiguous [num_pages, page_size, ", Hkv, ", ", D, "], got ",
                    k_pages.sizes(), " and ", v_pages.sizes());
  TORCH_CHECK_VALUE(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == half && cos.is_contiguous() &&
                        sin.is_contiguous(),
                    "store_kv_rope: cos/sin tables must be contiguous [max_positions, ", half, "], got ", cos.sizes(),
                    " and ", sin.sizes());
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == T &&
                       positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == T,
                   "store_kv_rope: slot_mapping and positions must be int64 [T]=(", T, ",)");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->stride(2) == 1 || D == 1, "store_kv_rope: q, k, v must have unit stride along head_dim");
  }
  const std::initializer_list<const at::Tensor*> all{&q, &k, &v, &k_pages, &v_pages, &slot_mapping, &positions, &cos, &sin};
  for (const at::Tensor* t : all) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "store_kv_rope (native CPU op): tensors must be on the CPU");
  }
  if (T == 0) return;
  const at::Tensor slots_c = slot_mapping.contiguous(), pos_c = positions.contiguous();
  const int64_t* slots = slots_c.const_data_ptr<int64_t>();
  const int64_t* pos = pos_c.const_data_ptr<int64_t>();
  const int64_t page_size = k_pages.size(1), capacity = k_pages.size(0) * page_size, rows = cos.size(0);
  for (int64_t t = 0; t < T; ++t) {  // host checks are cheap on the CPU: nothing writes out of bounds
    TORCH_CHECK_INDEX(slots[t] < capacity, "store_kv_rope: slot_mapping[", t, "] = ", slots[t], " is past the pool's ",
                      capacity, " slots");
    TORCH_CHECK_INDEX(pos[t] >= 0 && pos[t] < rows, "store_kv_rope: positions[", t, "] = ", pos[t],
                      " is outside the rope tables' ", rows, " rows");
  }
  float* qp = q.mutable_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* kpages = k_pages.mutable_data_ptr<float>();
  float* vpages = v_pages.mutable_data_ptr<float>();
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  const int64_t token = Hkv * D;  // one token's K (or V) in the pages
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (Hq + 2 * Hkv) * D));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      float* qt = qp + t * q.stride(0);
      rotate_heads(qt, q.stride(1), qt, q.stride(1), Hq, half, c, s);  // in place: each pair read first
      if (slots[t] < 0) continue;
      const int64_t at_slot = (slots[t] / page_size) * page_size * token + (slots[t] % page_size) * token;
      rotate_heads(kp + t * k.stride(0), k.stride(1), kpages + at_slot, D, Hkv, half, c, s);
      for (int64_t h = 0; h < Hkv; ++h) {
        std::memcpy(vpages + at_slot + h * D, vp + t * v.stride(0) + h * v.stride(1), D * sizeof(float));
      }
    }
  });
}

}  // namespace nudgefast
