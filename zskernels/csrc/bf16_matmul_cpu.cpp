// y (M, N) = x (M, K) @ w^T for bf16 x and a bf16 weight w (N, K) in its own row-major layout (no packed copy:
// the float factors stay the only copy in memory); fp32 accumulation, bf16 output. AVX-512 with the BF16
// extension. Notes and measurements: zskernels/README.md, "CPU kernels". Bound to Python in cpu_kernels.cpp.
//
// Each output is a dot product along K: 32 bf16 of x and of a weight row per vdpbf16ps into 16 fp32 lanes,
// summed across lanes at the end (sixteen or eight outputs at a time). A tile of R rows of x and B weight rows
// loads each weight vector once for the R rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

#include "cpu_common.h"

namespace {

using zskernels_cpu::bf16_pairs;

constexpr int64_t kBlock = 16;  // weight rows per block; a block of 16 rows of K stays in L1 for every row tile

// a[i] lane sums -> lanes of one vector: after the two unpack levels each 128-bit chunk c of s[j] holds
// chunk c's partial sums of a[4j .. 4j + 3], in that order.
template <int B>
inline void partial_quads(const __m512* a, __m512* s) {
  __m512 pairs[B / 2];
  for (int i = 0; i < B / 2; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < B / 4; ++i) {
    const __m512d p = _mm512_castps_pd(pairs[2 * i]), q = _mm512_castps_pd(pairs[2 * i + 1]);
    s[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  }
}

// chunks (c0, c1, c2, c3) of a and b -> (a0 + a1, a2 + a3, b0 + b1, b2 + b3)
inline __m512 add_chunk_pairs(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// The lane sums of B accumulators into out[0 .. B).
template <int B>
inline void store_sums(const __m512* acc, float* out) {
  __m512 quads[B / 4];
  partial_quads<B>(acc, quads);
  if constexpr (B == 16) {
    _mm512_storeu_ps(out, add_chunk_pairs(add_chunk_pairs(quads[0], quads[1]), add_chunk_pairs(quads[2], quads[3])));
  } else if constexpr (B == 8) {
    const __m512 t = add_chunk_pairs(quads[0], quads[1]);  // (A01, A23, B01, B23)
    const __m512 u = add_chunk_pairs(t, t);                // (A, B, A, B)
    _mm256_storeu_ps(out, _mm512_castps512_ps256(u));
  } else {
    static_assert(B == 4, "4, 8 or 16 weight rows per tile");
    const __m512 t = add_chunk_pairs(quads[0], quads[0]);
    _mm_storeu_ps(out, _mm512_castps512_ps128(add_chunk_pairs(t, t)));
  }
}

// The K remainder's pairs: masked lanes read as zeros.
inline __m512bh bf16_pairs(const at::BFloat16* p, __mmask32 mask) {
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p)));
}

// R rows of x times the B weight rows w[b]; sums into out[r * B + b].
template <int R, int B>
void tile(const at::BFloat16* x, int64_t ldx, const at::BFloat16* const* w, int64_t K, float* out) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = bf16_pairs(x + r * ldx + k);
    for (int b = 0; b < B; ++b) {
      const __m512bh wv = bf16_pairs(w[b] + k);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv[r], wv);
    }
  }
  if (k < K) {  // the K remainder: masked loads fill the rest with zeros
    const __mmask32 mask = __mmask32((1ull << (K - k)) - 1);
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = bf16_pairs(x + r * ldx + k, mask);
    for (int b = 0; b < B; ++b) {
      const __m512bh wv = bf16_pairs(w[b] + k, mask);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv[r], wv);
    }
  }
  for (int r = 0; r < R; ++r) store_sums<B>(acc[r], out + r * B);
}

// Rows [m, m + R) of x against the 16 weight rows of one block: one tile of 16, or two of 8 for R > 1 (the
// accumulators, R * B, must leave registers for x and w).
template <int R>
void rows_by_block(const at::BFloat16* x, int64_t K, const at::BFloat16* const* w, float* sums /*R x 16*/) {
  if constexpr (R == 1) {
    tile<1, 16>(x, K, w, K, sums);
  } else {
    float half[R * 8];
    for (int h = 0; h < 2; ++h) {
      tile<R, 8>(x, K, w + 8 * h, K, half);
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < 8; ++b) sums[r * 16 + 8 * h + b] = half[r * 8 + b];
    }
  }
}

}  // namespace

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
              "bf16_linear: x must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.device().is_cpu(),
              "bf16_linear: w must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(x.size(1) == w.size(1), "bf16_linear: x has ", x.size(1), " columns, w ", w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, (blocks + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float sums[3 * kBlock];
    const at::BFloat16* rows[kBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kBlock, n = std::min(kBlock, N - n0);
      // a last, partial block repeats its last row; those sums are not stored
      for (int64_t b = 0; b < kBlock; ++b) rows[b] = wp + (n0 + std::min(b, n - 1)) * K;
      for (int64_t m = 0; m < M;) {
        const int64_t r = M - m == 1 ? 1 : M - m == 2 || M - m == 4 ? 2 : 3;
        if (r == 1) rows_by_block<1>(xp + m * K, K, rows, sums);
        else if (r == 2) rows_by_block<2>(xp + m * K, K, rows, sums);
        else rows_by_block<3>(xp + m * K, K, rows, sums);
        for (int64_t i = 0; i < r; ++i)
          for (int64_t b = 0; b < n; ++b) yp[(m + i) * N + n0 + b] = at::BFloat16(sums[i * kBlock + b]);
        m += r;
      }
    }
  });
  return y;
}
