// Dispatch tables of the blockwise expert matmul, best first; the reference is always last.
#include "kernels/moe/moe.h"
#include "reference/reference.h"

namespace moekit {

const ImplList<MoeAlignArgs>& moe_align_impls() {
  static const ImplList<MoeAlignArgs> impls = {
      {"ref_moe_align", MOEKIT_ISA_SCALAR, nullptr, ref_moe_align},
  };
  return impls;
}

const ImplList<FusedMoeArgs>& fused_moe_impls() {
  static const ImplList<FusedMoeArgs> impls = {
      {"ref_fused_moe", MOEKIT_ISA_SCALAR, nullptr, ref_fused_moe},
  };
  return impls;
}

}  // namespace moekit
