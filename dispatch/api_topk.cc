// C API entry points of top-k routing: validate, fill the arguments, dispatch.
#include <cmath>

#include "dispatch/validate.h"
#include "kernels/topk/topk.h"

using namespace moekit;

namespace {

// Checks the routing parameters, bias and outputs for M rows of E experts and fills `a`.
moekit_status check_route(const Checker& c, int64_t M, int64_t E, const moekit_tensor* bias,
                          const moekit_route_params* p, const moekit_tensor* weights,
                          const moekit_tensor* ids, TopkArgs* a) {
  if (p == nullptr) return c.invalid("params", "is NULL");
  if (E < 1) return c.invalid("logits", "has no experts (E = 0)");
  if (E > (int64_t{1} << 30)) return c.invalid("logits", "has too many experts");
  if (p->top_k < 1 || p->top_k > E)
    return c.invalid("params.top_k", std::to_string(p->top_k) + " is out of range [1, E = " +
                                         std::to_string(E) + "]");
  if (p->scoring != MOEKIT_SCORING_SOFTMAX && p->scoring != MOEKIT_SCORING_SIGMOID)
    return c.invalid("params.scoring", std::to_string(static_cast<int>(p->scoring)) + " is not a scoring function");
  if (!std::isfinite(p->routed_scaling_factor))
    return c.invalid("params.routed_scaling_factor", "must be finite");
  if (p->num_expert_group < 0) return c.invalid("params.num_expert_group", "must not be negative");
  if (p->num_expert_group > 1) {
    const int64_t groups = p->num_expert_group;
    if (E % groups != 0)
      return c.invalid("params.num_expert_group", std::to_string(groups) + " groups do not divide E = " +
                                                      std::to_string(E));
    if (p->topk_group < 1 || p->topk_group > groups)
      return c.invalid("params.topk_group", std::to_string(p->topk_group) + " is out of range [1, " +
                                                std::to_string(groups) + "]");
    if (p->top_k > p->topk_group * (E / groups))
      return c.invalid("params.top_k", std::to_string(p->top_k) + " exceeds the experts of the " +
                                           std::to_string(p->topk_group) + " kept groups");
  }
  if (bias != nullptr) {
    if (moekit_status s = c.tensor("bias", bias, 1, {MOEKIT_F32})) return s;
    if (moekit_status s = c.dims("bias", bias, {E})) return s;
  }
  if (moekit_status s = c.tensor("weights", weights, 2, {MOEKIT_F32})) return s;
  if (moekit_status s = c.dims("weights", weights, {M, p->top_k})) return s;
  if (moekit_status s = c.tensor("ids", ids, 2, {MOEKIT_I32, MOEKIT_I64})) return s;
  if (moekit_status s = c.dims("ids", ids, {M, p->top_k})) return s;
  if (overlaps(weights, ids)) return c.invalid("ids", "overlaps weights in memory");
  // The bias is read for every row, after earlier rows' outputs are written.
  if (moekit_status s = c.input_apart("bias", bias, "weights", weights)) return s;
  if (moekit_status s = c.input_apart("bias", bias, "ids", ids)) return s;
  a->M = M;
  a->E = E;
  a->bias = bias ? static_cast<const float*>(bias->data) : nullptr;
  a->k = p->top_k;
  a->scoring = p->scoring;
  a->renormalize = p->renormalize != 0;
  a->num_expert_group = p->num_expert_group > 1 ? p->num_expert_group : 0;
  a->topk_group = p->num_expert_group > 1 ? p->topk_group : 0;
  a->scaling = p->routed_scaling_factor;
  a->weights = static_cast<float*>(weights->data);
  a->weights_stride = stride_of(weights, 0);
  a->ids = ids->data;
  a->ids_stride = stride_of(ids, 0);
  a->ids_dtype = ids->dtype;
  return MOEKIT_OK;
}

}  // namespace

extern "C" {

moekit_route_params moekit_route_params_default(void) {
  moekit_route_params p;
  p.top_k = 1;
  p.scoring = MOEKIT_SCORING_SOFTMAX;
  p.renormalize = 0;
  p.num_expert_group = 0;
  p.topk_group = 0;
  p.routed_scaling_factor = 1.0f;
  return p;
}

moekit_status moekit_topk_route(const moekit_tensor* logits, const moekit_tensor* bias,
                                const moekit_route_params* params, moekit_tensor* weights,
                                moekit_tensor* ids) {
  Checker c("moekit_topk_route");
  if (moekit_status s = c.tensor("logits", logits, 2, {MOEKIT_F32, MOEKIT_BF16})) return s;
  TopkArgs a;
  if (moekit_status s = check_route(c, logits->shape[0], logits->shape[1], bias, params, weights, ids, &a))
    return s;
  if (overlaps(logits, weights) || overlaps(logits, ids))
    return c.invalid("weights/ids", "overlap logits in memory");
  a.logits = logits->data;
  a.logits_stride = stride_of(logits, 0);
  a.logits_dtype = logits->dtype;
  return dispatch("topk_route", topk_route_impls(), a);
}

moekit_status moekit_router_topk(const moekit_tensor* hidden, const moekit_tensor* gate_weight,
                                 const moekit_tensor* bias, const moekit_route_params* params,
                                 moekit_tensor* weights, moekit_tensor* ids,
                                 moekit_tensor* logits_out) {
  Checker c("moekit_router_topk");
  if (moekit_status s = c.tensor("hidden", hidden, 2, {MOEKIT_F32, MOEKIT_BF16})) return s;
  if (moekit_status s = c.tensor("gate_weight", gate_weight, 2, {MOEKIT_F32})) return s;
  if (moekit_status s = c.dims("gate_weight", gate_weight, {-1, hidden->shape[1]})) return s;
  const int64_t M = hidden->shape[0], E = gate_weight->shape[0];
  RouterTopkArgs a;
  if (moekit_status s = check_route(c, M, E, bias, params, weights, ids, &a.route)) return s;
  if (logits_out != nullptr) {
    if (moekit_status s = c.tensor("logits_out", logits_out, 2, {MOEKIT_F32})) return s;
    if (moekit_status s = c.dims("logits_out", logits_out, {M, E})) return s;
    if (overlaps(logits_out, weights) || overlaps(logits_out, ids) || overlaps(logits_out, hidden))
      return c.invalid("logits_out", "overlaps another argument in memory");
  }
  // The gate is read for every block of tokens, after earlier blocks' outputs are written; the
  // bias likewise (weights and ids were checked against it in check_route).
  if (moekit_status s = c.input_apart("gate_weight", gate_weight, "weights", weights)) return s;
  if (moekit_status s = c.input_apart("gate_weight", gate_weight, "ids", ids)) return s;
  if (moekit_status s = c.input_apart("gate_weight", gate_weight, "logits_out", logits_out))
    return s;
  if (moekit_status s = c.input_apart("bias", bias, "logits_out", logits_out)) return s;
  if (overlaps(hidden, weights) || overlaps(hidden, ids))
    return c.invalid("weights/ids", "overlap hidden in memory");
  a.H = hidden->shape[1];
  a.hidden = hidden->data;
  a.hidden_stride = stride_of(hidden, 0);
  a.hidden_dtype = hidden->dtype;
  a.gate = static_cast<const float*>(gate_weight->data);
  a.gate_stride = stride_of(gate_weight, 0);
  a.logits_out = logits_out ? static_cast<float*>(logits_out->data) : nullptr;
  a.logits_out_stride = logits_out ? stride_of(logits_out, 0) : 0;
  return dispatch("router_topk", router_topk_impls(), a);
}

}  // extern "C"
