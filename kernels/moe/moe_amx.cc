// The plain-C++ side of the AMX fused-MoE path (no ISA flags, safe to run on any CPU): the row
// threshold between the AMX and the AVX-512-BF16 microkernels, and the fused_moe table entry.
#include "kernels/moe/moe_amx.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "kernels/moe/moe_microkernel.h"

namespace moekit {
namespace {

std::atomic<int64_t> g_min_rows_override{0};

int64_t min_rows_from_env() {
  const char* v = std::getenv("MOEKIT_AMX_MIN_ROWS");
  if (v == nullptr || *v == '\0') return kAmxDefaultMinRows;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  return end != v && *end == '\0' && n >= 1 ? static_cast<int64_t>(n) : kAmxDefaultMinRows;
}

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

int64_t amx_min_rows() {
  static const int64_t from_env = min_rows_from_env();
  const int64_t override_rows = g_min_rows_override.load(std::memory_order_relaxed);
  return override_rows > 0 ? override_rows : from_env;
}

void amx_set_min_rows(int64_t rows) { g_min_rows_override.store(rows > 0 ? rows : 0); }

int64_t amx_min_rows_for(moekit_dtype weights) {
  return weights == MOEKIT_FP8_E4M3 ? std::max<int64_t>(1, amx_min_rows() / 4) : amx_min_rows();
}

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
