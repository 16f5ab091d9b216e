// y (M, N) = x (M, K) @ (w * scale[:, None])^T for bf16 x, an int8 weight w (N, K) and a float32 scale per
// output row; bf16 output. AVX-512 VNNI: the weights are multiplied as stored, with no conversion. Notes on
// the scheme, the layout, the blocking and the measurements: zskernels/README.md, "CPU kernels". Bound to
// Python in cpu_kernels.cpp.
//
// x is quantised per row into two int8 planes: with step = absmax / 127 and a = x / step (|a| <= 127),
// a = hi + lo / 254 + e, hi and lo integers in [-127, 127] and |e| <= 1/508 (a step of absmax / 32258, finer
// than bf16 on every value of the row but the smallest). vpdpbusd multiplies unsigned by signed bytes, so the
// weights are stored offset, w + 128 in [0, 255], and each row's plane sums times 128 are subtracted. Sums
// in int32 (exact for K up to kMaxK), combined in fp32 as (hi_sum + lo_sum / 254) * step * scale, one rounding
// to bf16 (where, as in every bf16 conversion by vcvtneps2bf16, results below FLT_MIN become zero). Rows that
// are not finite are computed in fp32 instead, so that infinities and NaNs propagate as in IEEE arithmetic.
//
// Layout (int8_pack, once): blocks of 16 output rows, and within a block quads of consecutive K values side
// by side, [N / 16][K / 4][16][4] uint8 (N and K padded, the padding offset zeros): one 64-byte load holds
// the four K values of 16 outputs that one vpdpbusd consumes.
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>

#include "cpu_common.h"

namespace {

using zskernels_cpu::PlaneRow;
using zskernels_cpu::broadcast_quad;

constexpr int64_t kRows = 4;     // rows of x per register tile
constexpr int64_t kMaxK = 65536; // K / 4 vpdpbusd steps of at most 4 * 255 * 127 stay below 2^31
constexpr int kOffset = 128;     // stored weight = w + kOffset

// Accumulators per row tile: 2 planes * rows * blocks <= 24 of the 32 zmm registers, and at least 6 chains of
// vpdpbusd (a latency of about 5 cycles) in flight.
template <int R> constexpr int blocks_for_rows() { return R <= 2 ? 6 : 3; }

// Two planes' int32 sums of 16 outputs -> y (bf16), the outputs past N masked off.
inline void store_outputs(at::BFloat16* y, __m512i hi, __m512i lo, const PlaneRow& row, const float* scale,
                          int64_t n0, int64_t N) {
  const __m512i hi_exact = _mm512_sub_epi32(hi, _mm512_set1_epi32(kOffset * row.hi_sum));
  const __m512i lo_exact = _mm512_sub_epi32(lo, _mm512_set1_epi32(kOffset * row.lo_sum));
  const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo_exact), _mm512_set1_ps(1.f / 254.f),
                                     _mm512_cvtepi32_ps(hi_exact));
  const __mmask16 mask = zskernels_cpu::lanes_below(N - n0);
  const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scale + n0), _mm512_set1_ps(row.step));
  zskernels_cpu::store_bf16(y + n0, _mm512_mul_ps(_mm512_mul_ps(sum, s), _mm512_set1_ps(row.unscale)), mask);
}

// R rows of planes times B blocks of 16 outputs from block b0: each 64-byte weight load feeds 2 R vpdpbusd.
template <int R, int B>
void tile(const int8_t* hi, const int8_t* lo, int64_t K, const PlaneRow* rows, const uint8_t* w, const float* scale,
          at::BFloat16* y, int64_t ldy, int64_t b0, int64_t N) {
  const int64_t quads = K / 4;
  __m512i acc_hi[R][B], acc_lo[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc_hi[r][b] = acc_lo[r][b] = _mm512_setzero_si512();
  const uint8_t* block[B];
  for (int b = 0; b < B; ++b) block[b] = w + (b0 + b) * quads * 64;
  for (int64_t q = 0; q < quads; ++q) {
    __m512i wq[B];
    for (int b = 0; b < B; ++b) wq[b] = _mm512_loadu_si512(block[b] + q * 64);
    for (int r = 0; r < R; ++r) {  // four K values of row r, broadcast to every lane
      const __m512i hb = broadcast_quad(hi + r * K + 4 * q), lb = broadcast_quad(lo + r * K + 4 * q);
      for (int b = 0; b < B; ++b) {
        acc_hi[r][b] = _mm512_dpbusd_epi32(acc_hi[r][b], wq[b], hb);
        acc_lo[r][b] = _mm512_dpbusd_epi32(acc_lo[r][b], wq[b], lb);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      store_outputs(y + r * ldy, acc_hi[r][b], acc_lo[r][b], rows[r], scale, (b0 + b) * 16, N);
}

// Blocks [b, b1) for R rows in groups of B blocks, the remainder in one smaller group.
template <int R, int B>
void rows_by_blocks(const int8_t* hi, const int8_t* lo, int64_t K, const PlaneRow* rows, const uint8_t* w,
                    const float* scale, at::BFloat16* y, int64_t ldy, int64_t b, int64_t b1, int64_t N) {
  for (; b + B <= b1; b += B) tile<R, B>(hi, lo, K, rows, w, scale, y, ldy, b, N);
  if constexpr (B > 1)
    if (b < b1) rows_by_blocks<R, B - 1>(hi, lo, K, rows, w, scale, y, ldy, b, b1, N);
}

// Row x over blocks [b0, b1) in fp32, for a row the planes cannot represent: IEEE results, inf * 0 included.
// Vectorised like the planes' path (a row of garbage must not cost a scalar loop), k in ascending order.
void exact_row(const at::BFloat16* x, int64_t K, const uint8_t* w, const float* scale, at::BFloat16* y,
               int64_t b0, int64_t b1, int64_t N) {
  const int64_t quads = K / 4;
  const __m512i byte = _mm512_set1_epi32(0xFF), offset = _mm512_set1_epi32(kOffset);
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t q = 0; q < quads; ++q) {
      const __m512i v = _mm512_loadu_si512(w + (b * quads + q) * 64);
      for (int j = 0; j < 4; ++j) {  // K value 4q + j of 16 outputs
        const __m512i wj = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 8 * j), byte), offset);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(wj), _mm512_set1_ps(static_cast<float>(x[4 * q + j])), acc);
      }
    }
    const __mmask16 mask = zskernels_cpu::lanes_below(N - b * 16);
    zskernels_cpu::store_bf16(y + b * 16, _mm512_mul_ps(acc, _mm512_maskz_loadu_ps(mask, scale + b * 16)), mask);
  }
}

}  // namespace

// w (N, K) int8 -> [ceil(N / 16)][ceil(K / 4)][16][4] uint8, w + 128, padded with 128 (weight zero).
torch::Tensor int8_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.device().is_cpu(),
              "int8_pack: a 2-D int8 CPU tensor");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + 15) / 16, quads = (K + 3) / 4;
  TORCH_CHECK(4 * quads <= kMaxK, "int8_pack: K = ", K, " is over the ", kMaxK, " columns the kernel sums exactly");
  auto padded = torch::full({blocks * 16, quads * 4}, kOffset, w.options().dtype(torch::kUInt8));
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_((w.to(torch::kInt16) + kOffset).to(torch::kUInt8));
  return padded.view({blocks, 16, quads, 4}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
              "int8_matmul: x must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(3) == 4, "int8_matmul: the weight must come from int8_pack()");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(),
              "int8_matmul: scale must be a contiguous 1-D float32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = scale.size(0), blocks = packed.size(0), quads = packed.size(1);
  TORCH_CHECK(K == 4 * quads, "int8_matmul: x has ", K, " columns, the packed weight ", 4 * quads);
  TORCH_CHECK(N > 16 * (blocks - 1) && N <= 16 * blocks,
              "int8_matmul: ", N, " scales for ", blocks, " blocks of 16 rows");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();

  const zskernels_cpu::Planes planes = zskernels_cpu::quantise(xp, M, K);
  const int8_t* hi = planes.hi.data();
  const int8_t* lo = planes.lo.data();

  using RowsFn = void (*)(const int8_t*, const int8_t*, int64_t, const PlaneRow*, const uint8_t*, const float*,
                          at::BFloat16*, int64_t, int64_t, int64_t, int64_t);
  static constexpr RowsFn by_rows[kRows + 1] = {nullptr, rows_by_blocks<1, blocks_for_rows<1>()>,
                                                rows_by_blocks<2, blocks_for_rows<2>()>,
                                                rows_by_blocks<3, blocks_for_rows<3>()>,
                                                rows_by_blocks<4, blocks_for_rows<4>()>};
  zskernels_cpu::for_each_span(blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t m = 0; m < M; m += kRows)
      by_rows[std::min(kRows, M - m)](hi + m * K, lo + m * K, K, planes.rows.data() + m, wp, sp, yp + m * N, N, b0,
                                      b1, N);
    for (const int64_t m : planes.exact)
      exact_row(xp + m * K, K, wp, sp, yp + m * N, b0, b1, N);
  });
  return y;
}
