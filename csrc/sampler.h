// Candidate sampling on the CPU, with the semantics of kernels/sample.py (sample_ref):
// - greedy (temperature 0): the first argmax of the logits;
// - otherwise s = logits * float32(1 / temperature) and the draw is argmax(s_i + g_i) over the
//   kept tokens, g_i the Gumbel noise of rng.h for (seed, step, stream, i); with top_p < 1 the kept
//   tokens are {e_i >= cutoff}, e_i = exp(s_i - max s), the cutoff found in descending order as
//   nucleus_mask_ref does (the top 1024 values first, the whole row only when they are not enough).
// The first pass over a row also yields, when asked, the gate statistics of the UNtempered logits:
// p_top = max softmax and the entropy in nats.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace nudgefast {

enum SampleMode : int { kSampleGreedy = 0, kSampleGumbel = 1, kSampleNucleus = 2 };

struct SampleSpec {
  int mode = kSampleGreedy;
  float inv_temp = 1.f;  // float32(1 / temperature), as sample.inverse_temperature
  float top_p = 1.f;
};

struct GateStats {
  float p_top = 0.f;
  float entropy = 0.f;
};

// The sampler mode of (temperature, top_p), with sample_mode's ValueErrors for values out of range.
SampleSpec make_sample_spec(double temperature, double top_p);

// One candidate from a row of V logits of `dtype` (float32, bfloat16 or float16, unit stride),
// drawn with the key of (seed, step, stream); fills *stats from the same first pass when given.
int64_t sample_row(const void* row, c10::ScalarType dtype, int64_t V, int64_t seed, int64_t step,
                   int64_t stream, const SampleSpec& spec, GateStats* stats);

// Op: one candidate per row, int64 [B] (sample_ref without the gate).
at::Tensor sample(const at::Tensor& logits, const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                  double temperature, double top_p);

// Op: one candidate per row with that row's sampler, int64 [B] (sample_rows_ref): inv_temp float32 [B],
// top_p float32 [B], mode int32 [B]; a row uses min(mode, max_sample).
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                       const at::Tensor& inv_temp, const at::Tensor& top_p, const at::Tensor& mode,
                       int64_t max_sample);

// The sampler of one row from its per-row parameters (mode clamped to max_sample).
SampleSpec row_sample_spec(int32_t mode, float inv_temp, float top_p, int64_t max_sample);

// Checks a per-row parameter tensor: dtype, [B], CPU, contiguous.
void check_row_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t B);

// Op (tests and debugging): hashes (int64 [B, n]) and Gumbel noise (float32 [B, n]) of vocab indices
// 0..n-1 for each row's (seed, step) and the stream, as rng.hash_ref / rng.gumbel_ref.
std::tuple<at::Tensor, at::Tensor> rng_noise(const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                                             int64_t n);

}  // namespace nudgefast
