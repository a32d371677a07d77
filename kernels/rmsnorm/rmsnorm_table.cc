// Dispatch tables of the RMSNorm family, best first; the reference is always last.
#include "kernels/rmsnorm/rmsnorm.h"
#include "reference/reference.h"

namespace moekit {

const ImplList<RmsnormArgs>& rmsnorm_impls() {
  static const ImplList<RmsnormArgs> impls = {
      {"ref_rmsnorm", MOEKIT_ISA_SCALAR, nullptr, ref_rmsnorm},
  };
  return impls;
}

const ImplList<RmsnormArgs>& fused_add_rmsnorm_impls() {
  static const ImplList<RmsnormArgs> impls = {
      {"ref_fused_add_rmsnorm", MOEKIT_ISA_SCALAR, nullptr, ref_fused_add_rmsnorm},
  };
  return impls;
}

const ImplList<QkNormArgs>& qk_norm_impls() {
  static const ImplList<QkNormArgs> impls = {
      {"ref_qk_norm", MOEKIT_ISA_SCALAR, nullptr, ref_qk_norm},
  };
  return impls;
}

}  // namespace moekit
