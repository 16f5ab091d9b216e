// What zskernels' CPU kernels share (AVX-512 with the BF16 extension): loading bf16 pairs, storing 16 outputs
// as bf16, and the walk over blocks of 16 output rows that the int8 and int4 kernels take.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
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

// Threads split `blocks` blocks of 16 output rows; each walks its share in spans of kSpan blocks, which stay
// in L1 while every row tile of x passes over them. With `expand`, a span's weight pairs are first expanded
// to bf16 (`to_pairs` on each pair's `pair_size` elements of w, `pairs` per block) into a per-thread buffer
// that stays in L2: once per span instead of once per row tile, which pays from enough rows of x on.
// on_span(b0, b1, expanded) then runs blocks [b0, b1) on the buffer (block b0 at its start) or, without
// expansion, on w itself (expanded is null).
template <typename T, typename ToPairs, typename OnSpan>
void for_each_span(int64_t blocks, int64_t pairs, const T* w, int64_t pair_size, bool expand, ToPairs to_pairs,
                   OnSpan on_span) {
  constexpr int64_t kSpan = 6;
  const int64_t grain = std::max<int64_t>(1, (blocks + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> expanded(expand ? kSpan * pairs * 32 : 0);
    for (int64_t b0 = begin; b0 < end; b0 += kSpan) {
      const int64_t b1 = std::min(end, b0 + kSpan);
      if (!expand) {
        on_span(b0, b1, static_cast<const at::BFloat16*>(nullptr));
        continue;
      }
      const T* source = w + b0 * pairs * pair_size;
      for (int64_t i = 0; i < (b1 - b0) * pairs; ++i)
        _mm512_storeu_si512(reinterpret_cast<void*>(expanded.data() + i * 32),
                            reinterpret_cast<__m512i>(to_pairs(source + i * pair_size)));
      on_span(b0, b1, static_cast<const at::BFloat16*>(expanded.data()));
    }
  });
}

}  // namespace zskernels_cpu
