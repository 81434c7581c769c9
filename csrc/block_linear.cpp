// block_linear: y = x @ W.T with W held in quantized blocks (nudgefast/blocks.py, BlockWeight):
//   W[n, k] = scale[n, k / B] * code[n, k] + offset[n, k / B]
// codes: bits 4 (uint8 [N, K/2], two per byte, B = 32) or bits 8 (int8 [N, K], B = 32 or 16).
// Same result as block_linear_ref (dequantize, then F.linear) up to float32 summation order.
//
// Why: CPU decode is bound by the bytes of weights read per token, and a 4-bit block weight is 6
// bits per weight where the dequantized copy is 32. The codes are widened to floats in registers
// and never stored; a block contributes scale * sum(code * x) + offset * sum(x), with sum(x) per
// block computed once per chunk of rows. Up to 8 rows of x share one decode of each weight block
// (speculative verification, batched decode), and up to 16 rows take two passes over a weight row
// still in L1; more rows (prefill) dequantize slabs of W and multiply with the BLAS, where the
// decode is cheap next to the multiply. Output rows are split across the CPU threads.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "ops.h"
#include "simd.h"

namespace nudgefast {
namespace {

using simd::f32x8;
typedef uint8_t u8x8 __attribute__((vector_size(8)));

// The portable kernel's widening, 8 bytes -> 8 floats. Both go through a zero extension: GCC
// scalarizes the signed extension of vector extensions, so int8 is recovered as (u ^ 128) - 128.
NF_INLINE f32x8 widen_u8(u8x8 v) {
  return __builtin_convertvector(__builtin_convertvector(v, simd::i32x8), f32x8);
}
NF_INLINE f32x8 widen_i8(const uint8_t* p) {
  u8x8 v;
  std::memcpy(&v, p, 8);
  const simd::i32x8 u = __builtin_convertvector(v, simd::i32x8);
  return __builtin_convertvector((u ^ 128) - 128, f32x8);
}

struct Job {
  const float* x;         // [M, K]
  const uint8_t* codes;   // row n at codes + n * row_bytes
  const float* scale;     // [N, K / B]
  const float* offset;    // [N, K / B]
  float* y;               // [M, N]
  int64_t M, N, K, row_bytes, blocks;
};

// The codes of block b of a weight row as B / 8 float vectors.
template <int BITS, int B>
NF_INLINE void decode(const uint8_t* row, int64_t b, f32x8* c) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < B / 8; ++j) c[j] = widen_i8(row + b * B + 8 * j);
  } else {
    u8x8 first, second;  // bytes 0-7 and 8-15 of the block: low nibbles = columns 0-15, high = 16-31
    std::memcpy(&first, row + b * 16, 8);
    std::memcpy(&second, row + b * 16 + 8, 8);
    c[0] = widen_u8(first & 0x0F);
    c[1] = widen_u8(second & 0x0F);
    c[2] = widen_u8(first >> 4);
    c[3] = widen_u8(second >> 4);
  }
}

// y[m0 .. m0 + MC, n] for one weight row n. xsum: [M, blocks] block sums of x.
template <int BITS, int B, int MC>
NF_INLINE void row_dot(const Job& job, const float* xsum, int64_t n, int64_t m0) {
  constexpr int V = B / 8;
  const uint8_t* row = job.codes + n * job.row_bytes;
  const float* scale = job.scale + n * job.blocks;
  const float* offset = job.offset + n * job.blocks;
  f32x8 acc[MC];
  float off[MC];
  for (int m = 0; m < MC; ++m) {
    acc[m] = simd::splat(0.f);
    off[m] = 0.f;
  }
  for (int64_t b = 0; b < job.blocks; ++b) {
    f32x8 c[V];
    decode<BITS, B>(row, b, c);
    const f32x8 s = simd::splat(scale[b]);
    const float o = offset[b];
    for (int m = 0; m < MC; ++m) {
      const float* xb = job.x + (m0 + m) * job.K + b * B;
      f32x8 p = c[0] * simd::load(xb);
      for (int j = 1; j < V; ++j) p += c[j] * simd::load(xb + 8 * j);
      acc[m] += s * p;
      off[m] += o * xsum[(m0 + m) * job.blocks + b];
    }
  }
  for (int m = 0; m < MC; ++m) job.y[(m0 + m) * job.N + n] = simd::hsum(acc[m]) + off[m];
}

// The portable kernel (any CPU without AVX2): same loop over GCC vector extensions.
template <int BITS, int B>
void rows(const Job& job, const float* xsum, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= job.M; m += 4) row_dot<BITS, B, 4>(job, xsum, n, m);
    for (; m < job.M; ++m) row_dot<BITS, B, 1>(job, xsum, n, m);
  }
}

template <int BITS, int B>
void dequantize_rows(const Job& job, float* w, int64_t first, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.row_bytes;
    for (int64_t b = 0; b < job.blocks; ++b) {
      f32x8 c[B / 8];
      decode<BITS, B>(row, b, c);
      const float s = job.scale[n * job.blocks + b], o = job.offset[n * job.blocks + b];
      for (int j = 0; j < B / 8; ++j) simd::store(w + (n - first) * job.K + b * B + 8 * j, c[j] * s + o);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The AVX2 + FMA kernel, in intrinsics: GCC's vector extensions scalarize the byte widening and
// shuffles this loop is made of. Compiled for AVX2 here and chosen at run time (run_rows).
#define NF_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#pragma GCC pop_options

template <int BITS, int B>
NF_AVX2 void decode_avx2(const uint8_t* row, int64_t b, __m256* c) {
  if constexpr (BITS == 8) {
#pragma GCC unroll 4
    for (int j = 0; j < B / 8; ++j) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b * B + 8 * j));
      c[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    }
  } else {
    // Bytes 0-7 and 8-15 zero-extended to 32 bits (the loads fold into vpmovzxbd); then the
    // nibbles are split in the 32-bit lanes: fewer shuffles than splitting the bytes first.
    const __m256i first = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b * 16)));
    const __m256i second = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b * 16 + 8)));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    c[0] = _mm256_cvtepi32_ps(_mm256_and_si256(first, mask));
    c[1] = _mm256_cvtepi32_ps(_mm256_and_si256(second, mask));
    c[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(first, 4));
    c[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(second, 4));
  }
}

NF_AVX2 float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

NF_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = hsum_avx2(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Block b's contribution scale * sum(code * x) into acc[m] for the MC rows of x at x.
template <int BITS, int B, int MC>
NF_AVX2 void block_avx2(const Job& job, const uint8_t* row, const float* scale, const float* x, int64_t b,
                        __m256* acc) {
  __m256 c[B / 8];
  decode_avx2<BITS, B>(row, b, c);
  const __m256 s = _mm256_broadcast_ss(scale + b);
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    const float* xb = x + m * job.K + b * B;
    __m256 p = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));
#pragma GCC unroll 4
    for (int j = 1; j < B / 8; ++j) p = _mm256_fmadd_ps(c[j], _mm256_loadu_ps(xb + 8 * j), p);
    acc[m] = _mm256_fmadd_ps(s, p, acc[m]);
  }
}

template <int BITS, int B, int MC>
NF_AVX2 void row_dot_avx2(const Job& job, const float* xsum, int64_t n, int64_t m0) {
  // A single row of x would make every block wait on the previous one's accumulate (FMA latency):
  // it gets two accumulator chains, even and odd blocks.
  constexpr int CHAINS = MC == 1 ? 2 : 1;
  const uint8_t* row = job.codes + n * job.row_bytes;
  const float* scale = job.scale + n * job.blocks;
  const float* x = job.x + m0 * job.K;
  __m256 acc[CHAINS][MC];
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    for (int k = 0; k < CHAINS; ++k) acc[k][m] = _mm256_setzero_ps();
  }
  int64_t b = 0;
  for (; b + CHAINS <= job.blocks; b += CHAINS) {
#pragma GCC unroll 2
    for (int k = 0; k < CHAINS; ++k) block_avx2<BITS, B, MC>(job, row, scale, x, b + k, acc[k]);
  }
  for (; b < job.blocks; ++b) block_avx2<BITS, B, MC>(job, row, scale, x, b, acc[0]);
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    __m256 total = acc[0][m];
    for (int k = 1; k < CHAINS; ++k) total = _mm256_add_ps(total, acc[k][m]);
    // the offsets' part, sum over blocks of offset * sum(x), as one dot product per row of x
    const float off = dot_avx2(job.offset + n * job.blocks, xsum + (m0 + m) * job.blocks, job.blocks);
    job.y[(m0 + m) * job.N + n] = hsum_avx2(total) + off;
  }
}

template <int BITS, int B>
__attribute__((target("avx2,fma"))) void rows_avx2(const Job& job, const float* xsum, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 8 <= job.M; m += 8) row_dot_avx2<BITS, B, 8>(job, xsum, n, m);
    if (m + 4 <= job.M) { row_dot_avx2<BITS, B, 4>(job, xsum, n, m); m += 4; }
    if (m + 2 <= job.M) { row_dot_avx2<BITS, B, 2>(job, xsum, n, m); m += 2; }
    if (m < job.M) row_dot_avx2<BITS, B, 1>(job, xsum, n, m);
  }
}

// NUDGEFAST_PORTABLE_KERNELS=1 forces the portable kernel (its test runs it that way).
template <int BITS, int B>
__attribute__((target("avx2,fma"))) void dequantize_avx2(const Job& job, float* w, int64_t first, int64_t n0,
                                                         int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.row_bytes;
    for (int64_t b = 0; b < job.blocks; ++b) {
      __m256 c[B / 8];
      decode_avx2<BITS, B>(row, b, c);
      const __m256 s = _mm256_broadcast_ss(job.scale + n * job.blocks + b);
      const __m256 o = _mm256_broadcast_ss(job.offset + n * job.blocks + b);
      for (int j = 0; j < B / 8; ++j) _mm256_storeu_ps(w + (n - first) * job.K + b * B + 8 * j, _mm256_fmadd_ps(c[j], s, o));
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("NUDGEFAST_PORTABLE_KERNELS") == nullptr;
  return yes;
}
#else
bool has_avx2() { return false; }
#endif

template <int BITS, int B>
void run_rows_for(const Job& job, int64_t n0, int64_t n1) {
  std::vector<float> xsum(job.M * job.blocks);
  for (int64_t i = 0; i < job.M * job.blocks; ++i) {  // x is [M, K] contiguous: block i of the flat array
    float sum = 0.f;
    for (int j = 0; j < B; ++j) sum += job.x[i * B + j];
    xsum[i] = sum;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return rows_avx2<BITS, B>(job, xsum.data(), n0, n1);
#endif
  rows<BITS, B>(job, xsum.data(), n0, n1);
}

void run_rows(const Job& job, int bits, int block, int64_t n0, int64_t n1) {
  if (bits == 4) {
    run_rows_for<4, 32>(job, n0, n1);
  } else if (block == 32) {
    run_rows_for<8, 32>(job, n0, n1);
  } else {
    run_rows_for<8, 16>(job, n0, n1);
  }
}

template <int BITS, int B>
void dequantize_for(const Job& job, float* w, int64_t first, int64_t n0, int64_t n1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return dequantize_avx2<BITS, B>(job, w, first, n0, n1);
#endif
  dequantize_rows<BITS, B>(job, w, first, n0, n1);
}

// Rows [n0, n1) of W as float32 into w, row n at w + (n - first) * K.
void dequantize(const Job& job, int bits, int block, float* w, int64_t first, int64_t n0, int64_t n1) {
  if (bits == 4) {
    dequantize_for<4, 32>(job, w, first, n0, n1);
  } else if (block == 32) {
    dequantize_for<8, 32>(job, w, first, n0, n1);
  } else {
    dequantize_for<8, 16>(job, w, first, n0, n1);
  }
}

// Up to this many rows of x multiply straight from the codes; more (prefill) dequantize and use
// the BLAS (measured on a 3072 x 576 4-bit weight, AVX2, one core: direct is ahead up to M = 16,
// dequantize + BLAS from M = 24 on, 2.3 against 3.2 ms at M = 32).
constexpr int64_t kDirectRows = 16;

}  // namespace

at::Tensor block_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& offset, int64_t bits, int64_t block) {
  TORCH_CHECK_VALUE((bits == 4 && block == 32) || (bits == 8 && (block == 32 || block == 16)),
                    "block_linear: unsupported layout bits=", bits, " block=", block,
                    " (4/32, 8/32 or 8/16)");
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
                   "block_linear: x must be float32 [M, K], got ", x_in.scalar_type(), " ", x_in.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
                       scale.dim() == 2 && scale.sizes() == offset.sizes(),
                   "block_linear: scale and offset must be float32 [N, K / block] of one shape, got ",
                   scale.scalar_type(), " ", scale.sizes(), " and ", offset.scalar_type(), " ", offset.sizes());
  const int64_t M = x_in.size(0), N = scale.size(0), blocks = scale.size(1), K = blocks * block;
  TORCH_CHECK_VALUE(x_in.size(1) == K, "block_linear: x has ", x_in.size(1), " columns, the weight ", K);
  const auto code_type = bits == 4 ? at::kByte : at::kChar;
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
  TORCH_CHECK_TYPE(codes.scalar_type() == code_type && codes.dim() == 2 && codes.size(0) == N &&
                       codes.size(1) == row_bytes,
                   "block_linear: codes must be ", code_type, " [", N, ", ", row_bytes, "], got ",
                   codes.scalar_type(), " ", codes.sizes());
  for (const at::Tensor* t : {&x_in, &codes, &scale, &offset}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "block_linear (native CPU op): tensors must be on the CPU, got ",
                      t->device());
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor c = codes.contiguous(), s = scale.contiguous(), o = offset.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Job job{x.const_data_ptr<float>(), static_cast<const uint8_t*>(c.const_data_ptr()),
                s.const_data_ptr<float>(), o.const_data_ptr<float>(), y.mutable_data_ptr<float>(),
                M, N, K, row_bytes, blocks};
  // Chunks of at least ~64k weights, so a thread's share outweighs its start-up.
  const int64_t grain = std::max<int64_t>(8, (1 << 16) / std::max<int64_t>(1, K));
  const int b = static_cast<int>(bits), bl = static_cast<int>(block);
  if (M <= kDirectRows) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { run_rows(job, b, bl, n0, n1); });
    return y;
  }
  // Prefill: enough rows of x to make the weights' decode negligible next to the multiply, which
  // the BLAS does better. Dequantize a slab of rows at a time (bounded memory), then one matmul each.
  const int64_t slab = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t{64} << 20) / (4 * K)));
  at::Tensor w = at::empty({slab, K}, x.options());
  for (int64_t s0 = 0; s0 < N; s0 += slab) {
    const int64_t rows = std::min(slab, N - s0);
    float* wp = w.mutable_data_ptr<float>();
    at::parallel_for(s0, s0 + rows, grain, [&](int64_t n0, int64_t n1) { dequantize(job, b, bl, wp, s0, n0, n1); });
    y.narrow(1, s0, rows).copy_(at::mm(x, w.narrow(0, 0, rows).t()));
  }
  return y;
}

// Which instruction set each native kernel runs here (recorded with benchmark results): block_linear
// picks its AVX2 kernel at run time (has_avx2); the target_clones functions of simd.h users
// (paged_attention, rms_norm, sampler) get the x86-64-v3 clone where the CPU supports that level.
std::string kernel_isa() {
  std::string block = has_avx2() ? "avx2+fma" : "portable";
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
  std::string clones = __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3" : "x86-64 baseline";
#else
  std::string clones = "compiler default (no per-ISA clones)";
#endif
  return "block_linear=" + block + ";paged_attention=" + clones + ";rms_norm=" + clones + ";sampler=" + clones +
         ";kv_store=compiler default;nudge_step=compiler default";
}

}  // namespace nudgefast
