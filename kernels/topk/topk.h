// Top-k routing: arguments shared by every implementation, and the dispatch tables.
#ifndef MOEKIT_KERNELS_TOPK_TOPK_H_
#define MOEKIT_KERNELS_TOPK_TOPK_H_

#include <cstdint>

#include "dispatch/registry.h"
#include "moekit/moekit.h"

namespace moekit {

// See moekit_topk_route for the semantics.
struct TopkArgs {
  int64_t M = 0, E = 0;
  const void* logits = nullptr;
  int64_t logits_stride = 0;
  moekit_dtype logits_dtype = MOEKIT_F32;
  const float* bias = nullptr;  // [E] or nullptr
  int k = 1;
  moekit_scoring scoring = MOEKIT_SCORING_SOFTMAX;
  bool renormalize = false;
  int num_expert_group = 0;  // <= 1: no grouping
  int topk_group = 0;
  float scaling = 1.0f;
  float* weights = nullptr;
  int64_t weights_stride = 0;
  void* ids = nullptr;
  int64_t ids_stride = 0;
  moekit_dtype ids_dtype = MOEKIT_I32;
};

// Router GEMM (f32) fused with routing. route.logits is unused; the logits are
// hidden[m] . gate[e] for every expert e.
struct RouterTopkArgs {
  int64_t H = 0;
  const void* hidden = nullptr;
  int64_t hidden_stride = 0;
  moekit_dtype hidden_dtype = MOEKIT_F32;
  const float* gate = nullptr;  // [E, H]
  int64_t gate_stride = 0;
  float* logits_out = nullptr;  // [M, E] or nullptr
  int64_t logits_out_stride = 0;
  TopkArgs route;
};

const ImplList<TopkArgs>& topk_route_impls();
const ImplList<RouterTopkArgs>& router_topk_impls();

}  // namespace moekit

#endif  // MOEKIT_KERNELS_TOPK_TOPK_H_
