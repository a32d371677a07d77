// Reference top-k routing, written the way torch-native engine code does it: score every
// expert, add the correction bias, (optionally) pick groups, take the full top-k, gather the
// unbiased scores, normalize, scale.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "reference/numeric.h"
#include "reference/reference.h"

namespace moekit {
namespace {

// True when expert a ranks ahead of expert b: larger score first, NaN below every number,
// ties (and NaN against NaN) to the lower index.
bool ranks_ahead(float sa, int a, float sb, int b) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

void score_row(const TopkArgs& a, const void* logits_row, std::vector<float>& scores) {
  const bool bf16 = a.logits_dtype == MOEKIT_BF16;
  for (int64_t e = 0; e < a.E; ++e) scores[e] = load_float(logits_row, bf16, e);
  if (a.scoring == MOEKIT_SCORING_SIGMOID) {
    for (float& s : scores) s = 1.0f / (1.0f + std::exp(-s));
    return;
  }
  // Softmax: max over the non-NaN logits; NaN logits keep NaN scores.
  float max_logit = -INFINITY;
  for (float s : scores)
    if (!std::isnan(s)) max_logit = std::max(max_logit, s);
  double sum = 0.0;
  for (float& s : scores) {
    s = std::exp(s - max_logit);
    if (!std::isnan(s)) sum += s;
  }
  for (float& s : scores) s = static_cast<float>(s / sum);
}

}  // namespace

void ref_topk_route(const TopkArgs& a) {
  const int64_t E = a.E;
  std::vector<float> scores(E), choice(E);
  std::vector<int> order(E);
  const size_t logit_size = a.logits_dtype == MOEKIT_BF16 ? 2 : 4;
  for (int64_t m = 0; m < a.M; ++m) {
    const void* row = static_cast<const char*>(a.logits) + m * a.logits_stride * logit_size;
    score_row(a, row, scores);
    for (int64_t e = 0; e < E; ++e) choice[e] = scores[e] + (a.bias ? a.bias[e] : 0.0f);

    std::vector<bool> eligible(E, true);
    if (a.num_expert_group > 1) {
      // Group score = sum of the group's top-2 choice scores (DeepSeek-V3); keep the best
      // topk_group groups.
      const int64_t groups = a.num_expert_group, group_size = E / groups;
      std::vector<float> group_score(groups);
      for (int64_t g = 0; g < groups; ++g) {
        std::vector<int> members(group_size);
        std::iota(members.begin(), members.end(), static_cast<int>(g * group_size));
        std::sort(members.begin(), members.end(), [&](int x, int y) {
          return ranks_ahead(choice[x], x, choice[y], y);
        });
        const int64_t take = std::min<int64_t>(2, group_size);
        float sum = 0.0f;
        for (int64_t i = 0; i < take; ++i) sum += choice[members[i]];
        group_score[g] = sum;
      }
      std::vector<int> group_order(groups);
      std::iota(group_order.begin(), group_order.end(), 0);
      std::sort(group_order.begin(), group_order.end(), [&](int x, int y) {
        return ranks_ahead(group_score[x], x, group_score[y], y);
      });
      std::fill(eligible.begin(), eligible.end(), false);
      for (int i = 0; i < a.topk_group; ++i)
        for (int64_t e = 0; e < group_size; ++e) eligible[group_order[i] * group_size + e] = true;
    }

    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) {
      if (eligible[x] != eligible[y]) return static_cast<bool>(eligible[x]);
      return ranks_ahead(choice[x], x, choice[y], y);
    });

    float* w = a.weights + m * a.weights_stride;
    double total = 0.0;
    for (int j = 0; j < a.k; ++j) total += scores[order[j]];
    for (int j = 0; j < a.k; ++j) {
      float v = scores[order[j]];
      if (a.renormalize) v = static_cast<float>(v / total);
      w[j] = v * a.scaling;
      if (a.ids_dtype == MOEKIT_I64)
        static_cast<int64_t*>(a.ids)[m * a.ids_stride + j] = order[j];
      else
        static_cast<int32_t*>(a.ids)[m * a.ids_stride + j] = order[j];
    }
  }
}

void ref_router_topk(const RouterTopkArgs& a) {
  const int64_t M = a.route.M, E = a.route.E, H = a.H;
  const bool bf16 = a.hidden_dtype == MOEKIT_BF16;
  const size_t hsize = bf16 ? 2 : 4;
  std::vector<float> logits(static_cast<size_t>(M * E));
  for (int64_t m = 0; m < M; ++m) {
    const void* x = static_cast<const char*>(a.hidden) + m * a.hidden_stride * hsize;
    for (int64_t e = 0; e < E; ++e) {
      const float* g = a.gate + e * a.gate_stride;
      double acc = 0.0;
      for (int64_t h = 0; h < H; ++h) acc += static_cast<double>(load_float(x, bf16, h)) * g[h];
      logits[m * E + e] = static_cast<float>(acc);
    }
  }
  TopkArgs route = a.route;
  route.logits = logits.data();
  route.logits_stride = E;
  route.logits_dtype = MOEKIT_F32;
  ref_topk_route(route);
  if (a.logits_out)
    for (int64_t m = 0; m < M; ++m)
      std::copy_n(&logits[m * E], E, a.logits_out + m * a.logits_out_stride);
}

}  // namespace moekit
