// Reference implementations: plain C++, no intrinsics, wide accumulation, written to be
// obviously right. Each is the last entry of its op's dispatch table (the fallback) and the
// oracle every fast kernel is tested against.
#ifndef MOEKIT_REFERENCE_REFERENCE_H_
#define MOEKIT_REFERENCE_REFERENCE_H_

#include "kernels/moe/moe.h"
#include "kernels/rmsnorm/rmsnorm.h"
#include "kernels/topk/topk.h"

namespace moekit {

void ref_rmsnorm(const RmsnormArgs& args);
void ref_fused_add_rmsnorm(const RmsnormArgs& args);
void ref_qk_norm(const QkNormArgs& args);

void ref_topk_route(const TopkArgs& args);
void ref_router_topk(const RouterTopkArgs& args);

void ref_moe_align(const MoeAlignArgs& args);
void ref_fused_moe(const FusedMoeArgs& args);

}  // namespace moekit

#endif  // MOEKIT_REFERENCE_REFERENCE_H_
