// Dispatch tables of the RMSNorm family, best first; the reference is always last.
#include "kernels/rmsnorm/rmsnorm.h"
#include "kernels/rmsnorm/rmsnorm_hwy.h"
#include "reference/reference.h"

namespace moekit {

const ImplList<RmsnormArgs>& rmsnorm_impls() {
  static const ImplList<RmsnormArgs> impls = {
      {"rmsnorm_avx512_hwy", MOEKIT_ISA_AVX512, rmsnorm_hwy_supports, rmsnorm_avx512_hwy},
      {"rmsnorm_avx2_hwy", MOEKIT_ISA_AVX2, rmsnorm_hwy_supports, rmsnorm_avx2_hwy},
      {"rmsnorm_scalar_hwy", MOEKIT_ISA_SCALAR, rmsnorm_hwy_supports, rmsnorm_scalar_hwy},
      {"ref_rmsnorm", MOEKIT_ISA_SCALAR, nullptr, ref_rmsnorm},
  };
  return impls;
}

const ImplList<RmsnormArgs>& fused_add_rmsnorm_impls() {
  static const ImplList<RmsnormArgs> impls = {
      {"fused_add_rmsnorm_avx512_hwy", MOEKIT_ISA_AVX512, rmsnorm_hwy_supports,
       fused_add_rmsnorm_avx512_hwy},
      {"fused_add_rmsnorm_avx2_hwy", MOEKIT_ISA_AVX2, rmsnorm_hwy_supports,
       fused_add_rmsnorm_avx2_hwy},
      {"fused_add_rmsnorm_scalar_hwy", MOEKIT_ISA_SCALAR, rmsnorm_hwy_supports,
       fused_add_rmsnorm_scalar_hwy},
      {"ref_fused_add_rmsnorm", MOEKIT_ISA_SCALAR, nullptr, ref_fused_add_rmsnorm},
  };
  return impls;
}

const ImplList<QkNormArgs>& qk_norm_impls() {
  static const ImplList<QkNormArgs> impls = {
      {"qk_norm_avx512_hwy", MOEKIT_ISA_AVX512, qk_norm_hwy_supports, qk_norm_avx512_hwy},
      {"qk_norm_avx2_hwy", MOEKIT_ISA_AVX2, qk_norm_hwy_supports, qk_norm_avx2_hwy},
      {"qk_norm_scalar_hwy", MOEKIT_ISA_SCALAR, qk_norm_hwy_supports, qk_norm_scalar_hwy},
      {"ref_qk_norm", MOEKIT_ISA_SCALAR, nullptr, ref_qk_norm},
  };
  return impls;
}

}  // namespace moekit
