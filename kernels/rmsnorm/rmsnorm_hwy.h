// RMSNorm family written once with Highway and compiled for AVX-512 (AVX3), AVX2 and EMU128.
// Each target is a separate dispatch-table entry with its own ISA level: the registry, not
// Highway, chooses, so MOEKIT_ISA caps these kernels like any other.
#ifndef MOEKIT_KERNELS_RMSNORM_RMSNORM_HWY_H_
#define MOEKIT_KERNELS_RMSNORM_RMSNORM_HWY_H_

#include "kernels/rmsnorm/rmsnorm.h"

namespace moekit {

// Accepts every shape, dtype combination and stride that the C API lets through.
const char* rmsnorm_hwy_supports(const RmsnormArgs& args);
const char* qk_norm_hwy_supports(const QkNormArgs& args);

// Entry points per target; call one only when the CPU has its level.
void rmsnorm_avx512_hwy(const RmsnormArgs& args);
void rmsnorm_avx2_hwy(const RmsnormArgs& args);
void rmsnorm_scalar_hwy(const RmsnormArgs& args);

void fused_add_rmsnorm_avx512_hwy(const RmsnormArgs& args);
void fused_add_rmsnorm_avx2_hwy(const RmsnormArgs& args);
void fused_add_rmsnorm_scalar_hwy(const RmsnormArgs& args);

void qk_norm_avx512_hwy(const QkNormArgs& args);
void qk_norm_avx2_hwy(const QkNormArgs& args);
void qk_norm_scalar_hwy(const QkNormArgs& args);

}  // namespace moekit

#endif  // MOEKIT_KERNELS_RMSNORM_RMSNORM_HWY_H_
