// Top-k routing and the fused router GEMM in portable C++ (any x86-64 CPU), plus the shape checks
// every fast implementation shares. The algorithm is in topk_route-inl.h.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "dispatch/runtime.h"
#include "kernels/topk/topk_kernels.h"
#include "reference/numeric.h"

namespace moekit {

const char* topk_route_fast_supports(const TopkArgs& a) {
  if (a.E < 1) return "no experts";
  if (a.E > kTopkMaxExperts) return "more than 1024 experts";
  if (a.k < 1 || a.k > a.E) return "top_k out of range [1, E]";
  if (a.k > kTopkMaxK) return "top_k above 32";
  if (a.M < 0) return "negative token count";
  if (a.logits_dtype != MOEKIT_F32 && a.logits_dtype != MOEKIT_BF16) return "logits not f32/bf16";
  if (a.ids_dtype != MOEKIT_I32 && a.ids_dtype != MOEKIT_I64) return "ids not i32/i64";
  if (a.scoring != MOEKIT_SCORING_SOFTMAX && a.scoring != MOEKIT_SCORING_SIGMOID)
    return "unknown scoring";
  if (a.num_expert_group > 1) {
    if (a.E % a.num_expert_group != 0) return "expert groups do not divide E";
    if (a.topk_group < 1 || a.topk_group > a.num_expert_group) return "topk_group out of range";
    if (a.k > static_cast<int64_t>(a.topk_group) * (a.E / a.num_expert_group))
      return "top_k exceeds the experts of the kept groups";
  }
  return nullptr;
}

const char* router_topk_fast_supports(const RouterTopkArgs& r) {
  if (r.hidden_dtype != MOEKIT_F32 && r.hidden_dtype != MOEKIT_BF16) return "hidden not f32/bf16";
  if (r.H < 0) return "negative hidden size";
  TopkArgs route = r.route;
  route.logits_dtype = MOEKIT_F32;  // the logits are the GEMM's own
  return topk_route_fast_supports(route);
}

namespace topk_scalar {

// The per-ISA primitives topk_route-inl.h needs, as plain loops.
struct Ops {
  static constexpr int kLanes = 8;  // experts per selection-filter step
  static constexpr int kTileM = 2;  // router GEMM tile: tokens x experts
  static constexpr int kTileN = 4;
  static constexpr int kDotTileN = kTileN;
  static constexpr int kSplitTokens = kTileM;  // tokens per unit of the thread split
  static constexpr int64_t kChunkH = 512;

  static void load_row(const void* row, bool bf16, int64_t n, float* out) {
    for (int64_t e = 0; e < n; ++e) out[e] = load_float(row, bf16, e);
  }
  static float max_non_nan(const float* x, int64_t n) {
    float m = -INFINITY;
    for (int64_t e = 0; e < n; ++e)
      if (!std::isnan(x[e])) m = std::max(m, x[e]);
    return m;
  }
  static void sigmoid_from_exp(float* t, int64_t n) {
    for (int64_t e = 0; e < n; ++e) t[e] = 1.0f / (1.0f + t[e]);
  }
  static void divide_by(float* t, int64_t n, double sum) {
    for (int64_t e = 0; e < n; ++e) t[e] = static_cast<float>(t[e] / sum);
  }
  static void make_keys(const float* scores, const float* bias, int64_t n, uint32_t* keys);
  // Lane-wise maxima of keys[0, n) folded into lane_max[kLanes] (lane = position mod kLanes).
  static void lane_max(const uint32_t* keys, int64_t n, uint32_t* lane_max) {
    for (int64_t e = 0; e < n; ++e) lane_max[e % kLanes] = std::max(lane_max[e % kLanes], keys[e]);
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
    uint32_t mask = 0;
    for (int i = 0; i < n; ++i) mask |= static_cast<uint32_t>(keys[i] >= threshold) << i;
    return mask;
  }
  template <int MR, int NR>
  static void dot_tile(const float* const* a, const float* const* b, int64_t n, float* c,
                       int64_t ldc) {
    float acc[MR][NR] = {};
    for (int64_t h = 0; h < n; ++h)
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] += a[i][h] * b[j][h];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) c[i * ldc + j] += acc[i][j];
  }
};

#include "kernels/topk/topk_route-inl.h"

void Ops::make_keys(const float* scores, const float* bias, int64_t n, uint32_t* keys) {
  for (int64_t e = 0; e < n; ++e) keys[e] = order_key(bias ? scores[e] + bias[e] : scores[e]);
}

}  // namespace topk_scalar

void topk_route_scalar(const TopkArgs& args) { topk_scalar::topk_route_run(args); }
void router_topk_scalar(const RouterTopkArgs& args) { topk_scalar::router_topk_run(args); }

}  // namespace moekit
