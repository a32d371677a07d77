// Reference token alignment and fused MoE.
//
// NOTE: the fused MoE reference works expert by expert: it decodes an expert's three matrices
// to f32 rows once (through moekit_experts::decode_row, so it reads every packed layout), then
// computes each routed (token, slot) pair's contribution in double. Contributions are summed
// per token in slot order, so the result does not depend on the thread count. Shared experts
// (args.shared) are computed the same way for every token, scaled by shared_scale[m] (or 1),
// and added after the routed slots, shared expert by shared expert.
#include <algorithm>
#include <cmath>
#include <vector>

#include "reference/numeric.h"
#include "reference/reference.h"

namespace moekit {
namespace {

int64_t read_id(const void* ids, moekit_dtype dtype, int64_t index) {
  return dtype == MOEKIT_I64 ? static_cast<const int64_t*>(ids)[index]
                             : static_cast<const int32_t*>(ids)[index];
}

// The local expert of global expert `e`, or -1 when it is not on this rank.
int64_t local_expert(const int32_t* expert_map, int64_t e) {
  return expert_map ? expert_map[e] : e;
}

}  // namespace

int64_t moe_align_capacity(int64_t M, int64_t k, int64_t num_local_experts, int64_t block_m) {
  const int64_t pairs = M * k;
  const int64_t padded = pairs + std::min(num_local_experts, pairs) * (block_m - 1);
  return (padded + block_m - 1) / block_m * block_m;
}

void ref_moe_align(const MoeAlignArgs& a) {
  std::vector<std::vector<int32_t>> per_expert(a.num_local_experts);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t j = 0; j < a.k; ++j) {
      const int64_t local = local_expert(a.expert_map, read_id(a.ids, a.ids_dtype, m * a.ids_stride + j));
      if (local >= 0) per_expert[local].push_back(static_cast<int32_t>(m * a.k + j));
    }
  int64_t row = 0;
  for (int64_t e = 0; e < a.num_local_experts; ++e) {
    const std::vector<int32_t>& pairs = per_expert[e];
    if (pairs.empty()) continue;
    const int64_t padded = (static_cast<int64_t>(pairs.size()) + a.block_m - 1) / a.block_m * a.block_m;
    for (int64_t i = 0; i < padded; ++i)
      a.sorted_pairs[row + i] = i < static_cast<int64_t>(pairs.size()) ? pairs[i] : -1;
    for (int64_t b = 0; b < padded / a.block_m; ++b)
      a.block_expert[row / a.block_m + b] = static_cast<int32_t>(e);
    row += padded;
  }
  *a.num_rows = static_cast<int32_t>(row);
}

namespace {

// contribution[pair * H + h] += weight(pair) * w2_e . (silu(w1_e . x_m) * (w3_e . x_m)) for every
// (pair, token m, weight) of `pairs`, expert e of handle w (its matrices decoded once).
struct RefPair {
  int64_t index, token;
  double weight;
};
void ref_expert(const moekit_experts& w, int64_t e, const std::vector<RefPair>& pairs,
                const std::vector<float>& x, int threads, std::vector<double>* contribution) {
  const int64_t H = w.hidden, I = w.inter;
  std::vector<float> w1(static_cast<size_t>(I * H)), w3(static_cast<size_t>(I * H)),
      w2(static_cast<size_t>(H * I));
  for (int64_t n = 0; n < I; ++n) {
    w.decode_row(e, ExpertMatrix::kW1, n, &w1[n * H]);
    w.decode_row(e, ExpertMatrix::kW3, n, &w3[n * H]);
  }
  for (int64_t n = 0; n < H; ++n) w.decode_row(e, ExpertMatrix::kW2, n, &w2[n * I]);

#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t p = 0; p < static_cast<int64_t>(pairs.size()); ++p) {
    const float* xm = &x[pairs[p].token * H];
    std::vector<double> act(I);
    for (int64_t n = 0; n < I; ++n) {
      double gate = 0.0, up = 0.0;
      for (int64_t h = 0; h < H; ++h) {
        gate += static_cast<double>(w1[n * H + h]) * xm[h];
        up += static_cast<double>(w3[n * H + h]) * xm[h];
      }
      act[n] = gate / (1.0 + std::exp(-gate)) * up;  // silu(gate) * up
    }
    double* out = &(*contribution)[pairs[p].index * H];
    for (int64_t h = 0; h < H; ++h) {
      double acc = 0.0;
      for (int64_t n = 0; n < I; ++n) acc += static_cast<double>(w2[h * I + n]) * act[n];
      out[h] = pairs[p].weight * acc;
    }
  }
}

}  // namespace

void ref_fused_moe(const FusedMoeArgs& a) {
  const moekit_experts& w = *a.experts;
  const int64_t H = w.hidden, M = a.M, k = a.k;
  const int64_t S = a.shared ? a.shared->num_experts : 0;
  const bool x_bf16 = a.hidden_dtype == MOEKIT_BF16;
  const size_t x_size = x_bf16 ? 2 : 4;

  std::vector<float> x(static_cast<size_t>(M * H));
  for (int64_t m = 0; m < M; ++m) {
    const void* row = static_cast<const char*>(a.hidden) + m * a.hidden_stride * x_size;
    for (int64_t h = 0; h < H; ++h) x[m * H + h] = load_float(row, x_bf16, h);
  }

  // contribution[(m * (k + S) + j) * H + h]: slot j < k of the routed experts, then the shared
  // experts; slots that are skipped stay zero.
  const int64_t slots = k + S;
  std::vector<double> contribution(static_cast<size_t>(M * slots * H), 0.0);
  for (int64_t e = 0; e < w.num_experts; ++e) {
    std::vector<RefPair> pairs;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t global = read_id(a.topk_ids, a.topk_ids_dtype, m * a.topk_ids_stride + j);
        if (local_expert(a.expert_map, global) == e)
          pairs.push_back({m * slots + j, m, a.topk_weights[m * a.topk_weights_stride + j]});
      }
    if (!pairs.empty()) ref_expert(w, e, pairs, x, a.threads, &contribution);
  }
  for (int64_t s = 0; s < S; ++s) {
    std::vector<RefPair> pairs;
    for (int64_t m = 0; m < M; ++m)
      pairs.push_back({m * slots + k + s, m, a.shared_scale ? a.shared_scale[m] : 1.0});
    ref_expert(*a.shared, s, pairs, x, a.threads, &contribution);
  }

  const bool out_bf16 = a.out_dtype == MOEKIT_BF16;
  const size_t out_size = out_bf16 ? 2 : 4;
  for (int64_t m = 0; m < M; ++m) {
    void* row = static_cast<char*>(a.out) + m * a.out_stride * out_size;
    for (int64_t h = 0; h < H; ++h) {
      double sum = 0.0;
      for (int64_t j = 0; j < slots; ++j) sum += contribution[(m * slots + j) * H + h];
      store_float(row, out_bf16, h, static_cast<float>(sum));
    }
  }
}

}  // namespace moekit
