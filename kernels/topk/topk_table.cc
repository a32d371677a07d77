// Dispatch tables of top-k routing, best first; the reference is always last.
#include "kernels/topk/topk.h"
#include "reference/reference.h"

namespace moekit {

const ImplList<TopkArgs>& topk_route_impls() {
  static const ImplList<TopkArgs> impls = {
      {"ref_topk_route", MOEKIT_ISA_SCALAR, nullptr, ref_topk_route},
  };
  return impls;
}

const ImplList<RouterTopkArgs>& router_topk_impls() {
  static const ImplList<RouterTopkArgs> impls = {
      {"ref_router_topk", MOEKIT_ISA_SCALAR, nullptr, ref_router_topk},
  };
  return impls;
}

}  // namespace moekit
