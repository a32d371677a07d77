// Top-k routing and the fused router GEMM with AVX2 + FMA intrinsics: vector scoring arithmetic,
// key building and selection filtering over 8 experts at a time, a 3-token x 4-expert
// dot-product GEMM tile for few tokens, and a 16-token x 6-expert packed-token (broadcast) tile
// from 16 tokens per thread. Tails never read past an input's end. The algorithm is in
// topk_route-inl.h.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "dispatch/runtime.h"
#include "kernels/topk/topk_kernels.h"

namespace moekit {
namespace topk_avx2 {

// 4 vectors -> the 4 horizontal sums, in one xmm.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Masks of lanes for partial vectors (AVX2 maskload never touches a masked-out element).
inline __m256i lane_mask(int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))), lanes);
}

struct Ops {
  static constexpr int kLanes = 8;
  static constexpr int kTileM = 3;
  static constexpr int kTileN = 4;
  static constexpr int kDotTileN = kTileN;
  static constexpr int kSplitTokens = 16;  // tokens per unit of the thread split
  static constexpr int64_t kChunkH = 1024;

  static void load_row(const void* row, bool bf16, int64_t n, float* out) {
    int64_t e = 0;
    if (bf16) {
      const uint16_t* p = static_cast<const uint16_t*>(row);
      for (; e + 8 <= n; e += 8) {
        const __m256i w =
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + e)));
        _mm256_storeu_ps(out + e, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      }
      for (; e < n; ++e) {
        const uint32_t u = static_cast<uint32_t>(p[e]) << 16;
        std::memcpy(out + e, &u, sizeof(float));
      }
      return;
    }
    const float* p = static_cast<const float*>(row);
    for (; e + 8 <= n; e += 8) _mm256_storeu_ps(out + e, _mm256_loadu_ps(p + e));
    for (; e < n; ++e) out[e] = p[e];
  }
  static float max_non_nan(const float* x, int64_t n) {
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
    __m256 mx = neg_inf;
    int64_t e = 0;
    for (; e + 8 <= n; e += 8) {
      const __m256 v = _mm256_loadu_ps(x + e);
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg_inf, v, _mm256_cmp_ps(v, v, _CMP_ORD_Q)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float m = -INFINITY;
    for (float v : lanes) m = v > m ? v : m;
    for (; e < n; ++e)
      if (!__builtin_isnan(x[e])) m = x[e] > m ? x[e] : m;
    return m;
  }
  static void sigmoid_from_exp(float* t, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t e = 0;
    for (; e + 8 <= n; e += 8)
      _mm256_storeu_ps(t + e, _mm256_div_ps(one, _mm256_add_ps(one, _mm256_loadu_ps(t + e))));
    for (; e < n; ++e) t[e] = 1.0f / (1.0f + t[e]);
  }
  static void divide_by(float* t, int64_t n, double sum) {
    const __m256d s = _mm256_set1_pd(sum);
    int64_t e = 0;
    for (; e + 4 <= n; e += 4) {
      const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(t + e));
      _mm_storeu_ps(t + e, _mm256_cvtpd_ps(_mm256_div_pd(v, s)));
    }
    for (; e < n; ++e) t[e] = static_cast<float>(t[e] / sum);
  }
  static void make_keys(const float* scores, const float* bias, int64_t n, uint32_t* keys);
  // Lane-wise maxima of keys[0, n) folded into lane_max[kLanes] (lane = position mod kLanes).
  static void lane_max(const uint32_t* keys, int64_t n, uint32_t* lane_max) {
    // keys are the row scratch, padded past E: the last partial load stays in bounds.
    __m256i mx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_max));
    for (int64_t e = 0; e < n; e += 8) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + e));
      mx = _mm256_max_epu32(mx, _mm256_and_si256(v, lane_mask(n - e)));
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane_max), mx);
  }
  // The two largest keys of keys[0, n) (a repeated maximum counts twice); 0 stands for NaN,
  // which is what the reference's sum gives when a NaN is among the two.
  static void top2(const uint32_t* keys, int64_t n, uint32_t* first, uint32_t* second) {
    uint32_t k1 = 0, k2 = 0;
    for (int64_t e = 0; e < n; ++e) {
      const uint32_t key = keys[e];
      if (key > k1) {
        k2 = k1;
        k1 = key;
      } else if (key > k2) {
        k2 = key;
      }
    }
    *first = k1;
    *second = k2;
  }
  static uint32_t mask_ge(const uint32_t* keys, int n, uint32_t threshold) {
    // keys are the row scratch, padded past E: a full load stays in bounds.
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys));
    const __m256i t = _mm256_set1_epi32(static_cast<int>(threshold));
    const __m256i ge = _mm256_cmpeq_epi32(_mm256_max_epu32(k, t), k);
    const uint32_t mask = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(ge)));
    return n >= 8 ? mask : mask & ((1u << n) - 1);
  }

  // c[i][j] += a[i] . b[j] over n floats, for MR token rows and NR expert rows.
  template <int MR, int NR>
  static void dot_tile(const float* const* a, const float* const* b, int64_t n, float* c,
                       int64_t ldc) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    int64_t h = 0;
    for (; h + 8 <= n; h += 8) {
      __m256 av[MR];
      for (int i = 0; i < MR; ++i) av[i] = _mm256_loadu_ps(a[i] + h);
      for (int j = 0; j < NR; ++j) {
        const __m256 bv = _mm256_loadu_ps(b[j] + h);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
      }
    }
    if (h < n) {
      const __m256i m = lane_mask(n - h);
      __m256 av[MR];
      for (int i = 0; i < MR; ++i) av[i] = _mm256_maskload_ps(a[i] + h, m);
      for (int j = 0; j < NR; ++j) {
        const __m256 bv = _mm256_maskload_ps(b[j] + h, m);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      int j = 0;
      for (; j + 4 <= NR; j += 4)
        _mm_storeu_ps(ci + j,
                      _mm_add_ps(_mm_loadu_ps(ci + j),
                                 hsum4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3])));
      for (; j < NR; ++j) ci[j] += hsum(acc[i][j]);
    }
  }
};

// The packed-token router path (NOTE [packed-token router GEMM] in topk_route-inl.h; this ISA's
// kernel below) takes over from this many tokens per thread.
constexpr int64_t kPackedMinTokens = 16;
constexpr int kPanelTokens = 16;  // two ymm of tokens
constexpr int kBcastExperts = 6;  // 12 accumulators + 2 token vectors + 1 broadcast = 15 ymm
void pack_panel(const RouterTopkArgs& r, int64_t t0, int64_t n, float* panel);
template <int NR>
void bcast_tile(const float* const* g, const float* panel, int64_t H, float* out, int64_t ldo);
#define MOEKIT_TOPK_PACKED_ROUTER 1

#include "kernels/topk/topk_route-inl.h"

void Ops::make_keys(const float* scores, const float* bias, int64_t n, uint32_t* keys) {
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    __m256 c = _mm256_loadu_ps(scores + e);
    if (bias) c = _mm256_add_ps(c, _mm256_loadu_ps(bias + e));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(c, c, _CMP_UNORD_Q));
    const __m256i is_zero = _mm256_castps_si256(_mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_EQ_OQ));
    __m256i u = _mm256_andnot_si256(is_zero, _mm256_castps_si256(c));
    u = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), sign));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + e), _mm256_andnot_si256(nan, u));
  }
  for (; e < n; ++e) keys[e] = order_key(bias ? scores[e] + bias[e] : scores[e]);
}

// ---- packed-token router GEMM: 16-token panels (two ymm), 6 gate rows per tile -----------

// In-register transpose of 8 rows of 8 floats.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);          // column 0 | 4 of rows i..i+3
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);      // column 1 | 5
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);  // column 2 | 6
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);  // column 3 | 7
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// Floats [h, h + n) of a hidden row (n <= 8; missing lanes are zeros, nothing read past n).
inline __m256 load8(const void* row, bool bf16, int64_t h, int64_t n) {
  if (bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + h;
    __m128i w;
    if (n >= 8) {
      w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t tail[8] = {};
      std::memcpy(tail, p, static_cast<size_t>(n) * sizeof(uint16_t));
      w = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
  }
  const float* p = static_cast<const float*>(row) + h;
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(n));
}

// Packs tokens [t0, t0 + n) (n <= kPanelTokens; missing tokens are zeros) of hidden into
// panel[h][kPanelTokens].
void pack_panel(const RouterTopkArgs& r, int64_t t0, int64_t n, float* panel) {
  const bool bf16 = r.hidden_dtype == MOEKIT_BF16;
  const size_t elem = bf16 ? 2 : 4;
  const int64_t H = r.H;
  for (int half = 0; half < kPanelTokens / 8; ++half) {
    const void* rows[8];
    const int64_t first = half * 8;
    for (int i = 0; i < 8; ++i)
      rows[i] = first + i < n
                    ? static_cast<const char*>(r.hidden) + (t0 + first + i) * r.hidden_stride * elem
                    : nullptr;
    for (int64_t h0 = 0; h0 < H; h0 += 8) {
      const int64_t hn = std::min<int64_t>(8, H - h0);
      __m256 v[8];
      for (int i = 0; i < 8; ++i)
        v[i] = rows[i] ? load8(rows[i], bf16, h0, hn) : _mm256_setzero_ps();
      transpose8(v);
      for (int64_t j = 0; j < hn; ++j)
        _mm256_store_ps(panel + (h0 + j) * kPanelTokens + first, v[j]);
    }
  }
}

// out[j][0..kPanelTokens) = gate row j . every token of the panel, for NR gate rows.
template <int NR>
void bcast_tile(const float* const* g, const float* panel, int64_t H, float* out, int64_t ldo) {
  __m256 acc[NR][2];
  for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  for (int64_t h = 0; h < H; ++h) {
    const __m256 a0 = _mm256_load_ps(panel + h * kPanelTokens);
    const __m256 a1 = _mm256_load_ps(panel + h * kPanelTokens + 8);
    for (int j = 0; j < NR; ++j) {
      const __m256 b = _mm256_broadcast_ss(g[j] + h);
      acc[j][0] = _mm256_fmadd_ps(a0, b, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(a1, b, acc[j][1]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    _mm256_store_ps(out + j * ldo, acc[j][0]);
    _mm256_store_ps(out + j * ldo + 8, acc[j][1]);
  }
}


}  // namespace topk_avx2

void topk_route_avx2(const TopkArgs& args) { topk_avx2::topk_route_run(args); }
void router_topk_avx2(const RouterTopkArgs& args) { topk_avx2::router_topk_run(args); }

}  // namespace moekit
