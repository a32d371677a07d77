// Fast top-k routing and the fused router GEMM: entry points of each ISA's translation unit and
// the shape checks they share. The dispatch table (topk_table.cc) lists them ahead of the
// reference.
#ifndef MOEKIT_KERNELS_TOPK_TOPK_KERNELS_H_
#define MOEKIT_KERNELS_TOPK_TOPK_KERNELS_H_

#include <cstdint>

#include "kernels/topk/topk.h"

namespace moekit {

// Limits of the fast paths: the per-row scratch holds kTopkMaxExperts scores, and the running
// selection list holds kTopkMaxK entries. Larger problems fall back to the reference.
constexpr int64_t kTopkMaxExperts = 1024;
constexpr int kTopkMaxK = 32;

// Shape/flag checks shared by every fast implementation (see Impl::supports).
const char* topk_route_fast_supports(const TopkArgs& args);
const char* router_topk_fast_supports(const RouterTopkArgs& args);

void topk_route_scalar(const TopkArgs& args);
void router_topk_scalar(const RouterTopkArgs& args);

void topk_route_avx2(const TopkArgs& args);
void router_topk_avx2(const RouterTopkArgs& args);

void topk_route_avx512(const TopkArgs& args);
void router_topk_avx512(const RouterTopkArgs& args);

}  // namespace moekit

#endif  // MOEKIT_KERNELS_TOPK_TOPK_KERNELS_H_
