// Dispatch tables of top-k routing, best first; the reference is always last.
#include "kernels/topk/topk.h"
#include "kernels/topk/topk_kernels.h"
#include "reference/reference.h"

namespace moekit {

const ImplList<TopkArgs>& topk_route_impls() {
  static const ImplList<TopkArgs> impls = {
      {"topk_route_avx512", MOEKIT_ISA_AVX512, topk_route_fast_supports, topk_route_avx512},
      {"topk_route_avx2", MOEKIT_ISA_AVX2, topk_route_fast_supports, topk_route_avx2},
      {"topk_route_scalar", MOEKIT_ISA_SCALAR, topk_route_fast_supports, topk_route_scalar},
      {"ref_topk_route", MOEKIT_ISA_SCALAR, nullptr, ref_topk_route},
  };
  return impls;
}

const ImplList<RouterTopkArgs>& router_topk_impls() {
  static const ImplList<RouterTopkArgs> impls = {
      {"router_topk_avx512_fma", MOEKIT_ISA_AVX512, router_topk_fast_supports, router_topk_avx512},
      {"router_topk_avx2_fma", MOEKIT_ISA_AVX2, router_topk_fast_supports, router_topk_avx2},
      {"router_topk_scalar", MOEKIT_ISA_SCALAR, router_topk_fast_supports, router_topk_scalar},
      {"ref_router_topk", MOEKIT_ISA_SCALAR, nullptr, ref_router_topk},
  };
  return impls;
}

}  // namespace moekit
