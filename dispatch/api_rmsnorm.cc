// C API entry points of the RMSNorm family: validate, fill the arguments, dispatch.
#include <cmath>

#include "dispatch/validate.h"
#include "kernels/rmsnorm/rmsnorm.h"

using namespace moekit;

namespace {

constexpr std::initializer_list<moekit_dtype> kFloatTypes = {MOEKIT_F32, MOEKIT_BF16};

moekit_status check_eps(const Checker& c, float eps) {
  if (!(eps >= 0.0f) || !std::isfinite(eps))
    return c.invalid("eps", "must be finite and >= 0, got " + std::to_string(eps));
  return MOEKIT_OK;
}

moekit_status check_weight(const Checker& c, const char* arg, const moekit_tensor* w,
                           int64_t width) {
  if (moekit_status s = c.tensor(arg, w, 1, kFloatTypes)) return s;
  return c.dims(arg, w, {width});
}

// Distinct tensors that a kernel writes must not share memory.
moekit_status check_disjoint(const Checker& c, const char* a_name, const moekit_tensor* a,
                             const char* b_name, const moekit_tensor* b) {
  if (overlaps(a, b))
    return c.invalid(b_name, std::string("overlaps ") + a_name + " in memory");
  return MOEKIT_OK;
}

}  // namespace

extern "C" {

moekit_status moekit_rmsnorm(const moekit_tensor* x, const moekit_tensor* weight, float eps,
                             moekit_tensor* y) {
  Checker c("moekit_rmsnorm");
  if (moekit_status s = c.tensor("x", x, 2, kFloatTypes)) return s;
  if (moekit_status s = c.tensor("y", y, 2, kFloatTypes)) return s;
  if (moekit_status s = c.dims("y", y, {x->shape[0], x->shape[1]})) return s;
  if (moekit_status s = check_weight(c, "weight", weight, x->shape[1])) return s;
  if (moekit_status s = check_eps(c, eps)) return s;
  const bool in_place = x->data == y->data && stride_of(x, 0) == stride_of(y, 0) &&
                        x->dtype == y->dtype;
  if (!in_place)
    if (moekit_status s = check_disjoint(c, "x", x, "y", y)) return s;
  if (moekit_status s = c.input_apart("weight", weight, "y", y)) return s;
  RmsnormArgs a;
  a.rows = x->shape[0];
  a.width = x->shape[1];
  a.x = x->data;
  a.x_stride = stride_of(x, 0);
  a.x_dtype = x->dtype;
  a.y = y->data;
  a.y_stride = stride_of(y, 0);
  a.y_dtype = y->dtype;
  a.w = weight->data;
  a.w_dtype = weight->dtype;
  a.eps = eps;
  return dispatch("rmsnorm", rmsnorm_impls(), a);
}

moekit_status moekit_fused_add_rmsnorm(moekit_tensor* x, moekit_tensor* residual,
                                       const moekit_tensor* weight, float eps) {
  Checker c("moekit_fused_add_rmsnorm");
  if (moekit_status s = c.tensor("x", x, 2, kFloatTypes)) return s;
  if (moekit_status s = c.tensor("residual", residual, 2, kFloatTypes)) return s;
  if (moekit_status s = c.dims("residual", residual, {x->shape[0], x->shape[1]})) return s;
  if (residual->dtype != x->dtype)
    return c.invalid("residual", std::string("dtype ") + moekit_dtype_name(residual->dtype) +
                                     " differs from x's " + moekit_dtype_name(x->dtype));
  if (moekit_status s = check_weight(c, "weight", weight, x->shape[1])) return s;
  if (moekit_status s = check_eps(c, eps)) return s;
  if (moekit_status s = check_disjoint(c, "x", x, "residual", residual)) return s;
  if (moekit_status s = c.input_apart("weight", weight, "x", x)) return s;
  if (moekit_status s = c.input_apart("weight", weight, "residual", residual)) return s;
  RmsnormArgs a;
  a.rows = x->shape[0];
  a.width = x->shape[1];
  a.x = x->data;
  a.x_stride = stride_of(x, 0);
  a.x_dtype = x->dtype;
  a.y = x->data;
  a.y_stride = a.x_stride;
  a.y_dtype = x->dtype;
  a.w = weight->data;
  a.w_dtype = weight->dtype;
  a.eps = eps;
  a.residual = residual->data;
  a.residual_stride = stride_of(residual, 0);
  return dispatch("fused_add_rmsnorm", fused_add_rmsnorm_impls(), a);
}

}  // extern "C"

namespace {

// Checks q and k ([tokens, width] each, disjoint) and fills their part of the arguments.
moekit_status check_qk(const Checker& c, const moekit_tensor* q, const moekit_tensor* k,
                       QkNormArgs* a) {
  if (moekit_status s = c.tensor("q", q, 2, kFloatTypes)) return s;
  if (moekit_status s = c.tensor("k", k, 2, kFloatTypes)) return s;
  if (k->shape[0] != q->shape[0])
    return c.invalid("k", "has " + std::to_string(k->shape[0]) + " tokens but q has " +
                              std::to_string(q->shape[0]));
  if (moekit_status s = check_disjoint(c, "q", q, "k", k)) return s;
  a->tokens = q->shape[0];
  a->q = q->data;
  a->q_stride = stride_of(q, 0);
  a->q_width = q->shape[1];
  a->q_dtype = q->dtype;
  a->k = k->data;
  a->k_stride = stride_of(k, 0);
  a->k_width = k->shape[1];
  a->k_dtype = k->dtype;
  return MOEKIT_OK;
}

// The weights are read while q and k are rewritten in place.
moekit_status check_weights_apart(const Checker& c, const char* q_weight_arg,
                                  const moekit_tensor* q_weight, const char* k_weight_arg,
                                  const moekit_tensor* k_weight, const moekit_tensor* q,
                                  const moekit_tensor* k) {
  if (moekit_status s = c.input_apart(q_weight_arg, q_weight, "q", q)) return s;
  if (moekit_status s = c.input_apart(q_weight_arg, q_weight, "k", k)) return s;
  if (moekit_status s = c.input_apart(k_weight_arg, k_weight, "q", q)) return s;
  return c.input_apart(k_weight_arg, k_weight, "k", k);
}

moekit_status check_sums(const Checker& c, const char* arg, const moekit_tensor* t,
                         int64_t tokens) {
  if (moekit_status s = c.tensor(arg, t, 1, {MOEKIT_F32})) return s;
  return c.dims(arg, t, {tokens});
}

// The sums are written (partial) or read (apply) while q and k are read or rewritten row by
// row: they must not share memory with q or k.
moekit_status check_sums_apart(const Checker& c, const moekit_tensor* q, const moekit_tensor* k,
                               const moekit_tensor* q_sumsq, const moekit_tensor* k_sumsq) {
  if (moekit_status s = check_disjoint(c, "q", q, "q_sumsq", q_sumsq)) return s;
  if (moekit_status s = check_disjoint(c, "k", k, "q_sumsq", q_sumsq)) return s;
  if (moekit_status s = check_disjoint(c, "q", q, "k_sumsq", k_sumsq)) return s;
  return check_disjoint(c, "k", k, "k_sumsq", k_sumsq);
}

}  // namespace

extern "C" {

moekit_status moekit_qk_norm(moekit_tensor* q, moekit_tensor* k, const moekit_tensor* q_weight,
                             const moekit_tensor* k_weight, float eps) {
  Checker c("moekit_qk_norm");
  QkNormArgs a;
  if (moekit_status s = check_qk(c, q, k, &a)) return s;
  if (moekit_status s = check_weight(c, "q_weight", q_weight, a.q_width)) return s;
  if (moekit_status s = check_weight(c, "k_weight", k_weight, a.k_width)) return s;
  if (moekit_status s = check_weights_apart(c, "q_weight", q_weight, "k_weight", k_weight, q, k))
    return s;
  if (moekit_status s = check_eps(c, eps)) return s;
  a.mode = QkNormArgs::Mode::kFull;
  a.q_w = q_weight->data;
  a.q_w_dtype = q_weight->dtype;
  a.k_w = k_weight->data;
  a.k_w_dtype = k_weight->dtype;
  a.eps = eps;
  return dispatch("qk_norm", qk_norm_impls(), a);
}

moekit_status moekit_qk_norm_partial_sumsq(const moekit_tensor* q, const moekit_tensor* k,
                                           moekit_tensor* q_sumsq, moekit_tensor* k_sumsq) {
  Checker c("moekit_qk_norm_partial_sumsq");
  QkNormArgs a;
  if (moekit_status s = check_qk(c, q, k, &a)) return s;
  if (moekit_status s = check_sums(c, "q_sumsq", q_sumsq, a.tokens)) return s;
  if (moekit_status s = check_sums(c, "k_sumsq", k_sumsq, a.tokens)) return s;
  if (moekit_status s = check_disjoint(c, "q_sumsq", q_sumsq, "k_sumsq", k_sumsq)) return s;
  if (moekit_status s = check_sums_apart(c, q, k, q_sumsq, k_sumsq)) return s;
  a.mode = QkNormArgs::Mode::kPartialSumsq;
  a.q_sumsq = static_cast<float*>(q_sumsq->data);
  a.k_sumsq = static_cast<float*>(k_sumsq->data);
  return dispatch("qk_norm", qk_norm_impls(), a);
}

moekit_status moekit_qk_norm_apply(moekit_tensor* q, moekit_tensor* k,
                                   const moekit_tensor* q_sumsq, const moekit_tensor* k_sumsq,
                                   int64_t q_global_width, int64_t k_global_width,
                                   const moekit_tensor* q_weight_slice,
                                   const moekit_tensor* k_weight_slice, float eps) {
  Checker c("moekit_qk_norm_apply");
  QkNormArgs a;
  if (moekit_status s = check_qk(c, q, k, &a)) return s;
  if (moekit_status s = check_sums(c, "q_sumsq", q_sumsq, a.tokens)) return s;
  if (moekit_status s = check_sums(c, "k_sumsq", k_sumsq, a.tokens)) return s;
  if (moekit_status s = check_sums_apart(c, q, k, q_sumsq, k_sumsq)) return s;
  if (q_global_width < a.q_width || q_global_width <= 0)
    return c.invalid("q_global_width", std::to_string(q_global_width) +
                                           " must be positive and at least the local width " +
                                           std::to_string(a.q_width));
  if (k_global_width < a.k_width || k_global_width <= 0)
    return c.invalid("k_global_width", std::to_string(k_global_width) +
                                           " must be positive and at least the local width " +
                                           std::to_string(a.k_width));
  if (moekit_status s = check_weight(c, "q_weight_slice", q_weight_slice, a.q_width)) return s;
  if (moekit_status s = check_weight(c, "k_weight_slice", k_weight_slice, a.k_width)) return s;
  if (moekit_status s = check_weights_apart(c, "q_weight_slice", q_weight_slice, "k_weight_slice",
                                            k_weight_slice, q, k))
    return s;
  if (moekit_status s = check_eps(c, eps)) return s;
  a.mode = QkNormArgs::Mode::kApply;
  a.q_sumsq = static_cast<float*>(q_sumsq->data);
  a.k_sumsq = static_cast<float*>(k_sumsq->data);
  a.q_global_width = q_global_width;
  a.k_global_width = k_global_width;
  a.q_w = q_weight_slice->data;
  a.q_w_dtype = q_weight_slice->dtype;
  a.k_w = k_weight_slice->data;
  a.k_w_dtype = k_weight_slice->dtype;
  a.eps = eps;
  return dispatch("qk_norm", qk_norm_impls(), a);
}

moekit_status moekit_qk_norm_kv_weight_slice(int64_t num_kv_heads, int64_t head_dim,
                                             int64_t rank, int64_t world, int64_t* begin,
                                             int64_t* len) {
  Checker c("moekit_qk_norm_kv_weight_slice");
  if (num_kv_heads <= 0) return c.invalid("num_kv_heads", "must be positive");
  if (head_dim <= 0) return c.invalid("head_dim", "must be positive");
  if (num_kv_heads > kMaxElements / head_dim)  // keeps the offsets below from overflowing
    return c.invalid("num_kv_heads", std::to_string(num_kv_heads) + " heads x head_dim " +
                                         std::to_string(head_dim) + " is too large");
  if (world <= 0) return c.invalid("world", "must be positive");
  if (rank < 0 || rank >= world)
    return c.invalid("rank", std::to_string(rank) + " is out of range [0, " + std::to_string(world) + ")");
  if (begin == nullptr) return c.invalid("begin", "is NULL");
  if (len == nullptr) return c.invalid("len", "is NULL");
  if (len == begin) return c.invalid("len", "is the same pointer as begin (both are written)");
  if (num_kv_heads >= world) {
    if (num_kv_heads % world != 0)
      return c.invalid("world", std::to_string(num_kv_heads) + " kv heads do not divide among " +
                                    std::to_string(world) + " ranks");
    const int64_t per_rank = num_kv_heads / world;
    *begin = rank * per_rank * head_dim;
    *len = per_rank * head_dim;
  } else {
    if (world % num_kv_heads != 0)
      return c.invalid("world", std::to_string(world) + " ranks do not replicate " +
                                    std::to_string(num_kv_heads) + " kv heads evenly");
    const int64_t ranks_per_head = world / num_kv_heads;
    *begin = (rank / ranks_per_head) * head_dim;
    *len = head_dim;
  }
  return MOEKIT_OK;
}

}  // extern "C"
