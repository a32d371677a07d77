// The plain-C++ side of the AMX fused-MoE path (no ISA flags, safe to run on any CPU): the
// fused_moe table entry. The row threshold between the AMX and the AVX-512-BF16 microkernels is
// in moe_thresholds.cc.
#include "kernels/moe/moe_amx.h"

#include "kernels/moe/moe_microkernel.h"

namespace moekit {
namespace {

// The AMX microkernel reading a VNNI handle (for bf16 the same bytes as the AMX layout).
const MoeMicrokernel& amx_on_vnni() {
  static const MoeMicrokernel uk = [] {
    MoeMicrokernel copy = moe_microkernel_bf16_amx();
    copy.layout = MOEKIT_LAYOUT_VNNI;
    return copy;
  }();
  return uk;
}

const MoeMicrokernel& amx_for(const moekit_experts& w) {
  return w.layout == MOEKIT_LAYOUT_VNNI ? amx_on_vnni() : moe_microkernel_bf16_amx();
}

}  // namespace

const char* fused_moe_amx_supports(const FusedMoeArgs& a) {
  if (a.experts == nullptr) return "no experts";
  if (a.experts->dtype != MOEKIT_BF16) return "needs bf16 weights";
  if (a.experts->layout != MOEKIT_LAYOUT_AMX && a.experts->layout != MOEKIT_LAYOUT_VNNI)
    return "needs the amx (or vnni) layout";
  return fused_moe_pipeline_supports(amx_for(*a.experts), a);
}

void fused_moe_amx(const FusedMoeArgs& a) {
  // A token's ids name distinct experts (as top-k gives them) and a shared expert has one row
  // per token, so with fewer tokens than the threshold no segment would reach the tiles: the
  // AVX-512-BF16 pipeline then runs the whole call with its own, narrower items (the AMX
  // kernel's wide items would leave decode's few experts to fewer threads). Repeated ids are
  // still computed correctly, by the AVX-512-BF16 kernel.
  if (a.M < amx_min_rows()) return fused_moe_pipeline(moe_microkernel_bf16_avx512bf16(), a);
  fused_moe_pipeline(amx_for(*a.experts), a);
}

}  // namespace moekit
