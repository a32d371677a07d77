// RMSNorm family: arguments shared by every implementation, and the dispatch tables.
#ifndef MOEKIT_KERNELS_RMSNORM_RMSNORM_H_
#define MOEKIT_KERNELS_RMSNORM_RMSNORM_H_

#include <cstdint>

#include "dispatch/registry.h"
#include "moekit/moekit.h"

namespace moekit {

// rmsnorm: y = x / sqrt(mean(x^2) + eps) * w, row by row.
// fused_add_rmsnorm (residual != nullptr): residual += x; x = rmsnorm(residual); y == x.
// Strides are in elements; the innermost dimension is contiguous. y may equal x.
struct RmsnormArgs {
  int64_t rows = 0, width = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  moekit_dtype x_dtype = MOEKIT_F32;
  void* y = nullptr;
  int64_t y_stride = 0;
  moekit_dtype y_dtype = MOEKIT_F32;
  const void* w = nullptr;
  moekit_dtype w_dtype = MOEKIT_F32;
  float eps = 1e-6f;
  void* residual = nullptr;  // fused add only; dtype x_dtype
  int64_t residual_stride = 0;
};

// QK-norm over whole rows of q and k (MiniMax-M2 "per_layer"), in place, and its
// tensor-parallel halves.
struct QkNormArgs {
  enum class Mode { kFull, kPartialSumsq, kApply };
  Mode mode = Mode::kFull;
  int64_t tokens = 0;
  void* q = nullptr;
  int64_t q_stride = 0, q_width = 0;
  moekit_dtype q_dtype = MOEKIT_F32;
  void* k = nullptr;
  int64_t k_stride = 0, k_width = 0;
  moekit_dtype k_dtype = MOEKIT_F32;
  const void* q_w = nullptr;  // kFull, kApply: [q_width]
  moekit_dtype q_w_dtype = MOEKIT_F32;
  const void* k_w = nullptr;  // kFull, kApply: [k_width]
  moekit_dtype k_w_dtype = MOEKIT_F32;
  float eps = 1e-6f;
  float* q_sumsq = nullptr;  // [tokens]: written by kPartialSumsq, read by kApply
  float* k_sumsq = nullptr;
  int64_t q_global_width = 0, k_global_width = 0;  // kApply: the divisor of the mean
};

const ImplList<RmsnormArgs>& rmsnorm_impls();
const ImplList<RmsnormArgs>& fused_add_rmsnorm_impls();
const ImplList<QkNormArgs>& qk_norm_impls();

}  // namespace moekit

#endif  // MOEKIT_KERNELS_RMSNORM_RMSNORM_H_
