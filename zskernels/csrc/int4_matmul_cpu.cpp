// y (M, N) = x (M, K) @ W_hat^T for bf16 x and an int4 weight with a scale and a min per group of K,
// W_hat[n, k] = q[n, k] * scale[n, k / g] + min[n, k / g], q in 0..15 (zskernels/formats/int4.py); fp32
// accumulation, bf16 output. AVX-512 with the BF16 extension. Notes and measurements: zskernels/README.md,
// "CPU kernels". Bound to Python in cpu_kernels.cpp.
//
// The weight arrives packed once by zskernels/_cpu_kernel.py (int4_pack): blocks of 16 output rows, and within
// a block one byte per output for each pair of K values, [N / 16][K / 2][16] uint8 with K's even value in the
// low nibble (the stored codes' own byte, transposed per block). Per group and block, 16 fp32 scales and 16 fp32
// offsets (min - 128 scale), [N / 16][groups][16]; and per row of x its sum over each group, (M, groups).
//
// A code q becomes the bf16 value 128 + q by bit arithmetic alone (0x4300 is 128.0, and from 128 to 256 the
// bf16 step is 1), so no conversion instruction is needed: sum_k x (128 + q) is accumulated per group, and
// scale * that + offset * sum_k x = sum_k x (q scale + min). The products are exact in fp32; the 128 sum_k x
// it takes out again costs about 2^-24 * 128 relative to the row's values, far below bf16's rounding.
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu_common.h"

namespace {

using zskernels_cpu::bf16_pairs;

constexpr int64_t kRows = 4;  // rows of x per register tile
constexpr int64_t kExpandRows = 64;  // from this many rows on, codes are expanded once per span of blocks

// Accumulators per row tile: group sums and totals, 2 * rows * blocks <= 24 of the 32 zmm registers.
template <int R> constexpr int blocks_for_rows() { return R == 1 ? 8 : R == 2 ? 4 : R == 3 ? 4 : 3; }

// 16 outputs' bytes (two codes each) -> the 32 bf16 values 128 + q that vdpbf16ps multiplies, in pairs.
// (Codes expanded earlier, for many rows, are loaded as they are: cpu_common.h's bf16_pairs.)
inline __m512bh bf16_pairs(const uint8_t* p) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i low = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
  const __m512i high = _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF0)), 12);
  return reinterpret_cast<__m512bh>(_mm512_or_si512(_mm512_or_si512(low, high), _mm512_set1_epi32(0x43004300)));
}

struct Operands {
  const at::BFloat16* x;  // (M, K)
  const uint8_t* w;       // [blocks][pairs][16]
  const float* scale;     // [blocks][groups][16]
  const float* offset;    // [blocks][groups][16]
  const float* xsum;      // (M, groups)
  at::BFloat16* y;        // (M, N)
  int64_t K, N, pairs, groups, group_pairs;
};

// R rows of x from row m times B blocks of 16 outputs from block b0 (b0 - first in w, whose blocks are
// numbered from block first): each code pair is loaded and expanded once for the R rows; a group's sums are
// scaled into the totals when the group ends.
template <int R, int B, typename W>
void tile(const Operands& op, const W* w, int64_t first, int64_t m, int64_t b0) {
  constexpr int64_t step = sizeof(W) == 1 ? 16 : 32;  // a pair's elements per block: 16 bytes or 32 bf16
  __m512 total[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) total[r][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < op.groups; ++g) {
    __m512 acc[R][B];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int64_t p = g * op.group_pairs; p < (g + 1) * op.group_pairs; ++p) {
      __m512bh wp[B];
      for (int b = 0; b < B; ++b) wp[b] = bf16_pairs(w + ((b0 - first + b) * op.pairs + p) * step);
      for (int r = 0; r < R; ++r) {
        int32_t both;  // x[m + r, 2p] and x[m + r, 2p + 1], broadcast to every lane
        std::memcpy(&both, op.x + (m + r) * op.K + 2 * p, sizeof(both));
        const __m512bh xp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(both));
        for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wp[b], xp);
      }
    }
    for (int b = 0; b < B; ++b) {
      const int64_t at = ((b0 + b) * op.groups + g) * 16;
      const __m512 scale = _mm512_loadu_ps(op.scale + at), offset = _mm512_loadu_ps(op.offset + at);
      for (int r = 0; r < R; ++r) {
        const __m512 xs = _mm512_set1_ps(op.xsum[(m + r) * op.groups + g]);
        total[r][b] = _mm512_fmadd_ps(acc[r][b], scale, _mm512_fmadd_ps(offset, xs, total[r][b]));
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t n0 = (b0 + b) * 16;
    const __mmask16 mask = zskernels_cpu::lanes_below(op.N - n0);
    for (int r = 0; r < R; ++r) zskernels_cpu::store_bf16(op.y + (m + r) * op.N + n0, total[r][b], mask);
  }
}

// Blocks [b0, b1) for rows [m, m + R): full groups of blocks_for_rows<R>() blocks, then single blocks.
template <int R, typename W>
void rows_by_blocks(const Operands& op, const W* w, int64_t first, int64_t m, int64_t b0, int64_t b1) {
  constexpr int B = blocks_for_rows<R>();
  int64_t b = b0;
  for (; b + B <= b1; b += B) tile<R, B>(op, w, first, m, b);
  for (; b < b1; ++b) tile<R, 1>(op, w, first, m, b);
}

// Every row of x over blocks [b0, b1), w holding blocks from first on.
template <typename W>
void all_rows(const Operands& op, int64_t M, const W* w, int64_t first, int64_t b0, int64_t b1) {
  using RowsFn = void (*)(const Operands&, const W*, int64_t, int64_t, int64_t, int64_t);
  static constexpr RowsFn by_rows[kRows + 1] = {nullptr, rows_by_blocks<1, W>, rows_by_blocks<2, W>,
                                                rows_by_blocks<3, W>, rows_by_blocks<4, W>};
  for (int64_t m = 0; m < M; m += kRows) by_rows[std::min(kRows, M - m)](op, w, first, m, b0, b1);
}

}  // namespace

torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                          const torch::Tensor& offset, const torch::Tensor& xsum, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
              "int4_matmul: x must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
              packed.size(2) == 16, "int4_matmul: the codes must be [N / 16][K / 2][16] uint8");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(K == 2 * pairs, "int4_matmul: x has ", K, " columns, the packed codes ", 2 * pairs);
  TORCH_CHECK(N > 16 * (blocks - 1) && N <= 16 * blocks, "int4_matmul: ", N, " outputs for ", blocks, " blocks of 16");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == blocks && scale.size(2) == 16 && scale.is_contiguous() &&
              scale.scalar_type() == torch::kFloat32 && offset.sizes() == scale.sizes() && offset.is_contiguous() &&
              offset.scalar_type() == torch::kFloat32,
              "int4_matmul: scale and offset must be contiguous float32 [N / 16][groups][16]");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && pairs % groups == 0, "int4_matmul: ", pairs, " pairs of K do not split into ", groups, " groups");
  TORCH_CHECK(xsum.dim() == 2 && xsum.size(0) == M && xsum.size(1) == groups && xsum.is_contiguous() &&
              xsum.scalar_type() == torch::kFloat32, "int4_matmul: xsum must be contiguous float32 (M, groups)");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Operands op{x.data_ptr<at::BFloat16>(), packed.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                    offset.data_ptr<float>(), xsum.data_ptr<float>(), y.data_ptr<at::BFloat16>(),
                    K, N, pairs, groups, pairs / groups};
  // Spans of blocks as cpu_common.h's for_each_span walks them; from kExpandRows rows on, a span's codes are
  // expanded to bf16 once instead of once per row tile.
  const auto codes = [](const uint8_t* p) { return bf16_pairs(p); };
  zskernels_cpu::for_each_span(blocks, pairs, op.w, 16, M >= kExpandRows, codes,
                               [&](int64_t b0, int64_t b1, const at::BFloat16* expanded) {
                                 if (expanded != nullptr) all_rows(op, M, expanded, b0, b0, b1);
                                 else all_rows(op, M, op.w, 0, b0, b1);
                               });
  return y;
}
