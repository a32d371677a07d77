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
  const __m256 half =
      _mm256_add_ps(_mm512_castps512_ps256(abcd),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

struct Ops {
  static constexpr int kLanes = 16;
  static constexpr int kTileM = 3;
  static constexpr int kTileN = 8;
  // Experts per dot tile of the router GEMM: 3 x 4 tiles beat 3 x 8 ones (which spill their
  // row pointers) on a 16-thread AMX machine at M = 64: 1.03 / 1.49x OpenBLAS against 0.96 / 1.00.
  static constexpr int kDotTileN = 4;
  static constexpr int kSplitTokens = 16;  // tokens per unit of the thread split
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
  static void lane_max(const uint32_t* keys, int64_t n, uint32_t* lane_max) {
    __m512i mx = _mm512_load_si512(lane_max);
    for (int64_t e = 0; e < n; e += 16)
      mx = _mm512_max_epu32(mx, _mm512_maskz_loadu_epi32(tail_mask(n - e), keys + e));
    _mm512_store_si512(lane_max, mx);
  }
  // The two largest keys of keys[0, n) (a repeated maximum counts twice); 0 stands for NaN,
  // which is what the reference's sum gives when a NaN is among the two.
  static void top2(const uint32_t* keys, int64_t n, uint32_t* first, uint32_t* second) {
    if (n < 2) {
      *first = n == 1 ? keys[0] : 0;
      *second = 0;
      return;
    }
    __m512i mx = _mm512_setzero_si512();
    for (int64_t e = 0; e < n; e += 16)
      mx = _mm512_max_epu32(mx, _mm512_maskz_loadu_epi32(tail_mask(n - e), keys + e));
    const uint32_t k1 = _mm512_reduce_max_epu32(mx);
    const __m512i k1v = _mm512_set1_epi32(static_cast<int>(k1));
    int count = 0;
    __m512i rest = _mm512_setzero_si512();
    for (int64_t e = 0; e < n; e += 16) {
      const __mmask16 m = tail_mask(n - e);
      const __m512i v = _mm512_maskz_loadu_epi32(m, keys + e);
      const __mmask16 eq = _mm512_mask_cmpeq_epu32_mask(m, v, k1v);
      count += __builtin_popcount(eq);
      rest = _mm512_mask_max_epu32(rest, static_cast<__mmask16>(m & ~eq), rest, v);
    }
    *first = k1;
    *second = count >= 2 ? k1 : _mm512_reduce_max_epu32(rest);
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
        _mm_storeu_ps(ci + j,
                      _mm_add_ps(_mm_loadu_ps(ci + j),
                                 hsum4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3])));
      for (; j < NR; ++j) ci[j] += _mm512_reduce_add_ps(acc[i][j]);
    }
  }
};

// The packed-token router path (NOTE [packed-token router GEMM] in topk_route-inl.h; this ISA's
// kernel below) takes over from this many tokens per thread.
constexpr int64_t kPackedMinTokens = 16;
constexpr int kPanelTokens = 32;
constexpr int kBcastExperts = 12;
void pack_panel(const RouterTopkArgs& r, int64_t t0, int64_t n, float* panel);
template <int NR>
void bcast_tile(const float* const* g, const float* panel, int64_t H, float* out, int64_t ldo);
#define MOEKIT_TOPK_PACKED_ROUTER 1

#include "kernels/topk/topk_route-inl.h"

// ---- packed-token router GEMM: 32-token panels (two zmm), 12 gate rows per tile ----------

// In-register transpose of 16 rows of 16 floats.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));      // columns 0, 4, 8, 12
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));  // columns 1, 5, 9, 13
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));  // columns 2, 6, 10, 14
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));  // columns 3, 7, 11, 15
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(v0, w0, 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
  }
}

// Packs tokens [t0, t0 + n) (n <= kPanelTokens; missing tokens are zeros) of hidden into
// panel[h][kPanelTokens].
void pack_panel(const RouterTopkArgs& r, int64_t t0, int64_t n, float* panel) {
  const bool bf16 = r.hidden_dtype == MOEKIT_BF16;
  const size_t elem = bf16 ? 2 : 4;
  const int64_t H = r.H;
  for (int half = 0; half < kPanelTokens / 16; ++half) {
    const void* rows[16];
    const int64_t first = half * 16;
    for (int i = 0; i < 16; ++i)
      rows[i] = first + i < n
                    ? static_cast<const char*>(r.hidden) + (t0 + first + i) * r.hidden_stride * elem
                    : nullptr;
    for (int64_t h0 = 0; h0 < H; h0 += 16) {
      const __mmask16 m = tail_mask(H - h0);
      __m512 v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = rows[i] ? Ops::load16(rows[i], bf16, h0, m) : _mm512_setzero_ps();
      transpose16(v);
      const int64_t hn = std::min<int64_t>(16, H - h0);
      for (int64_t j = 0; j < hn; ++j)
        _mm512_store_ps(panel + (h0 + j) * kPanelTokens + first, v[j]);
    }
  }
}

// out[j][0..kPanelTokens) = gate row j . every token of the panel, for NR gate rows. Kept out of
// line so that its loop gets the general registers to itself (inlined, a row pointer was moved
// in from a vector register every h, on an FMA port).
template <int NR>
__attribute__((noinline)) void bcast_tile(const float* const* g, const float* panel, int64_t H,
                                          float* out, int64_t ldo) {
  __m512 acc[NR][2];
  for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  // Gate rows addressed from their ends by a negative index: no loop-bound register, so the row
  // pointers, the index and the panel pointer fit in the general registers (no reload per h).
  const float* row_end[NR];
  for (int j = 0; j < NR; ++j) row_end[j] = g[j] + H;
  const float* p = panel;
  for (int64_t h = -H; h != 0; ++h, p += kPanelTokens) {
    const __m512 a0 = _mm512_load_ps(p);
    const __m512 a1 = _mm512_load_ps(p + 16);
    for (int j = 0; j < NR; ++j) {
      const __m512 b = _mm512_set1_ps(row_end[j][h]);
      acc[j][0] = _mm512_fmadd_ps(a0, b, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(a1, b, acc[j][1]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    _mm512_store_ps(out + j * ldo, acc[j][0]);
    _mm512_store_ps(out + j * ldo + 16, acc[j][1]);
  }
}


}  // namespace topk_avx512

void topk_route_avx512(const TopkArgs& args) { topk_avx512::topk_route_run(args); }
void router_topk_avx512(const RouterTopkArgs& args) { topk_avx512::router_topk_run(args); }

}  // namespace moekit
