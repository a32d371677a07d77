// Top-k routing and the fused router GEMM with AVX-512 (F, BW, VL, DQ) intrinsics: vector
// scoring arithmetic, key building and selection filtering over 16 experts at a time, and a
// 3-token x 8-expert dot-product GEMM tile. The algorithm is in topk_route-inl.h.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "dispatch/runtime.h"
#include "kernels/topk/topk_kernels.h"

// GCC 12's masked-load intrinsics start from an "undefined" vector and warn about it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace moekit {
namespace topk_avx512 {

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// 4 vectors -> the 4 horizontal sums, in one xmm.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

struct Ops {
  static constexpr int kLanes = 16;
  static constexpr int kTileM = 3;
  static constexpr int kTileN = 8;
  static constexpr int64_t kChunkH = 1024;

  static __m512 load16(const void* row, bool bf16, int64_t e, __mmask16 m) {
    if (bf16) {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + e);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(row) + e);
  }
  static void load_row(const void* row, bool bf16, int64_t n, float* out) {
    for (int64_t e = 0; e < n; e += 16) {
      const __mmask16 m = tail_mask(n - e);
      _mm512_mask_storeu_ps(out + e, m, load16(row, bf16, e, m));
    }
  }
  static float max_non_nan(const float* x, int64_t n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t e = 0; e < n; e += 16) {
      const __mmask16 m = tail_mask(n - e);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + e);
      const __mmask16 ordered = _mm512_mask_cmp_ps_mask(m, v, v, _CMP_ORD_Q);
      mx = _mm512_mask_max_ps(mx, ordered, mx, v);
    }
    return _mm512_reduce_max_ps(mx);
  }
  static void sigmoid_from_exp(float* t, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t e = 0; e < n; e += 16) {
      const __mmask16 m = tail_mask(n - e);
      const __m512 v = _mm512_maskz_loadu_ps(m, t + e);
      _mm512_mask_storeu_ps(t + e, m, _mm512_div_ps(one, _mm512_add_ps(one, v)));
    }
  }
  static void divide_by(float* t, int64_t n, double sum) {
    const __m512d s = _mm512_set1_pd(sum);
    for (int64_t e = 0; e < n; e += 8) {
      const __mmask8 m = static_cast<__mmask8>(n - e >= 8 ? 0xFF : (1u << (n - e)) - 1);
      const __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, t + e));
      _mm256_mask_storeu_ps(t + e, m, _mm512_cvtpd_ps(_mm512_div_pd(v, s)));
    }
  }
  static void make_keys(const float* scores, const float* bias, int64_t n, uint32_t* keys) {
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t e = 0; e < n; e += 16) {
      const __mmask16 m = tail_mask(n - e);
      __m512 c = _mm512_maskz_loadu_ps(m, scores + e);
      if (bias) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(m, bias + e));
      const __mmask16 nan = _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
      const __mmask16 is_zero = _mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_EQ_OQ);
      __m512i u = _mm512_mask_mov_epi32(_mm512_castps_si512(c), is_zero, zero);
      u = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
      _mm512_mask_storeu_epi32(keys + e, m, _mm512_mask_mov_epi32(u, nan, zero));
    }
  }
  static uint32_t mask_ge(const uint32_t* keys, int n, uint32_t threshold) {
    const __mmask16 m = tail_mask(n);
    const __m512i k = _mm512_maskz_loadu_epi32(m, keys);
    return _mm512_mask_cmpge_epu32_mask(m, k, _mm512_set1_epi32(static_cast<int>(threshold)));
  }

  // c[i][j] += a[i] . b[j] over n floats, for MR token rows and NR expert rows.
  template <int MR, int NR>
  static void dot_tile(const float* const* a, const float* const* b, int64_t n, float* c,
                       int64_t ldc) {
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    int64_t h = 0;
    for (; h + 16 <= n; h += 16) {
      __m512 av[MR];
      for (int i = 0; i < MR; ++i) av[i] = _mm512_loadu_ps(a[i] + h);
      for (int j = 0; j < NR; ++j) {
        const __m512 bv = _mm512_loadu_ps(b[j] + h);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
      }
    }
    if (h < n) {
      const __mmask16 m = tail_mask(n - h);
      __m512 av[MR];
      for (int i = 0; i < MR; ++i) av[i] = _mm512_maskz_loadu_ps(m, a[i] + h);
      for (int j = 0; j < NR; ++j) {
        const __m512 bv = _mm512_maskz_loadu_ps(m, b[j] + h);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      int j = 0;
      for (; j + 4 <= NR; j += 4)
        _mm_storeu_ps(ci + j, _mm_add_ps(_mm_loadu_ps(ci + j),
                                         hsum4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3])));
      for (; j < NR; ++j) ci[j] += _mm512_reduce_add_ps(acc[i][j]);
    }
  }
};

#include "kernels/topk/topk_route-inl.h"

}  // namespace topk_avx512

void topk_route_avx512(const TopkArgs& args) { topk_avx512::topk_route_run(args); }
void router_topk_avx512(const RouterTopkArgs& args) { topk_avx512::router_topk_run(args); }

}  // namespace moekit
