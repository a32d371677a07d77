// Fused-MoE microkernels for FP8 weights on AVX-512-BF16 with AVX512-VBMI table conversion
// (fp8_convert_avx512vbmi.h: 6 instructions per 64 weights). Registered at the amx level, the
// only level that implies VBMI (every AMX CPU has it); the kernels themselves use no AMX.
#include "kernels/moe/fp8_convert_avx512vbmi.h"
#include "kernels/moe/fp8_moe_avx512.h"

// GCC 12 reports its own intrinsics' _mm512_undefined_* placeholders as "maybe uninitialized"
// once inlined (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moekit {
namespace {

struct VbmiConverter {
  static constexpr bool kLaneOrder = true;
  fp8_vbmi::Tables tables = fp8_vbmi::make_tables();
  inline void operator()(const uint8_t* src, __m512i* pair0, __m512i* pair1) const {
    fp8_vbmi::to_bf16x64(_mm512_loadu_si512(src), tables, pair0, pair1);
  }
  inline void lane_order(const uint8_t* src, __m512i* lanes_low, __m512i* lanes_high) const {
    fp8_vbmi::to_bf16x64_lane_order(_mm512_loadu_si512(src), tables, lanes_low, lanes_high);
  }
};

}  // namespace

const MoeMicrokernel& moe_microkernel_fp8_avx512vbmi() {
  static const MoeMicrokernel uk =
      fp8_moe::make_microkernel<VbmiConverter>("fused_moe_fp8_avx512vbmi_vnni");
  return uk;
}

}  // namespace moekit
