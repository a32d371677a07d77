// Fused-MoE microkernels for FP8 weights on AVX-512-BF16 (fp8_moe_avx512.h), converting fp8 to
// bf16 with AVX512-BW arithmetic and a vpermw table for subnormals (fp8_convert_avx512.h).
#include "kernels/moe/fp8_convert_avx512.h"
#include "kernels/moe/fp8_moe_avx512.h"

namespace moekit {
namespace {

struct BwConverter {
  static constexpr bool kLaneOrder = false;
  __m512i table = fp8_avx512::subnormal_table();
  inline void operator()(const uint8_t* src, __m512i* pair0, __m512i* pair1) const {
    *pair0 = fp8_avx512::to_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), table);
    *pair1 = fp8_avx512::to_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32)), table);
  }
};

}  // namespace

const MoeMicrokernel& moe_microkernel_fp8_avx512bf16() {
  static const MoeMicrokernel uk =
      fp8_moe::make_microkernel<BwConverter>("fused_moe_fp8_avx512bf16_vnni");
  return uk;
}

}  // namespace moekit
