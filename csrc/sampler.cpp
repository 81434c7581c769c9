// Candidate sampling and gate statistics over one row of logits (see sampler.h for the rules).
//
// Passes over a row of V entries:
// - pass 1, always: max and first argmax of the logits, and with stats the online sums
//   z = sum exp(x - m), sx = sum exp(x - m) * (x - m) (rescaled when the max grows, once per block
//   of 64 entries, not per entry). Greedy is done here: one pass for statistics and candidate.
// - Gumbel: pass 2 draws noise only for contenders, s_i >= max s - kContenderSpan: the noise is
//   bounded, so no other token can win, and a real next-token row has few contenders.
// - nucleus: pass 2 computes e_i = exp(s_i - max s) into a buffer with its sum (in double); the
//   cutoff comes from the top 1024 values (nth_element + sort), or the sorted row when those do
//   not hold top_p of the mass; pass 3 is the Gumbel pass over the kept contenders.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "rng.h"
#include "simd.h"

namespace nudgefast {
namespace {

using simd::f32x8;
using simd::kLanes;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kScanBlock = 64;      // entries per step of pass 1 (8 vectors)
constexpr int64_t kNucleusTopK = 1024;  // sample.NUCLEUS_TOPK: the first try at the cutoff

NF_INLINE f32x8 load8(const float* p) { return simd::load(p); }
NF_INLINE f32x8 load8(const c10::BFloat16* p) { return simd::load_bf16(reinterpret_cast<const uint16_t*>(p)); }
NF_INLINE f32x8 load8(const c10::Half* p) {
  float buf[kLanes];
  for (int i = 0; i < kLanes; ++i) buf[i] = static_cast<float>(p[i]);
  return simd::load(buf);
}

// Lanes [0, n) of p, the rest -inf (the tail of a row).
template <typename T>
NF_INLINE f32x8 load8_tail(const T* p, int64_t n) {
  float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : -kInf;
  return simd::load(buf);
}

template <typename T>
NF_INLINE f32x8 load_block_vec(const T* row, int64_t V, int64_t at) {
  return at + kLanes <= V ? load8(row + at) : (at < V ? load8_tail(row + at, V - at) : simd::splat(-kInf));
}

struct ScanResult {
  float max_x = -kInf;
  int64_t argmax = 0;
  float z = 0.f, sx = 0.f;  // relative to max_x
};

// Pass 1. Entries equal to -inf add nothing to the sums (exp gives 0, and 0 * -inf is avoided).
template <typename T, bool kStats>
NF_INLINE ScanResult scan_row(const T* row, int64_t V) {
  ScanResult r;
  float m = -kInf;
  f32x8 z8 = simd::splat(0.f), sx8 = simd::splat(0.f);
  constexpr int kVecs = kScanBlock / kLanes;
  for (int64_t start = 0; start < V; start += kScanBlock) {
    f32x8 x[kVecs];
    if (start + kScanBlock <= V) {
      for (int k = 0; k < kVecs; ++k) x[k] = load8(row + start + k * kLanes);
    } else {
      for (int k = 0; k < kVecs; ++k) x[k] = load_block_vec(row, V, start + k * kLanes);
    }
    f32x8 bm = x[0];
    for (int k = 1; k < kVecs; ++k) bm = simd::vmax(bm, x[k]);
    const float hb = simd::hmax(bm);
    if (hb > r.max_x) {  // strictly greater: the first maximum of the row wins
      bool found = false;
      for (int k = 0; k < kVecs && !found; ++k)
        for (int i = 0; i < kLanes; ++i)
          if (x[k][i] == hb) {
            r.argmax = start + k * kLanes + i;
            found = true;
            break;
          }
      r.max_x = hb;
      if (kStats) {
        if (m != -kInf) {  // rescale: e' = e * a and (x - m') = (x - m) + (m - m'), a = exp(m - m')
          const float a = std::exp(m - hb);
          sx8 = (sx8 + z8 * (m - hb)) * a;
          z8 = z8 * a;
        }
        m = hb;
      }
    }
    if (kStats && m != -kInf) {
      for (int k = 0; k < kVecs; ++k) {
        const f32x8 xm = x[k] - m;
        const f32x8 e = simd::exp(xm);
        z8 += e;
        sx8 += e > 0.f ? e * xm : simd::splat(0.f);
      }
    }
  }
  if (kStats) {
    r.z = simd::hsum(z8);
    r.sx = simd::hsum(sx8);
  }
  return r;
}

// argmax over i with s_i >= floor (and e_i >= cutoff when e is given) of s_i + g_i; s = x * inv.
// Increasing i and a strict comparison: the first index wins exact ties, as torch.argmax.
// Four vectors per step, so the noise of four blocks (two logs each) is computed side by side;
// the lanes are inspected one by one only when the step holds a new best.
template <typename T>
NF_INLINE int64_t gumbel_argmax(const T* row, int64_t V, float inv_temp, float floor, const float* e, float cutoff,
                                const rng::RowNoise& noise) {
  constexpr int kVecs = 4;
  float best_v = -kInf;
  int64_t best_i = 0;
  const f32x8 floor8 = simd::splat(floor), cut8 = simd::splat(cutoff), none = simd::splat(-kInf);
  for (int64_t start = 0; start < V; start += kVecs * kLanes) {
    f32x8 s[kVecs], v[kVecs];
    simd::i32x8 keep[kVecs];
    bool any = false;
    for (int k = 0; k < kVecs; ++k) {
      const int64_t at = start + k * kLanes;
      s[k] = load_block_vec(row, V, at) * inv_temp;
      keep[k] = s[k] >= floor8;  // lanes past V hold s = -inf: never kept
      if (e != nullptr) keep[k] = keep[k] & (load_block_vec(e, V, at) >= cut8);
      any |= simd::any(keep[k]);
    }
    if (!any) continue;  // a peaked row skips most of its blocks here
    // Straight-line noise for the four vectors: independent chains the core runs side by side.
    for (int k = 0; k < kVecs; ++k) v[k] = keep[k] ? s[k] + noise.noise8(start + k * kLanes) : none;
    f32x8 m = v[0];
    for (int k = 1; k < kVecs; ++k) m = simd::vmax(m, v[k]);
    if (!(simd::hmax(m) > best_v)) continue;
    for (int k = 0; k < kVecs; ++k)
      for (int i = 0; i < kLanes; ++i)
        if (v[k][i] > best_v) {
          best_v = v[k][i];
          best_i = start + k * kLanes + i;
        }
  }
  return best_i;
}

// nucleus_mask_ref's cutoff from values sorted in descending order: `before` is the inclusive
// prefix sum (accumulated in double and rounded to float, as torch's CPU cumsum) minus the value;
// the cutoff is the last value whose `before` is below the target. Returns whether the list was
// long enough to settle it (its last `before` reaches the target).
bool cutoff_within(const float* desc, int64_t n, float target, float* cutoff) {
  double cum = 0.0;
  int64_t below = 0;
  float before = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    cum += desc[j];
    before = j == 0 ? 0.f : static_cast<float>(cum) - desc[j];
    below += before < target;
  }
  *cutoff = desc[std::max<int64_t>(below - 1, 0)];
  return before >= target;
}

// The cutoff of nucleus_mask_ref over e (max 1, sum `total`). A real next-token row puts the
// target mass on few tokens: the values e_i >= tau, with tau small enough that the rest of the
// row cannot hold 1 - top_p of the mass, hold the whole nucleus; sorted, they give the same
// prefix sums as the reference's sorted top-k. A row where they are too many (a flat row) takes
// the reference's own route: the top 1024 values, then the whole row if those are not enough.
float nucleus_cutoff(const std::vector<float>& e, double total, float target, float top_p) {
  const int64_t V = static_cast<int64_t>(e.size());
  constexpr int64_t kFewTokens = 4096;
  const float tau = static_cast<float>((1.0 - top_p) * total / (2.0 * V));
  float cutoff;
  if (tau > 0.f) {
    std::vector<float> desc;
    for (float x : e)
      if (x >= tau) desc.push_back(x);
    if (static_cast<int64_t>(desc.size()) <= kFewTokens) {
      std::sort(desc.begin(), desc.end(), std::greater<float>());
      if (cutoff_within(desc.data(), static_cast<int64_t>(desc.size()), target, &cutoff) ||
          static_cast<int64_t>(desc.size()) == V)
        return cutoff;
    }
  }
  const int64_t k = std::min(V, kNucleusTopK);
  std::vector<float> desc(e);
  std::nth_element(desc.begin(), desc.begin() + (k - 1), desc.end(), std::greater<float>());
  std::sort(desc.begin(), desc.begin() + k, std::greater<float>());
  if (!cutoff_within(desc.data(), k, target, &cutoff) && k < V) {
    std::sort(desc.begin(), desc.end(), std::greater<float>());
    cutoff_within(desc.data(), V, target, &cutoff);
  }
  return cutoff;
}

template <typename T>
NF_INLINE int64_t sample_typed(const T* row, int64_t V, int64_t seed, int64_t step, int64_t stream,
                               const SampleSpec& spec, GateStats* stats) {
  ScanResult r = stats != nullptr ? scan_row<T, true>(row, V) : scan_row<T, false>(row, V);
  if (stats != nullptr) {
    stats->p_top = 1.f / r.z;
    stats->entropy = std::log(r.z) - r.sx / r.z;
  }
  if (spec.mode == kSampleGreedy) return r.argmax;

  const float s_max = r.max_x * spec.inv_temp;  // x * inv is monotone in x
  const float floor = s_max - rng::kContenderSpan;
  const rng::RowNoise noise(seed, step, stream);
  if (spec.mode == kSampleGumbel) return gumbel_argmax(row, V, spec.inv_temp, floor, nullptr, 0.f, noise);

  std::vector<float> e(V);
  double total = 0.0;
  for (int64_t start = 0; start < V; start += kLanes) {
    const f32x8 ev = simd::exp(load_block_vec(row, V, start) * spec.inv_temp - s_max);
    for (int64_t i = 0; i < kLanes && start + i < V; ++i) {
      e[start + i] = ev[i];
      total += ev[i];
    }
  }
  const float target = static_cast<float>(total) * spec.top_p;
  return gumbel_argmax(row, V, spec.inv_temp, floor, e.data(), nucleus_cutoff(e, total, target, spec.top_p), noise);
}

// One clone per dtype for the ISA dispatch (see simd.h).
NF_CLONES int64_t sample_f32(const float* row, int64_t V, int64_t seed, int64_t step, int64_t stream,
                             const SampleSpec& spec, GateStats* stats) {
  return sample_typed(row, V, seed, step, stream, spec, stats);
}
NF_CLONES int64_t sample_bf16(const c10::BFloat16* row, int64_t V, int64_t seed, int64_t step, int64_t stream,
                              const SampleSpec& spec, GateStats* stats) {
  return sample_typed(row, V, seed, step, stream, spec, stats);
}
NF_CLONES int64_t sample_f16(const c10::Half* row, int64_t V, int64_t seed, int64_t step, int64_t stream,
                             const SampleSpec& spec, GateStats* stats) {
  return sample_typed(row, V, seed, step, stream, spec, stats);
}

// Hashes and noise of indices [0, n) for one row: the noise from the sampler's own code path.
NF_CLONES void row_noise(int64_t seed, int64_t step, int64_t stream, int64_t n, int64_t* hashes, float* noise) {
  const rng::RowNoise row(seed, step, stream);
  for (int64_t start = 0; start < n; start += kLanes) {
    const f32x8 g = row.noise8(start);
    for (int64_t i = start; i < std::min(n, start + kLanes); ++i) {
      hashes[i] = row.hash_of(i);
      noise[i] = g[i - start];
    }
  }
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, name, " must be [B, V] with V >= 1, got shape ",
                    logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                   " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), name, " must be on the CPU for the native op, got ", logits.device());
}

}  // namespace

SampleSpec make_sample_spec(double temperature, double top_p) {
  TORCH_CHECK_VALUE(temperature >= 0, "temperature must be a float >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
  SampleSpec spec;
  if (temperature == 0) return spec;
  spec.mode = top_p >= 1 ? kSampleGumbel : kSampleNucleus;
  spec.inv_temp = static_cast<float>(1.0 / temperature);
  spec.top_p = static_cast<float>(top_p);
  return spec;
}

int64_t sample_row(const void* row, c10::ScalarType dtype, int64_t V, int64_t seed, int64_t step, int64_t stream,
                   const SampleSpec& spec, GateStats* stats) {
  switch (dtype) {
    case at::kFloat:
      return sample_f32(static_cast<const float*>(row), V, seed, step, stream, spec, stats);
    case at::kBFloat16:
      return sample_bf16(static_cast<const c10::BFloat16*>(row), V, seed, step, stream, spec, stats);
    case at::kHalf:
      return sample_f16(static_cast<const c10::Half*>(row), V, seed, step, stream, spec, stats);
    default:
      TORCH_CHECK_TYPE(false, "logits must be float32, float16 or bfloat16, got ", dtype);
  }
}

namespace {

// One candidate per row of `logits` with the SampleSpec spec_of(b) gives row b: the checks and
// the row loop that the single-setting op and the per-row op share.
template <typename SpecOf>
at::Tensor sample_each_row(const at::Tensor& logits_in, const at::Tensor& seed, const at::Tensor& step,
                           int64_t stream, SpecOf spec_of) {
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor seeds = seed.contiguous(), steps = step.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B}, seed.options());
  const int64_t* sd = seeds.const_data_ptr<int64_t>();
  const int64_t* st = steps.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const char* base = static_cast<const char*>(logits.const_data_ptr());
  const int64_t row_bytes = logits.stride(0) * logits.element_size();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      o[b] = sample_row(base + b * row_bytes, logits.scalar_type(), V, sd[b], st[b], stream, spec_of(b), nullptr);
  });
  return out;
}

void check_seed_step(const at::Tensor& seed, const at::Tensor& step, int64_t B) {
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.dim() == 1 && seed.size(0) == B,
                    "seed must be int64 [", B, "], got ", seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK_VALUE((step.scalar_type() == at::kInt || step.scalar_type() == at::kLong) && step.dim() == 1 &&
                        step.size(0) == B,
                    "step must be int32 [", B, "], got ", step.scalar_type(), " ", step.sizes());
}

}  // namespace

at::Tensor sample(const at::Tensor& logits_in, const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                  double temperature, double top_p) {
  const SampleSpec spec = make_sample_spec(temperature, top_p);
  check_logits(logits_in, "logits");
  check_seed_step(seed, step, logits_in.size(0));
  return sample_each_row(logits_in, seed, step, stream, [&](int64_t) { return spec; });
}

SampleSpec row_sample_spec(int32_t mode, float inv_temp, float top_p, int64_t max_sample) {
  SampleSpec spec;
  spec.mode = static_cast<int>(std::min<int64_t>(mode, max_sample));
  spec.inv_temp = inv_temp;
  spec.top_p = top_p;
  return spec;
}

void check_row_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t B) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, " must be [", B, "], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU for the native op, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor sample_rows(const at::Tensor& logits_in, const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                       const at::Tensor& inv_temp, const at::Tensor& top_p, const at::Tensor& mode,
                       int64_t max_sample) {
  check_logits(logits_in, "logits");
  TORCH_CHECK_VALUE(max_sample >= kSampleGreedy && max_sample <= kSampleNucleus,
                    "max_sample must be SAMPLE_GREEDY, SAMPLE_GUMBEL or SAMPLE_NUCLEUS, got ", max_sample);
  const int64_t B = logits_in.size(0);
  check_seed_step(seed, step, B);
  check_row_tensor(inv_temp, "inv_temp", at::kFloat, B);
  check_row_tensor(top_p, "top_p", at::kFloat, B);
  check_row_tensor(mode, "mode", at::kInt, B);
  const float* it = inv_temp.const_data_ptr<float>();
  const float* tp = top_p.const_data_ptr<float>();
  const int32_t* md = mode.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(md[b] >= kSampleGreedy && md[b] <= kSampleNucleus, "mode[", b,
                      "] must be SAMPLE_GREEDY, SAMPLE_GUMBEL or SAMPLE_NUCLEUS, got ", md[b]);
  return sample_each_row(logits_in, seed, step, stream,
                         [&](int64_t b) { return row_sample_spec(md[b], it[b], tp[b], max_sample); });
}

std::tuple<at::Tensor, at::Tensor> rng_noise(const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                                             int64_t n) {
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.dim() == 1, "seed must be a 1-D int64 tensor, got ",
                    seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK_VALUE(step.dim() == 1 && step.size(0) == seed.size(0) &&
                        (step.scalar_type() == at::kInt || step.scalar_type() == at::kLong),
                    "step must be int32 or int64 of seed's shape, got ", step.scalar_type(), " ", step.sizes());
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int64_t B = seed.size(0);
  const at::Tensor seeds = seed.contiguous(), steps = step.to(at::kLong).contiguous();
  at::Tensor hashes = at::empty({B, n}, seed.options());
  at::Tensor noise = at::empty({B, n}, seed.options().dtype(at::kFloat));
  int64_t* h = hashes.mutable_data_ptr<int64_t>();
  float* g = noise.mutable_data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      row_noise(seeds.const_data_ptr<int64_t>()[b], steps.const_data_ptr<int64_t>()[b], stream, n, h + b * n,
                g + b * n);
  });
  return {hashes, noise};
}

}  // namespace nudgefast
