// y (M, N) = x (M, K) @ (w * scale[:, None])^T for bf16 x, an int8 weight w (N, K) and a float32 scale per
// output row; fp32 accumulation, bf16 output. AVX-512 with the BF16 extension (avx512_bf16). Notes on the
// layout, the blocking and the measurements: zskernels/README.md, "CPU kernels". Bound to Python in
// cpu_kernels.cpp.
//
// The weight arrives packed once by zskernels/_cpu_kernel.py: blocks of 16 output rows, and within a block
// pairs of consecutive K values side by side, [N / 16][K / 2][16][2] int8 (N and K zero-padded to 16 and
// to even). One 32-byte load then holds the two K values of 16 outputs that one vdpbf16ps consumes.
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu_common.h"

namespace {

using zskernels_cpu::bf16_pairs;

constexpr int64_t kRows = 8;  // rows of x per register tile

// Accumulators per row tile: rows * blocks <= 24 of the 32 zmm registers, the rest hold the weights.
template <int R> constexpr int blocks_for_rows() { return R == 1 ? 8 : R == 2 ? 8 : R <= 4 ? 6 : R <= 6 ? 4 : 3; }

// 16 outputs' pairs (32 int8) -> the 32 bf16 values vdpbf16ps multiplies. int8 is exact in bf16. (Pairs
// converted earlier, for many rows, are loaded as they are: cpu_common.h's bf16_pairs.)
inline __m512bh bf16_pairs(const int8_t* p) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// acc * scale -> bf16, the outputs past N masked off.
inline void store_row(at::BFloat16* y, __m512 acc, const float* scale, int64_t n0, int64_t N) {
  const __mmask16 mask = zskernels_cpu::lanes_below(N - n0);
  zskernels_cpu::store_bf16(y + n0, _mm512_mul_ps(acc, _mm512_maskz_loadu_ps(mask, scale + n0)), mask);
}

// R rows of x times B blocks of 16 outputs, starting at block b0: every weight pair is loaded and converted
// once and used by all R rows.
template <int R, int B, typename W>
void tile(const at::BFloat16* x, int64_t ldx, const W* w, int64_t pairs, const float* scale,
          at::BFloat16* y, int64_t ldy, int64_t b0, int64_t N) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  const W* block[B];
  for (int b = 0; b < B; ++b) block[b] = w + (b0 + b) * pairs * 32;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wp[B];
    for (int b = 0; b < B; ++b) wp[b] = bf16_pairs(block[b] + p * 32);
    for (int r = 0; r < R; ++r) {
      int32_t both;  // x[r, 2p] and x[r, 2p + 1], broadcast to every lane
      std::memcpy(&both, x + r * ldx + 2 * p, sizeof(both));
      const __m512bh xp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(both));
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wp[b], xp);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) store_row(y + r * ldy, acc[r][b], scale, (b0 + b) * 16, N);
}

// Blocks [b0, b1) for R rows: full groups of blocks_for_rows<R>() blocks, then single blocks.
template <int R, typename W>
void rows_by_blocks(const at::BFloat16* x, int64_t ldx, const W* w, int64_t pairs, const float* scale,
                    at::BFloat16* y, int64_t ldy, int64_t b0, int64_t b1, int64_t N) {
  constexpr int B = blocks_for_rows<R>();
  int64_t b = b0;
  for (; b + B <= b1; b += B) tile<R, B>(x, ldx, w, pairs, scale, y, ldy, b, N);
  for (; b < b1; ++b) tile<R, 1>(x, ldx, w, pairs, scale, y, ldy, b, N);
}

// Every row of x over blocks [b0, b1) of w, whose block 0 is output block `first` (a converted span's).
template <typename W>
void all_rows(const at::BFloat16* x, int64_t M, int64_t K, const W* w, int64_t pairs, const float* scale,
              at::BFloat16* y, int64_t b0, int64_t b1, int64_t N, int64_t first) {
  using RowsFn = void (*)(const at::BFloat16*, int64_t, const W*, int64_t, const float*, at::BFloat16*,
                          int64_t, int64_t, int64_t, int64_t);
  static constexpr RowsFn by_rows[kRows + 1] = {
      nullptr, rows_by_blocks<1, W>, rows_by_blocks<2, W>, rows_by_blocks<3, W>, rows_by_blocks<4, W>,
      rows_by_blocks<5, W>, rows_by_blocks<6, W>, rows_by_blocks<7, W>, rows_by_blocks<8, W>};
  // shift y and the scales to w's first block
  for (int64_t m = 0; m < M; m += kRows) {
    const int64_t rows = std::min(kRows, M - m);
    by_rows[rows](x + m * K, K, w, pairs, scale + first * 16, y + m * N + first * 16, N, b0, b1, N - first * 16);
  }
}

}  // namespace

// w (N, K) int8 -> [ceil(N / 16)][ceil(K / 2)][16][2], zero-padded.
torch::Tensor int8_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.device().is_cpu(), "int8_pack: a 2-D int8 CPU tensor");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + 15) / 16, pairs = (K + 1) / 2;
  auto padded = torch::zeros({blocks * 16, pairs * 2}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  return padded.view({blocks, 16, pairs, 2}).permute({0, 2, 1, 3}).contiguous();
}

// convert_rows: from this many rows of x on, a span's weights are converted to bf16 once instead of once per row
// tile (where that starts to pay depends on the CPU: the caller reads it from configs/cpu_routes.json).
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                          int64_t convert_rows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
              "int8_matmul: x must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kInt8 && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(3) == 2, "int8_matmul: the weight must come from int8_pack()");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(),
              "int8_matmul: scale must be a contiguous 1-D float32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = scale.size(0), blocks = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(K == 2 * pairs, "int8_matmul: x has ", K, " columns, the packed weight ", 2 * pairs);
  TORCH_CHECK(N > 16 * (blocks - 1) && N <= 16 * blocks, "int8_matmul: ", N, " scales for ", blocks, " blocks of 16 rows");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // Spans of blocks as cpu_common.h's for_each_span walks them, converted once per span from convert_rows on.
  const auto weights = [](const int8_t* p) { return bf16_pairs(p); };
  zskernels_cpu::for_each_span(blocks, pairs, wp, 32, M >= convert_rows, weights,
                               [&](int64_t b0, int64_t b1, const at::BFloat16* converted) {
                                 if (converted != nullptr)
                                   all_rows(xp, M, K, converted, pairs, sp, yp, 0, b1 - b0, N, b0);
                                 else
                                   all_rows(xp, M, K, wp, pairs, sp, yp, b0, b1, N, 0);
                               });
  return y;
}
