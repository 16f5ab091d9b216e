// y (M, N) = x (M, K) @ W_hat^T for bf16 x and an int4 weight with a scale and a min per group of K,
// W_hat[n, k] = q[n, k] * scale[n, k / g] + min[n, k / g], q in 0..15 (zskernels/formats/int4.py); bf16
// output. AVX-512 VNNI: the codes are multiplied as they are, against x in two int8 planes (cpu_common.h).
// Notes and measurements: zskernels/README.md, "CPU kernels". Bound to Python in cpu_kernels.cpp.
//
// The weight arrives packed once by zskernels/_cpu_kernel.py (int4_pack): blocks of 16 output rows, and within
// a block one 32-bit lane per output for each octet of K, [N / 16][K / 8][16][4] uint8, byte j of a lane holding
// code k0 + j in its low nibble and code k0 + 4 + j in its high one: a mask and a shift make the two quads of
// codes that two vpdpbusd take, with no other conversion. Per group and block, 16 fp32 scales and 16 fp32 mins,
// [N / 16][groups][16].
//
// Per group, sum_k a q and sum_k a (a = x / step as the planes hold it, hi + lo / 254) are exact in int32;
// then y = step * sum_g (scale_g * sum_k a q + min_g * sum_k a) in fp32, one rounding to bf16.
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>

#include "cpu_common.h"

namespace {

using zskernels_cpu::PlaneRow;
using zskernels_cpu::broadcast_quad;

constexpr int64_t kRows = 4;  // rows of x per register tile

// Group accumulators per row tile (2 planes * rows * blocks, at most 24 zmm); the fp32 totals, touched once a
// group, may live in memory.
template <int R> constexpr int blocks_for_rows() { return R == 1 ? 6 : R == 2 ? 4 : 3; }

struct Operands {
  const int8_t* hi;        // planes of x, (M, K)
  const int8_t* lo;
  const PlaneRow* rows;    // (M)
  const uint8_t* w;        // [blocks][octets][16][4]
  const float* scale;      // [blocks][groups][16]
  const float* min;        // [blocks][groups][16]
  const float* xsum;       // (M, groups): sum_k a over each group
  at::BFloat16* y;         // (M, N)
  int64_t K, N, octets, groups, group_octets;
};

// R rows from row m times B blocks of 16 outputs from block b0: each 64-byte load of codes feeds 4 R vpdpbusd;
// a group's integer sums are scaled into the fp32 totals when the group ends.
template <int R, int B>
void tile(const Operands& op, int64_t m, int64_t b0) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 total[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) total[r][b] = _mm512_setzero_ps();
  float xs[R];  // sum_k a over the group, per row
  for (int64_t g = 0; g < op.groups; ++g) {
    __m512i acc_hi[R][B], acc_lo[R][B];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < B; ++b) acc_hi[r][b] = acc_lo[r][b] = _mm512_setzero_si512();
    for (int64_t o = g * op.group_octets; o < (g + 1) * op.group_octets; ++o) {
      __m512i low[B], high[B];  // codes k0..k0+3 and k0+4..k0+7 of 16 outputs
      for (int b = 0; b < B; ++b) {
        const __m512i v = _mm512_loadu_si512(op.w + ((b0 + b) * op.octets + o) * 64);
        low[b] = _mm512_and_si512(v, nibble);
        high[b] = _mm512_and_si512(_mm512_srli_epi32(v, 4), nibble);
      }
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m + r) * op.K + 8 * o;
        const __m512i h0 = broadcast_quad(op.hi + at), h1 = broadcast_quad(op.hi + at + 4);
        const __m512i l0 = broadcast_quad(op.lo + at), l1 = broadcast_quad(op.lo + at + 4);
        for (int b = 0; b < B; ++b) {
          acc_hi[r][b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_hi[r][b], low[b], h0), high[b], h1);
          acc_lo[r][b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_lo[r][b], low[b], l0), high[b], l1);
        }
      }
    }
    for (int r = 0; r < R; ++r) xs[r] = op.xsum[(m + r) * op.groups + g];
    for (int b = 0; b < B; ++b) {
      const int64_t at = ((b0 + b) * op.groups + g) * 16;
      const __m512 scale = _mm512_loadu_ps(op.scale + at), min = _mm512_loadu_ps(op.min + at);
      for (int r = 0; r < R; ++r) {
        const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_lo[r][b]), _mm512_set1_ps(1.f / 254.f),
                                           _mm512_cvtepi32_ps(acc_hi[r][b]));
        total[r][b] = _mm512_fmadd_ps(sum, scale, _mm512_fmadd_ps(min, _mm512_set1_ps(xs[r]), total[r][b]));
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t n0 = (b0 + b) * 16;
    const __mmask16 mask = zskernels_cpu::lanes_below(op.N - n0);
    for (int r = 0; r < R; ++r) {
      const PlaneRow& row = op.rows[m + r];
      const __m512 y = _mm512_mul_ps(_mm512_mul_ps(total[r][b], _mm512_set1_ps(row.step)), _mm512_set1_ps(row.unscale));
      zskernels_cpu::store_bf16(op.y + (m + r) * op.N + n0, y, mask);
    }
  }
}

// Blocks [b, b1) for rows [m, m + R) in groups of B blocks, the remainder in one smaller group.
template <int R, int B>
void rows_by_blocks(const Operands& op, int64_t m, int64_t b, int64_t b1) {
  for (; b + B <= b1; b += B) tile<R, B>(op, m, b);
  if constexpr (B > 1)
    if (b < b1) rows_by_blocks<R, B - 1>(op, m, b, b1);
}

// Row m over blocks [b0, b1) in fp32, for a row the planes cannot represent: IEEE results, inf * 0 included.
// Vectorised like the planes' path (a row of garbage must not cost a scalar loop), k in ascending order.
void exact_row(const Operands& op, const at::BFloat16* x, int64_t m, int64_t b0, int64_t b1) {
  const __m512i nibble = _mm512_set1_epi8(0x0F), byte = _mm512_set1_epi32(0xFF);
  const at::BFloat16* row = x + m * op.K;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < op.groups; ++g) {
      const __m512 scale = _mm512_loadu_ps(op.scale + (b * op.groups + g) * 16);
      const __m512 min = _mm512_loadu_ps(op.min + (b * op.groups + g) * 16);
      for (int64_t o = g * op.group_octets; o < (g + 1) * op.group_octets; ++o) {
        const __m512i v = _mm512_loadu_si512(op.w + (b * op.octets + o) * 64);
        const __m512i halves[2] = {_mm512_and_si512(v, nibble), _mm512_and_si512(_mm512_srli_epi32(v, 4), nibble)};
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < 4; ++j) {  // K value 8o + 4h + j of 16 outputs
            const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(halves[h], 8 * j), byte));
            const float xk = static_cast<float>(row[8 * o + 4 * h + j]);
            acc = _mm512_fmadd_ps(_mm512_fmadd_ps(q, scale, min), _mm512_set1_ps(xk), acc);
          }
      }
    }
    const __mmask16 mask = zskernels_cpu::lanes_below(op.N - b * 16);
    zskernels_cpu::store_bf16(op.y + m * op.N + b * 16, acc, mask);
  }
}

// Per row and group of K, sum_k a = sum hi + sum lo / 254 (exact integer sums; zero for the rows computed in fp32).
std::vector<float> group_sums(const zskernels_cpu::Planes& planes, int64_t M, int64_t K, int64_t groups) {
  std::vector<float> sums(M * groups);
  const int64_t group = K / groups;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        int32_t hi = 0, lo = 0;
        for (int64_t k = m * K + g * group; k < m * K + (g + 1) * group; ++k) {
          hi += planes.hi[k];
          lo += planes.lo[k];
        }
        sums[m * groups + g] = static_cast<float>(hi) + static_cast<float>(lo) * (1.f / 254.f);
      }
  });
  return sums;
}

}  // namespace

torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                          const torch::Tensor& min, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
              "int4_matmul: x must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(3) == 4,
              "int4_matmul: the codes must be [N / 16][K / 8][16][4] uint8");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), octets = packed.size(1);
  TORCH_CHECK(K == 8 * octets, "int4_matmul: x has ", K, " columns, the packed codes ", 8 * octets);
  TORCH_CHECK(N > 16 * (blocks - 1) && N <= 16 * blocks, "int4_matmul: ", N, " outputs for ", blocks, " blocks of 16");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == blocks && scale.size(2) == 16 && scale.is_contiguous() &&
              scale.scalar_type() == torch::kFloat32 && min.sizes() == scale.sizes() && min.is_contiguous() &&
              min.scalar_type() == torch::kFloat32,
              "int4_matmul: scale and min must be contiguous float32 [N / 16][groups][16]");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && octets % groups == 0, "int4_matmul: ", octets, " octets of K do not split into ", groups,
              " groups");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const zskernels_cpu::Planes planes = zskernels_cpu::quantise(xp, M, K);
  const std::vector<float> xsum = group_sums(planes, M, K, groups);
  const Operands op{planes.hi.data(), planes.lo.data(), planes.rows.data(), packed.data_ptr<uint8_t>(),
                    scale.data_ptr<float>(), min.data_ptr<float>(), xsum.data(),
                    y.data_ptr<at::BFloat16>(), K, N, octets, groups, octets / groups};
  using RowsFn = void (*)(const Operands&, int64_t, int64_t, int64_t);
  static constexpr RowsFn by_rows[kRows + 1] = {nullptr, rows_by_blocks<1, blocks_for_rows<1>()>,
                                                rows_by_blocks<2, blocks_for_rows<2>()>,
                                                rows_by_blocks<3, blocks_for_rows<3>()>,
                                                rows_by_blocks<4, blocks_for_rows<4>()>};
  zskernels_cpu::for_each_span(blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t m = 0; m < M; m += kRows) by_rows[std::min(kRows, M - m)](op, m, b0, b1);
    for (const int64_t m : planes.exact) exact_row(op, xp, m, b0, b1);
  });
  return y;
}
