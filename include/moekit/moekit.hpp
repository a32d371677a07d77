// moekit: the thin C++ layer over the C API. Errors become moekit::Error exceptions, handles
// are owned by RAII types, and tensors can be described from a pointer and a shape.
#ifndef MOEKIT_MOEKIT_HPP_
#define MOEKIT_MOEKIT_HPP_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>

#include "moekit/moekit.h"

namespace moekit {

class Error : public std::runtime_error {
 public:
  Error(moekit_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  moekit_status status() const { return status_; }

 private:
  moekit_status status_;
};

// Throws moekit::Error with moekit_last_error() unless `status` is MOEKIT_OK.
inline void check(moekit_status status) {
  if (status != MOEKIT_OK) throw Error(status, moekit_last_error());
}

// A tensor description; `strides` empty means contiguous, else it gives one stride per dimension.
inline moekit_tensor tensor(void* data, moekit_dtype dtype, std::initializer_list<int64_t> shape,
                            std::initializer_list<int64_t> strides = {}) {
  if (shape.size() > MOEKIT_MAX_DIMS)
    throw Error(MOEKIT_ERR_INVALID_ARGUMENT, "moekit::tensor: a " + std::to_string(shape.size()) +
                                                 "-D shape (at most " +
                                                 std::to_string(MOEKIT_MAX_DIMS) + " dimensions)");
  // The C API reads a stride for every dimension; the missing ones would be 0.
  if (strides.size() != 0 && strides.size() != shape.size())
    throw Error(MOEKIT_ERR_INVALID_ARGUMENT,
                "moekit::tensor: " + std::to_string(strides.size()) + " strides given for a " +
                    std::to_string(shape.size()) + "-D shape (give none, or one per dimension)");
  moekit_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int32_t>(shape.size());
  int d = 0;
  for (int64_t s : shape) t.shape[d++] = s;
  d = 0;
  for (int64_t s : strides) t.strides[d++] = s;
  return t;
}

inline moekit_tensor tensor(const void* data, moekit_dtype dtype,
                            std::initializer_list<int64_t> shape,
                            std::initializer_list<int64_t> strides = {}) {
  return tensor(const_cast<void*>(data), dtype, shape, strides);
}

// No data: an empty tensor (the C API accepts null data when a dimension is 0). Without this
// overload nullptr would match both of the above.
inline moekit_tensor tensor(std::nullptr_t, moekit_dtype dtype,
                            std::initializer_list<int64_t> shape,
                            std::initializer_list<int64_t> strides = {}) {
  return tensor(static_cast<void*>(nullptr), dtype, shape, strides);
}

struct ExpertsDeleter {
  void operator()(moekit_experts* e) const { moekit_experts_free(e); }
};
struct WorkspaceDeleter {
  void operator()(moekit_workspace* w) const { moekit_workspace_free(w); }
};

// Packed expert weights, freed on destruction.
using Experts = std::unique_ptr<moekit_experts, ExpertsDeleter>;
using Workspace = std::unique_ptr<moekit_workspace, WorkspaceDeleter>;

inline Experts pack_experts(const moekit_experts_desc& desc,
                            moekit_pack_layout layout = MOEKIT_LAYOUT_AUTO) {
  moekit_experts* raw = nullptr;
  check(moekit_experts_pack(&desc, layout, &raw));
  return Experts(raw);
}

namespace detail {

// The size functions answer 0 for arguments out of range (they set no message) and a real
// workspace is never 0 bytes: say so rather than hand back an unusable 0-byte workspace.
inline Workspace workspace_of(size_t bytes, const std::string& args) {
  if (bytes == 0)
    throw Error(MOEKIT_ERR_INVALID_ARGUMENT,
                "moekit::make_workspace: " + args +
                    " is out of range (negative, or larger than one call can pass)");
  moekit_workspace* raw = nullptr;
  check(moekit_workspace_create(bytes, &raw));
  return Workspace(raw);
}

}  // namespace detail

// A workspace large enough for fused MoE calls up to (M, k, H, I) with the current threads.
// Throws moekit::Error (MOEKIT_ERR_INVALID_ARGUMENT) for sizes out of range.
inline Workspace make_workspace(int64_t M, int64_t k, int64_t H, int64_t I) {
  return detail::workspace_of(moekit_moe_workspace_size(M, k, H, I, moekit_num_threads()),
                              "(M, k, H, I) = (" + std::to_string(M) + ", " + std::to_string(k) +
                                  ", " + std::to_string(H) + ", " + std::to_string(I) + ")");
}

// The same with S shared experts of intermediate size I_s.
inline Workspace make_workspace(int64_t M, int64_t k, int64_t H, int64_t I, int64_t S,
                                int64_t I_s) {
  return detail::workspace_of(
      moekit_moe_workspace_size_shared(M, k, H, I, S, I_s, moekit_num_threads()),
      "(M, k, H, I, S, I_s) = (" + std::to_string(M) + ", " + std::to_string(k) + ", " +
          std::to_string(H) + ", " + std::to_string(I) + ", " + std::to_string(S) + ", " +
          std::to_string(I_s) + ")");
}

inline void rmsnorm(const moekit_tensor& x, const moekit_tensor& weight, float eps,
                    moekit_tensor& y) {
  check(moekit_rmsnorm(&x, &weight, eps, &y));
}

inline void fused_add_rmsnorm(moekit_tensor& x, moekit_tensor& residual,
                              const moekit_tensor& weight, float eps) {
  check(moekit_fused_add_rmsnorm(&x, &residual, &weight, eps));
}

inline void qk_norm(moekit_tensor& q, moekit_tensor& k, const moekit_tensor& q_weight,
                    const moekit_tensor& k_weight, float eps) {
  check(moekit_qk_norm(&q, &k, &q_weight, &k_weight, eps));
}

// bias may be null.
inline void topk_route(const moekit_tensor& logits, const moekit_tensor* bias,
                       const moekit_route_params& params, moekit_tensor& weights,
                       moekit_tensor& ids) {
  check(moekit_topk_route(&logits, bias, &params, &weights, &ids));
}

// bias and logits_out may be null.
inline void router_topk(const moekit_tensor& hidden, const moekit_tensor& gate,
                        const moekit_tensor* bias, const moekit_route_params& params,
                        moekit_tensor& weights, moekit_tensor& ids,
                        moekit_tensor* logits_out = nullptr) {
  check(moekit_router_topk(&hidden, &gate, bias, &params, &weights, &ids, logits_out));
}

// expert_map and ws may be null.
inline void fused_moe(const Experts& experts, const moekit_tensor& hidden,
                      const moekit_tensor& topk_weights, const moekit_tensor& topk_ids,
                      const moekit_tensor* expert_map, moekit_workspace* ws,
                      moekit_tensor& out) {
  check(moekit_fused_moe(experts.get(), &hidden, &topk_weights, &topk_ids, expert_map, ws, &out));
}

// With shared experts (may be null: then as fused_moe); shared_scale, expert_map and ws may be
// null.
inline void fused_moe_shared(const Experts& experts, const moekit_experts* shared,
                             const moekit_tensor* shared_scale, const moekit_tensor& hidden,
                             const moekit_tensor& topk_weights, const moekit_tensor& topk_ids,
                             const moekit_tensor* expert_map, moekit_workspace* ws,
                             moekit_tensor& out) {
  check(moekit_fused_moe_shared(experts.get(), shared, shared_scale, &hidden, &topk_weights,
                                &topk_ids, expert_map, ws, &out));
}

}  // namespace moekit

#endif  // MOEKIT_MOEKIT_HPP_
