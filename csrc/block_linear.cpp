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
//
// Kernels, chosen once per process by CPU features (NUDGEFAST_BLOCK_KERNEL forces one): portable
// (GCC vector extensions, any CPU), avx2 (8 lanes), avx512 (16 lanes, several weight rows per pass).
// All three compute the same float32 products; only the summation order differs.
//
// block_linear_q8 is the opt-in inexact variant (weights="gguf-q8"): x is quantized to int8 per
// block of the weight's block size (one float scale each, as llama.cpp does), each block's dot
// product is an integer sum (VNNI where the CPU has it) scaled once, and the offsets' part uses the
// block sums of the quantized x, dx * sum(xq), as llama.cpp's q8_1 does: then the error is W . (xq dx - x)
// for the weights as they are (centred), not for scale * code alone (a 4-bit code averages 7.5, so
// that error would not cancel). Prefill (more than kDirectRows rows) stays exact.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/StringUtil.h>

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
  const void* scale;      // [N, K / B]: float32, or float16 where every scale is one exactly (half)
  const void* offset;     // [N, K / B] of the same type, or nullptr: every offset is zero (not read)
  bool half;              // scale and offset are float16: the kernels' template argument H
  float* y;               // [M, N]
  int64_t M, N, K, row_bytes, blocks;
};

// Scale or offset i as float32. Stored as float16 where every value of the weight is one exactly
// (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1: GGML's own fp16 d and m), so the kernels multiply by the same
// float32 values from 2 bytes instead of 4: a 4-bit block is then 20 bytes, not 24, as in the file.
template <bool H>
NF_INLINE float load_s(const void* p, int64_t i) {
  if constexpr (H) return c10::detail::fp16_ieee_to_fp32_value(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// Software prefetch of weight rows [n0, n1) (codes, scales, offsets), clipped to the weight. Why: a
// register tile reads R rows block by block, R short interleaved streams (a 640-column 8-bit row is
// 10 cache lines) that the hardware prefetchers follow poorly; requesting the rows a few KB ahead
// at each tile's start is what took gemma-3-270m's decode (its 262144 x 640 8-bit output head
// dominates) from 0.49x to 0.83x llama.cpp's in one loaded run on an AMD EPYC (Zen 5), one thread
// (benchmarks/RESULTS.md has the "after" file and its command; "before" is the same command at 74719c0).
template <bool H>
NF_INLINE void prefetch_rows(const Job& job, int64_t n0, int64_t n1) {
  n1 = std::min(n1, job.N);
  if (n0 >= n1) return;
  const char* codes = reinterpret_cast<const char*>(job.codes + n0 * job.row_bytes);
  for (int64_t i = 0; i < (n1 - n0) * job.row_bytes; i += 64) __builtin_prefetch(codes + i, 0, 3);
  const int64_t bytes = (n1 - n0) * job.blocks * (H ? 2 : 4);
  const char* scale = static_cast<const char*>(job.scale) + n0 * job.blocks * (H ? 2 : 4);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(scale + i, 0, 3);
  if (job.offset) {
    const char* offset = static_cast<const char*>(job.offset) + n0 * job.blocks * (H ? 2 : 4);
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(offset + i, 0, 3);
  }
}

// How far ahead (in rows, a multiple of R) a tile of R rows prefetches: at least two tiles and ~4 KB.
NF_INLINE int64_t prefetch_ahead(const Job& job, int64_t R) {
  const int64_t tile_bytes = std::max<int64_t>(1, R * job.row_bytes);
  return R * std::max<int64_t>(2, (4096 + tile_bytes - 1) / tile_bytes);
}

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
template <int BITS, int B, bool H, int MC>
NF_INLINE void row_dot(const Job& job, const float* xsum, int64_t n, int64_t m0) {
  constexpr int V = B / 8;
  const uint8_t* row = job.codes + n * job.row_bytes;
  const int64_t s0 = n * job.blocks;
  f32x8 acc[MC];
  float off[MC];
  for (int m = 0; m < MC; ++m) {
    acc[m] = simd::splat(0.f);
    off[m] = 0.f;
  }
  for (int64_t b = 0; b < job.blocks; ++b) {
    f32x8 c[V];
    decode<BITS, B>(row, b, c);
    const f32x8 s = simd::splat(load_s<H>(job.scale, s0 + b));
    const float o = job.offset ? load_s<H>(job.offset, s0 + b) : 0.f;
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
template <int BITS, int B, bool H>
void rows(const Job& job, const float* xsum, int64_t n0, int64_t n1) {
  const int64_t ahead = prefetch_ahead(job, 1);
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_rows<H>(job, n + ahead, std::min(n1, n + ahead + 1));
    int64_t m = 0;
    for (; m + 4 <= job.M; m += 4) row_dot<BITS, B, H, 4>(job, xsum, n, m);
    for (; m < job.M; ++m) row_dot<BITS, B, H, 1>(job, xsum, n, m);
  }
}

template <int BITS, int B, bool H>
void dequantize_rows(const Job& job, float* w, int64_t first, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.row_bytes;
    for (int64_t b = 0; b < job.blocks; ++b) {
      f32x8 c[B / 8];
      decode<BITS, B>(row, b, c);
      const float s = load_s<H>(job.scale, n * job.blocks + b);
      const float o = job.offset ? load_s<H>(job.offset, n * job.blocks + b) : 0.f;
      for (int j = 0; j < B / 8; ++j) simd::store(w + (n - first) * job.K + b * B + 8 * j, c[j] * s + o);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The AVX2 + FMA kernel, in intrinsics: GCC's vector extensions scalarize the byte widening and
// shuffles this loop is made of. Compiled for AVX2 here and chosen at run time (run_rows).
#define NF_AVX2_TARGET "avx2,fma,f16c"
#define NF_AVX2 __attribute__((target(NF_AVX2_TARGET), always_inline)) inline
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
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

// load_s with the F16C instruction (one vcvtph2ps instead of the portable bit manipulation).
template <bool H>
NF_AVX2 float load_s_f16c(const void* p, int64_t i) {
  if constexpr (H) return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// sum over i < n of a[a0 + i] * b[i]; a: scales or offsets (float32, or float16 when H).
template <bool H>
NF_AVX2 float dot_avx2(const void* a, int64_t a0, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 av;
    if constexpr (H) {
      av = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a) + a0 + i)));
    } else {
      av = _mm256_loadu_ps(static_cast<const float*>(a) + a0 + i);
    }
    acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + i), acc);
  }
  float sum = hsum_avx2(acc);
  for (; i < n; ++i) sum += load_s_f16c<H>(a, a0 + i) * b[i];
  return sum;
}

// Block b's contribution scale * sum(code * x) into acc[m] for the MC rows of x at x.
template <int BITS, int B, bool H, int MC>
NF_AVX2 void block_avx2(const Job& job, const uint8_t* row, int64_t s0, const float* x, int64_t b, __m256* acc) {
  __m256 c[B / 8];
  decode_avx2<BITS, B>(row, b, c);
  const __m256 s = _mm256_set1_ps(load_s_f16c<H>(job.scale, s0 + b));
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    const float* xb = x + m * job.K + b * B;
    __m256 p = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));
#pragma GCC unroll 4
    for (int j = 1; j < B / 8; ++j) p = _mm256_fmadd_ps(c[j], _mm256_loadu_ps(xb + 8 * j), p);
    acc[m] = _mm256_fmadd_ps(s, p, acc[m]);
  }
}

template <int BITS, int B, bool H, int MC>
NF_AVX2 void row_dot_avx2(const Job& job, const float* xsum, int64_t n, int64_t m0) {
  // A single row of x would make every block wait on the previous one's accumulate (FMA latency):
  // it gets two accumulator chains, even and odd blocks.
  constexpr int CHAINS = MC == 1 ? 2 : 1;
  const uint8_t* row = job.codes + n * job.row_bytes;
  const int64_t s0 = n * job.blocks;
  const float* x = job.x + m0 * job.K;
  __m256 acc[CHAINS][MC];
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    for (int k = 0; k < CHAINS; ++k) acc[k][m] = _mm256_setzero_ps();
  }
  int64_t b = 0;
  for (; b + CHAINS <= job.blocks; b += CHAINS) {
#pragma GCC unroll 2
    for (int k = 0; k < CHAINS; ++k) block_avx2<BITS, B, H, MC>(job, row, s0, x, b + k, acc[k]);
  }
  for (; b < job.blocks; ++b) block_avx2<BITS, B, H, MC>(job, row, s0, x, b, acc[0]);
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    __m256 total = acc[0][m];
    for (int k = 1; k < CHAINS; ++k) total = _mm256_add_ps(total, acc[k][m]);
    // the offsets' part, sum over blocks of offset * sum(x), as one dot product per row of x
    const float off = job.offset ? dot_avx2<H>(job.offset, s0, xsum + (m0 + m) * job.blocks, job.blocks) : 0.f;
    job.y[(m0 + m) * job.N + n] = hsum_avx2(total) + off;
  }
}

template <int BITS, int B, bool H>
__attribute__((target(NF_AVX2_TARGET))) void rows_avx2(const Job& job, const float* xsum, int64_t n0, int64_t n1) {
  const int64_t ahead = prefetch_ahead(job, 1);
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_rows<H>(job, n + ahead, std::min(n1, n + ahead + 1));
    int64_t m = 0;
    for (; m + 8 <= job.M; m += 8) row_dot_avx2<BITS, B, H, 8>(job, xsum, n, m);
    if (m + 4 <= job.M) { row_dot_avx2<BITS, B, H, 4>(job, xsum, n, m); m += 4; }
    if (m + 2 <= job.M) { row_dot_avx2<BITS, B, H, 2>(job, xsum, n, m); m += 2; }
    if (m < job.M) row_dot_avx2<BITS, B, H, 1>(job, xsum, n, m);
  }
}

template <int BITS, int B, bool H>
__attribute__((target(NF_AVX2_TARGET))) void dequantize_avx2(const Job& job, float* w, int64_t first, int64_t n0,
                                                         int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.row_bytes;
    for (int64_t b = 0; b < job.blocks; ++b) {
      __m256 c[B / 8];
      decode_avx2<BITS, B>(row, b, c);
      const __m256 s = _mm256_set1_ps(load_s_f16c<H>(job.scale, n * job.blocks + b));
      const __m256 o = _mm256_set1_ps(job.offset ? load_s_f16c<H>(job.offset, n * job.blocks + b) : 0.f);
      for (int j = 0; j < B / 8; ++j) _mm256_storeu_ps(w + (n - first) * job.K + b * B + 8 * j, _mm256_fmadd_ps(c[j], s, o));
    }
  }
}

// The AVX-512 kernel: the AVX2 kernel's arithmetic on 16 lanes, and register-tiled: R weight rows
// share each load of x and give R independent accumulator chains (a single row's chain waits on
// FMA latency). A 32-column block is two vectors: a 4-bit block's 16 bytes widen to 16 lanes in
// one vpmovzxbd, whose low nibbles are columns 0-15 and high nibbles columns 16-31.
#define NF_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"
#define NF_AVX512 __attribute__((target(NF_AVX512_TARGET), always_inline)) inline

template <int BITS, int B>
NF_AVX512 void decode_avx512(const uint8_t* row, int64_t b, __m512* c) {
  if constexpr (BITS == 8) {
#pragma GCC unroll 2
    for (int j = 0; j < B / 16; ++j) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * B + 16 * j));
      c[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
    }
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16)));
    c[0] = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    c[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
}

// 16 scales or offsets from a + i (float32, or float16 when H); `tail` masks the lanes read.
template <bool H>
NF_AVX512 __m512 load16_s(const void* a, int64_t i, __mmask16 tail) {
  if constexpr (H) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail, static_cast<const uint16_t*>(a) + i));
  }
  return _mm512_maskz_loadu_ps(tail, static_cast<const float*>(a) + i);
}

// sum over i < n of a[a0 + i] * b[i]
template <bool H>
NF_AVX512 float dot_avx512(const void* a, int64_t a0, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(load16_s<H>(a, a0 + i, 0xFFFF), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(load16_s<H>(a, a0 + i, tail), _mm512_maskz_loadu_ps(tail, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y[m0 .. m0 + MC, n .. n + R] from weight rows n .. n + R and rows m0 .. m0 + MC of x.
template <int BITS, int B, bool H, int R, int MC>
NF_AVX512 void tile_avx512(const Job& job, const float* xsum, int64_t n, int64_t m0) {
  constexpr int V = B / 16;
  const float* x = job.x + m0 * job.K;
  __m512 acc[R][MC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < job.blocks; ++b) {
    __m512 xv[MC][V];
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
#pragma GCC unroll 2
      for (int j = 0; j < V; ++j) xv[m][j] = _mm512_loadu_ps(x + m * job.K + b * B + 16 * j);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m512 c[V];
      decode_avx512<BITS, B>(job.codes + (n + r) * job.row_bytes, b, c);
      const __m512 s = _mm512_set1_ps(load_s_f16c<H>(job.scale, (n + r) * job.blocks + b));
#pragma GCC unroll 8
      for (int m = 0; m < MC; ++m) {
        __m512 p = _mm512_mul_ps(c[0], xv[m][0]);
        if constexpr (V == 2) p = _mm512_fmadd_ps(c[1], xv[m][1], p);
        acc[r][m] = _mm512_fmadd_ps(s, p, acc[r][m]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const float off =
          job.offset ? dot_avx512<H>(job.offset, (n + r) * job.blocks, xsum + (m0 + m) * job.blocks, job.blocks) : 0.f;
      job.y[(m0 + m) * job.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + off;
    }
  }
}

// Every row of x against weight rows n .. n + R, in passes of at most 8 accumulators (R * MC <= 8:
// 8 accumulators plus the codes and x vectors stay within the 32 registers).
template <int BITS, int B, bool H, int R>
NF_AVX512 void mpass_avx512(const Job& job, const float* xsum, int64_t n) {
  int64_t m = 0;
  if constexpr (R == 1) {
    for (; m + 8 <= job.M; m += 8) tile_avx512<BITS, B, H, 1, 8>(job, xsum, n, m);
  }
  if constexpr (R <= 2) {
    for (; m + 4 <= job.M; m += 4) tile_avx512<BITS, B, H, R, 4>(job, xsum, n, m);
  }
  for (; m + 2 <= job.M; m += 2) tile_avx512<BITS, B, H, R, 2>(job, xsum, n, m);
  for (; m < job.M; ++m) tile_avx512<BITS, B, H, R, 1>(job, xsum, n, m);
}

template <int BITS, int B, bool H, int R>
__attribute__((target(NF_AVX512_TARGET))) void rows_tiled_avx512(const Job& job, const float* xsum, int64_t n0,
                                                                 int64_t n1) {
  const int64_t ahead = prefetch_ahead(job, R);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    prefetch_rows<H>(job, n + ahead, std::min(n1, n + ahead + R));
    mpass_avx512<BITS, B, H, R>(job, xsum, n);
  }
  for (; n < n1; ++n) mpass_avx512<BITS, B, H, 1>(job, xsum, n);
}

// Tiles by the number of rows of x: decode (1-2 rows) takes 4 weight rows per pass, verification
// batches (3-4) 2, more rows 1 (their loads of x already amortize each decoded block).
template <int BITS, int B, bool H>
void rows_avx512(const Job& job, const float* xsum, int64_t n0, int64_t n1) {
  if (job.M <= 2) return rows_tiled_avx512<BITS, B, H, 4>(job, xsum, n0, n1);
  if (job.M <= 4) return rows_tiled_avx512<BITS, B, H, 2>(job, xsum, n0, n1);
  rows_tiled_avx512<BITS, B, H, 1>(job, xsum, n0, n1);
}

template <int BITS, int B, bool H>
__attribute__((target(NF_AVX512_TARGET))) void dequantize_avx512(const Job& job, float* w, int64_t first, int64_t n0,
                                                                 int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.row_bytes;
    for (int64_t b = 0; b < job.blocks; ++b) {
      __m512 c[B / 16];
      decode_avx512<BITS, B>(row, b, c);
      const __m512 s = _mm512_set1_ps(load_s_f16c<H>(job.scale, n * job.blocks + b));
      const __m512 o = _mm512_set1_ps(job.offset ? load_s_f16c<H>(job.offset, n * job.blocks + b) : 0.f);
      for (int j = 0; j < B / 16; ++j) _mm512_storeu_ps(w + (n - first) * job.K + b * B + 16 * j, _mm512_fmadd_ps(c[j], s, o));
    }
  }
}

// ---- 8-bit activations (block_linear_q8), VNNI: vpdpbusd multiplies unsigned bytes by signed bytes
// and adds groups of four into 32-bit lanes. A 32-column block is one 256-bit vector of codes times
// one of quantized x; 4-bit codes are unsigned already; signed 8-bit codes go in as |code| with
// their signs moved onto x (vpsignb), so no product overflows. The block's integer sum is then
// scaled once: float(sum) * (scale * dx).
#define NF_VNNI_TARGET NF_AVX512_TARGET
#define NF_VNNI __attribute__((target(NF_VNNI_TARGET), always_inline)) inline

template <int BITS>
NF_VNNI __m256i dot32_vnni(const uint8_t* row, int64_t b, const int8_t* xq) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
  if constexpr (BITS == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m256i c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, xv);
  } else {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 32));
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(c), _mm256_sign_epi8(xv, c));
  }
}

// Weight rows n .. n + R against one quantized row of x (xq, dx: its per-block scales).
template <int BITS, int B, bool H, int R>
NF_VNNI void tile_q8_vnni(const Job& job, const int8_t* xq, const float* dx, const float* xsum, int64_t n,
                          int64_t m) {
  __m256 acc[R];
  float tail[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    tail[r] = 0.f;
  }
  if constexpr (B == 32) {
    for (int64_t b = 0; b < job.blocks; ++b) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i d = dot32_vnni<BITS>(job.codes + (n + r) * job.row_bytes, b, xq);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(load_s_f16c<H>(job.scale, (n + r) * job.blocks + b) * dx[b]), acc[r]);
      }
    }
  } else {  // B == 16 (8-bit codes): two blocks per vector, lanes 0-3 and 4-7
    int64_t b = 0;
    for (; b + 2 <= job.blocks; b += 2) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i d = dot32_vnni<8>(job.codes + (n + r) * job.row_bytes + b * 16, 0, xq + b * 16);
        const __m256 s = _mm256_set_m128(_mm_set1_ps(load_s_f16c<H>(job.scale, (n + r) * job.blocks + b + 1) * dx[b + 1]), _mm_set1_ps(load_s_f16c<H>(job.scale, (n + r) * job.blocks + b) * dx[b]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[r]);
      }
    }
    if (b < job.blocks) {  // an odd last block: 128 bits
      const __m128i xv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + b * 16));
      for (int r = 0; r < R; ++r) {
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(job.codes + (n + r) * job.row_bytes + b * 16));
        __m128i d = _mm_dpbusd_epi32(_mm_setzero_si128(), _mm_abs_epi8(c), _mm_sign_epi8(xv, c));
        d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0x4E));
        d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0xB1));
        tail[r] = static_cast<float>(_mm_cvtsi128_si32(d)) * (load_s_f16c<H>(job.scale, (n + r) * job.blocks + b) * dx[b]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float off = job.offset ? dot_avx512<H>(job.offset, (n + r) * job.blocks, xsum, job.blocks) : 0.f;
    job.y[m * job.N + n + r] = hsum_avx2(acc[r]) + tail[r] + off;
  }
}

template <int BITS, int B, bool H>
__attribute__((target(NF_VNNI_TARGET))) void rows_q8_vnni(const Job& job, const int8_t* xq, const float* dx,
                                                          const float* xsum, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < job.M; ++m) {
    const int8_t* xqm = xq + m * job.K;
    const float* dxm = dx + m * job.blocks;
    const float* xsm = xsum + m * job.blocks;
    const int64_t ahead = prefetch_ahead(job, 4);
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      prefetch_rows<H>(job, n + ahead, std::min(n1, n + ahead + 4));
      tile_q8_vnni<BITS, B, H, 4>(job, xqm, dxm, xsm, n, m);
    }
    for (; n < n1; ++n) tile_q8_vnni<BITS, B, H, 1>(job, xqm, dxm, xsm, n, m);
  }
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_has_avx2();
}
bool cpu_has_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_vnni() { return false; }
#endif

// ---- Kernel choice, once per process --------------------------------------------------------------
// Exact kernels: portable, avx2, avx512 (the best this CPU runs, unless NUDGEFAST_BLOCK_KERNEL names
// one; NUDGEFAST_PORTABLE_KERNELS=1 still means portable). 8-bit-activation kernels: avx512vnni
// where the exact choice is avx512 and the CPU has VNNI, else portable. Tests force each one in a
// child process.
enum class Kernel { kPortable, kAvx2, kAvx512 };

std::vector<std::string> available_kernels() {
  std::vector<std::string> out{"portable"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  if (cpu_has_vnni()) out.push_back("avx512vnni");
  return out;
}

Kernel choose_kernel() {
  const char* forced = std::getenv("NUDGEFAST_BLOCK_KERNEL");
  const char* portable = std::getenv("NUDGEFAST_PORTABLE_KERNELS");
  if ((forced == nullptr || *forced == '\0') && portable != nullptr && std::strcmp(portable, "1") == 0) {
    return Kernel::kPortable;
  }
  if (forced == nullptr || *forced == '\0') {
    return cpu_has_avx512() ? Kernel::kAvx512 : cpu_has_avx2() ? Kernel::kAvx2 : Kernel::kPortable;
  }
  const std::string name(forced);
  if (name == "portable") return Kernel::kPortable;
  TORCH_CHECK_VALUE(name == "avx2" || name == "avx512", "NUDGEFAST_BLOCK_KERNEL=", name,
                    " is not a block_linear kernel (portable, avx2 or avx512)");
  const bool ok = name == "avx2" ? cpu_has_avx2() : cpu_has_avx512();
  TORCH_CHECK_VALUE(ok, "NUDGEFAST_BLOCK_KERNEL=", name, " but this CPU cannot run it (it runs: ",
                    c10::Join(", ", available_kernels()), ")");
  return name == "avx2" ? Kernel::kAvx2 : Kernel::kAvx512;
}

Kernel kernel() {
  static const Kernel k = choose_kernel();
  return k;
}

bool q8_vnni() { return kernel() == Kernel::kAvx512 && cpu_has_vnni(); }

// ---- Dispatch ------------------------------------------------------------------------------------
// Per-block sums of x [M, K] (the offsets' part): x is contiguous, block i of the flat array.
template <int B>
std::vector<float> block_sums(const Job& job) {
  std::vector<float> xsum(job.M * job.blocks);
  for (int64_t i = 0; i < job.M * job.blocks; ++i) {
    float sum = 0.f;
    for (int j = 0; j < B; ++j) sum += job.x[i * B + j];
    xsum[i] = sum;
  }
  return xsum;
}

template <int BITS, int B, bool H>
void run_rows_for(const Job& job, int64_t n0, int64_t n1) {
  const std::vector<float> xsum = block_sums<B>(job);
#if defined(__x86_64__) && defined(__GNUC__)
  if (kernel() == Kernel::kAvx512) return rows_avx512<BITS, B, H>(job, xsum.data(), n0, n1);
  if (kernel() == Kernel::kAvx2) return rows_avx2<BITS, B, H>(job, xsum.data(), n0, n1);
#endif
  rows<BITS, B, H>(job, xsum.data(), n0, n1);
}

// Calls f(bits, block, half) with each as a std::integral_constant for the job's layout and scale
// type: the one place the run-time layout becomes template arguments.
template <typename F>
void with_layout(const Job& job, int bits, int block, F&& f) {
  using I4 = std::integral_constant<int, 4>;
  using I8 = std::integral_constant<int, 8>;
  using B32 = std::integral_constant<int, 32>;
  using B16 = std::integral_constant<int, 16>;
  using T = std::true_type;
  using N = std::false_type;
  if (bits == 4) {
    job.half ? f(I4{}, B32{}, T{}) : f(I4{}, B32{}, N{});
  } else if (block == 32) {
    job.half ? f(I8{}, B32{}, T{}) : f(I8{}, B32{}, N{});
  } else {
    job.half ? f(I8{}, B16{}, T{}) : f(I8{}, B16{}, N{});
  }
}

void run_rows(const Job& job, int bits, int block, int64_t n0, int64_t n1) {
  with_layout(job, bits, block, [&](auto b, auto bl, auto h) {
    run_rows_for<decltype(b)::value, decltype(bl)::value, decltype(h)::value>(job, n0, n1);
  });
}

template <int BITS, int B, bool H>
void dequantize_for(const Job& job, float* w, int64_t first, int64_t n0, int64_t n1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kernel() == Kernel::kAvx512) return dequantize_avx512<BITS, B, H>(job, w, first, n0, n1);
  if (kernel() == Kernel::kAvx2) return dequantize_avx2<BITS, B, H>(job, w, first, n0, n1);
#endif
  dequantize_rows<BITS, B, H>(job, w, first, n0, n1);
}

// Rows [n0, n1) of W as float32 into w, row n at w + (n - first) * K.
void dequantize(const Job& job, int bits, int block, float* w, int64_t first, int64_t n0, int64_t n1) {
  with_layout(job, bits, block, [&](auto b, auto bl, auto h) {
    dequantize_for<decltype(b)::value, decltype(bl)::value, decltype(h)::value>(job, w, first, n0, n1);
  });
}

// ---- 8-bit activations -----------------------------------------------------------------------------
// Row m of x, block b of B columns: dx = amax / 127, xq = round-half-even(x * (127 / amax)) in
// [-127, 127] (all zero, dx = 0, for an all-zero block). blocks.py quantize_activations_ref does the
// same float32 operations, so both give the same integers.
struct Quantized {
  std::vector<int8_t> xq;    // [M, K]
  std::vector<float> dx;     // [M, blocks]
  std::vector<float> xsum;   // [M, blocks]: dx * sum(xq), the offsets' factor
};

Quantized quantize_activations(const Job& job, int block) {
  Quantized q{std::vector<int8_t>(job.M * job.K), std::vector<float>(job.M * job.blocks),
              std::vector<float>(job.M * job.blocks)};
  for (int64_t i = 0; i < job.M * job.blocks; ++i) {
    const float* x = job.x + i * block;
    float amax = 0.f;
    for (int j = 0; j < block; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    q.dx[i] = amax / 127.f;
    int32_t sum = 0;
    for (int j = 0; j < block; ++j) {
      const float r = std::nearbyint(x[j] * inv);  // the default rounding mode: half to even
      q.xq[i * block + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
      sum += q.xq[i * block + j];
    }
    q.xsum[i] = q.dx[i] * static_cast<float>(sum);
  }
  return q;
}

// The portable 8-bit-activation kernel: integer block dots in plain C++.
template <int BITS, int B, bool H>
void rows_q8(const Job& job, const int8_t* xq, const float* dx, const float* xsum, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.row_bytes;
    for (int64_t m = 0; m < job.M; ++m) {
      float sum = 0.f;
      for (int64_t b = 0; b < job.blocks; ++b) {
        const int8_t* xb = xq + m * job.K + b * B;
        int32_t dot = 0;
        if constexpr (BITS == 4) {
          for (int j = 0; j < 16; ++j) {
            const uint8_t v = row[b * 16 + j];
            dot += (v & 0x0F) * xb[j] + (v >> 4) * xb[16 + j];
          }
        } else {
          const int8_t* c = reinterpret_cast<const int8_t*>(row) + b * B;
          for (int j = 0; j < B; ++j) dot += c[j] * xb[j];
        }
        sum += static_cast<float>(dot) * (load_s<H>(job.scale, n * job.blocks + b) * dx[m * job.blocks + b]) +
               (job.offset ? load_s<H>(job.offset, n * job.blocks + b) * xsum[m * job.blocks + b] : 0.f);
      }
      job.y[m * job.N + n] = sum;
    }
  }
}

template <int BITS, int B, bool H>
void run_rows_q8_for(const Job& job, const Quantized& q, const float* xsum, int64_t n0, int64_t n1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (q8_vnni()) return rows_q8_vnni<BITS, B, H>(job, q.xq.data(), q.dx.data(), xsum, n0, n1);
#endif
  rows_q8<BITS, B, H>(job, q.xq.data(), q.dx.data(), xsum, n0, n1);
}

// Up to this many rows of x multiply straight from the codes; more (prefill) dequantize and use
// the BLAS (measured on a 3072 x 576 4-bit weight, AVX2, one core: direct is ahead up to M = 16,
// dequantize + BLAS from M = 24 on, 2.3 against 3.2 ms at M = 32).
constexpr int64_t kDirectRows = 16;

struct Checked {
  at::Tensor x, codes, scale, offset, y;
  Job job;
};

Checked check_args(const char* op, const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale,
                   const at::Tensor& offset, int64_t bits, int64_t block) {
  TORCH_CHECK_VALUE((bits == 4 && block == 32) || (bits == 8 && (block == 32 || block == 16)),
                    op, ": unsupported layout bits=", bits, " block=", block, " (4/32, 8/32 or 8/16)");
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
                   op, ": x must be float32 [M, K], got ", x_in.scalar_type(), " ", x_in.sizes());
  // offset [N, 0]: every offset is zero, and none is read (a quarter of a Q8_0 weight's bytes)
  const bool no_offset = offset.dim() == 2 && offset.size(1) == 0 && scale.dim() == 2 && offset.size(0) == scale.size(0);
  const bool half = scale.scalar_type() == at::kHalf;
  TORCH_CHECK_TYPE((scale.scalar_type() == at::kFloat || half) && offset.scalar_type() == scale.scalar_type() &&
                       scale.dim() == 2 && (scale.sizes() == offset.sizes() || no_offset),
                   op, ": scale and offset must be float32 or float16 [N, K / block], one type and one shape "
                   "(or offset [N, 0]: none), got ",
                   scale.scalar_type(), " ", scale.sizes(), " and ", offset.scalar_type(), " ", offset.sizes());
  const int64_t M = x_in.size(0), N = scale.size(0), blocks = scale.size(1), K = blocks * block;
  TORCH_CHECK_VALUE(x_in.size(1) == K, op, ": x has ", x_in.size(1), " columns, the weight ", K);
  const auto code_type = bits == 4 ? at::kByte : at::kChar;
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
  TORCH_CHECK_TYPE(codes.scalar_type() == code_type && codes.dim() == 2 && codes.size(0) == N &&
                       codes.size(1) == row_bytes,
                   op, ": codes must be ", code_type, " [", N, ", ", row_bytes, "], got ",
                   codes.scalar_type(), " ", codes.sizes());
  for (const at::Tensor* t : {&x_in, &codes, &scale, &offset}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, " (native CPU op): tensors must be on the CPU, got ",
                      t->device());
  }
  Checked c{x_in.contiguous(), codes.contiguous(), scale.contiguous(), offset.contiguous(), at::Tensor(), Job{}};
  c.y = at::empty({M, N}, c.x.options());
  c.job = Job{c.x.const_data_ptr<float>(), static_cast<const uint8_t*>(c.codes.const_data_ptr()),
              c.scale.const_data_ptr(), no_offset ? nullptr : c.offset.const_data_ptr(), half,
              c.y.mutable_data_ptr<float>(), M, N, K, row_bytes, blocks};
  return c;
}

// Chunks of at least ~64k weights, so a thread's share outweighs its start-up; a multiple of 4 rows
// (the register tile).
int64_t grain_rows(int64_t K) { return (std::max<int64_t>(8, (1 << 16) / std::max<int64_t>(1, K)) + 3) & ~int64_t{3}; }

// Prefill: enough rows of x to make the weights' decode negligible next to the multiply, which
// the BLAS does better. Dequantize a slab of rows at a time (bounded memory), then one matmul each.
void prefill(const Checked& c, int b, int bl) {
  const Job& job = c.job;
  const int64_t grain = grain_rows(job.K);
  const int64_t slab = std::max<int64_t>(1, std::min<int64_t>(job.N, (int64_t{64} << 20) / (4 * job.K)));
  at::Tensor w = at::empty({slab, job.K}, c.x.options());
  for (int64_t s0 = 0; s0 < job.N; s0 += slab) {
    const int64_t rows = std::min(slab, job.N - s0);
    float* wp = w.mutable_data_ptr<float>();
    at::parallel_for(s0, s0 + rows, grain, [&](int64_t n0, int64_t n1) { dequantize(job, b, bl, wp, s0, n0, n1); });
    c.y.narrow(1, s0, rows).copy_(at::mm(c.x, w.narrow(0, 0, rows).t()));
  }
}

}  // namespace

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& offset, int64_t bits, int64_t block) {
  const Checked c = check_args("block_linear", x, codes, scale, offset, bits, block);
  const Job& job = c.job;
  if (job.M == 0 || job.N == 0) return c.y;
  kernel();  // a bad NUDGEFAST_BLOCK_KERNEL raises here, not inside a worker thread
  const int b = static_cast<int>(bits), bl = static_cast<int>(block);
  if (job.M <= kDirectRows) {
    at::parallel_for(0, job.N, grain_rows(job.K), [&](int64_t n0, int64_t n1) { run_rows(job, b, bl, n0, n1); });
  } else {
    prefill(c, b, bl);
  }
  return c.y;
}

at::Tensor block_linear_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& offset, int64_t bits, int64_t block) {
  const Checked c = check_args("block_linear_q8", x, codes, scale, offset, bits, block);
  const Job& job = c.job;
  if (job.M == 0 || job.N == 0) return c.y;
  kernel();
  const int b = static_cast<int>(bits), bl = static_cast<int>(block);
  if (job.M > kDirectRows) {  // prefill stays exact (blocks.py block_linear_q8_ref says the same)
    prefill(c, b, bl);
    return c.y;
  }
  const Quantized q = quantize_activations(job, bl);
  const float* xsum = q.xsum.data();
  at::parallel_for(0, job.N, grain_rows(job.K), [&](int64_t n0, int64_t n1) {
    with_layout(job, b, bl, [&](auto bits_c, auto block_c, auto h) {
      run_rows_q8_for<decltype(bits_c)::value, decltype(block_c)::value, decltype(h)::value>(job, q, xsum, n0, n1);
    });
  });
  return c.y;
}

std::vector<std::string> block_kernels() {
  std::vector<std::string> out{"exact:", "q8:"};
  const Kernel k = kernel();
  out[0] += k == Kernel::kAvx512 ? "avx512" : k == Kernel::kAvx2 ? "avx2" : "portable";
  out[1] += q8_vnni() ? "avx512vnni" : "portable";
  for (const std::string& name : available_kernels()) out.push_back(name);
  return out;
}

// Which instruction set each native kernel runs here (recorded with benchmark results): block_linear
// picks its kernel at run time by CPU features (kernel()); the target_clones functions of simd.h users
// (paged_attention, rms_norm, sampler) get the x86-64-v3 clone where the CPU supports that level.
std::string kernel_isa() {
  const Kernel k = kernel();
  std::string block = k == Kernel::kAvx512 ? "avx512" : k == Kernel::kAvx2 ? "avx2+fma" : "portable";
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
  std::string clones = __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3" : "x86-64 baseline";
#else
  std::string clones = "compiler default (no per-ISA clones)";
#endif
  return "block_linear=" + block + ";paged_attention=" + clones + ";rms_norm=" + clones + ";sampler=" + clones +
         ";kv_store=compiler default;nudge_step=compiler default";
}

}  // namespace nudgefast
