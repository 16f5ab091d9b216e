// What zskernels' CPU kernels share (AVX-512 with the BF16 and VNNI extensions): loading bf16, storing 16
// outputs as bf16, the walk over blocks of 16 output rows, and the two int8 planes of x that the int8 and int4
// kernels multiply with vpdpbusd.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

namespace zskernels_cpu {

// 32 bf16 values (16 pairs) as vdpbf16ps takes them.
inline __m512bh bf16_pairs(const at::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(reinterpret_cast<const void*>(p)));
}

// The first `left` of 16 lanes (all 16 when left >= 16).
inline __mmask16 lanes_below(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// 16 fp32 lanes -> bf16 at y, lanes outside `mask` left untouched.
inline void store_bf16(at::BFloat16* y, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(reinterpret_cast<void*>(y), mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// 16 bf16 at p (the first `left` of them) -> fp32.
inline __m512 load_bf16(const at::BFloat16* p, int64_t left) {
  const __m256i bits = _mm256_maskz_loadu_epi16(lanes_below(left), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Threads split `blocks` blocks of 16 output rows; each walks its share in spans of kSpan blocks, which stay in
// L1 while every row tile of x passes over them: on_span(b0, b1).
template <typename OnSpan>
void for_each_span(int64_t blocks, OnSpan on_span) {
  constexpr int64_t kSpan = 6;
  const int64_t grain = std::max<int64_t>(1, (blocks + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b0 = begin; b0 < end; b0 += kSpan) on_span(b0, std::min(end, b0 + kSpan));
  });
}

// x in two int8 planes, per row: with step = absmax / 127 and a = x / step (|a| <= 127), a = hi + lo / 254 + e,
// hi and lo integers in [-127, 127] and |e| <= 1/508 -- a step of absmax / 32258, finer than bf16 on every
// value of the row but the smallest. A row below 2^-64 is first scaled by 2^64 (exact), its outputs by 2^-64,
// so that 127 / absmax cannot overflow. Rows that are not finite are marked `exact` (their planes zero): the
// kernels compute them in fp32 instead, so that infinities and NaNs propagate as in IEEE arithmetic.
struct PlaneRow {
  float step = 0.f;     // absmax / 127 (of the scaled row); 0 for a row of zeros
  float unscale = 1.f;  // 1, or 2^-64 for a scaled row
  int32_t hi_sum = 0;   // sums of the planes over the row
  int32_t lo_sum = 0;
  bool exact = false;
};

struct Planes {
  std::vector<int8_t> hi, lo;  // (M, K)
  std::vector<PlaneRow> rows;  // (M)
  std::vector<int64_t> exact;  // the rows marked exact, ascending
};

// Row x (K values) -> its planes hi and lo.
inline PlaneRow quantise_row(const at::BFloat16* x, int64_t K, int8_t* hi, int8_t* lo) {
  // absmax through the bit patterns: |x| orders as an integer, and NaN and inf compare above FLT_MAX
  __m512i top = _mm512_setzero_si512();
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t k = 0; k < K; k += 16)
    top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_castps_si512(load_bf16(x + k, K - k)), magnitude));
  const uint32_t bits = _mm512_reduce_max_epu32(top);
  float absmax;
  std::memcpy(&absmax, &bits, sizeof(absmax));
  PlaneRow row;
  if (bits == 0 || bits >= 0x7F800000u) {  // zeros, or a row for the fp32 path
    row.exact = bits != 0;
    std::memset(hi, 0, K);
    std::memset(lo, 0, K);
    return row;
  }
  const float pre = absmax < 0x1p-64f ? 0x1p64f : 1.f;
  row.unscale = 1.f / pre;
  absmax *= pre;
  row.step = absmax / 127.f;
  const __m512 scaled = _mm512_set1_ps(pre), inv = _mm512_set1_ps(127.f / absmax), fine = _mm512_set1_ps(254.f);
  __m512i hi_sums = _mm512_setzero_si512(), lo_sums = _mm512_setzero_si512();
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = lanes_below(K - k);
    const __m512 a = _mm512_mul_ps(_mm512_mul_ps(load_bf16(x + k, K - k), scaled), inv);
    const __m512 h = _mm512_roundscale_ps(a, kNearest);
    const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(a, h), fine), kNearest);
    const __m512i hq = _mm512_cvtps_epi32(h), lq = _mm512_cvtps_epi32(l);
    hi_sums = _mm512_add_epi32(hi_sums, hq);
    lo_sums = _mm512_add_epi32(lo_sums, lq);
    _mm512_mask_cvtepi32_storeu_epi8(hi + k, mask, hq);
    _mm512_mask_cvtepi32_storeu_epi8(lo + k, mask, lq);
  }
  row.hi_sum = _mm512_reduce_add_epi32(hi_sums);
  row.lo_sum = _mm512_reduce_add_epi32(lo_sums);
  return row;
}

// Every row of x (M, K) in planes, rows split among threads.
inline Planes quantise(const at::BFloat16* x, int64_t M, int64_t K) {
  Planes planes{std::vector<int8_t>(M * K), std::vector<int8_t>(M * K), std::vector<PlaneRow>(M), {}};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      planes.rows[m] = quantise_row(x + m * K, K, planes.hi.data() + m * K, planes.lo.data() + m * K);
  });
  for (int64_t m = 0; m < M; ++m)
    if (planes.rows[m].exact) planes.exact.push_back(m);
  return planes;
}

// Four bytes of a plane, broadcast to every lane (vpdpbusd's signed operand).
inline __m512i broadcast_quad(const int8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, sizeof(quad));
  return _mm512_set1_epi32(quad);
}

}  // namespace zskernels_cpu
