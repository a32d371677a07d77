// Dispatch tables of the blockwise expert matmul, best first; the reference is always last.
// Each fused_moe entry is the generic pipeline (moe_pipeline.cc) run with one microkernel.
#include "kernels/moe/fp8_vnni.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"
#include "reference/reference.h"

namespace moekit {

void moe_align_counting_sort(const MoeAlignArgs& a);  // moe_align.cc

const ImplList<MoeAlignArgs>& moe_align_impls() {
  static const ImplList<MoeAlignArgs> impls = {
      {"moe_align_counting_sort", MOEKIT_ISA_SCALAR, nullptr, moe_align_counting_sort},
      {"ref_moe_align", MOEKIT_ISA_SCALAR, nullptr, ref_moe_align},
  };
  return impls;
}

// {name, level, supports, run} of the pipeline with the microkernel `Kernel()`. The name is
// spelled out (it equals Kernel().name, checked by test_moe) because building the table must
// run no code compiled for a higher ISA level than the CPU has: Kernel() lives in that ISA's
// translation unit and is only called once dispatch has checked the level.
#define MOEKIT_MOE_PIPELINE_ENTRY(Kernel, name, level)                                     \
  {                                                                                         \
    name, level,                                                                            \
        [](const FusedMoeArgs& a) { return fused_moe_pipeline_supports(Kernel(), a); },     \
        [](const FusedMoeArgs& a) { fused_moe_pipeline(Kernel(), a); }                      \
  }

// The same for FP8 microkernels, which also check the block sizes (fp8_vnni.h). The name is
// spelled out so that building the table runs no code compiled for a higher ISA level.
#define MOEKIT_MOE_FP8_ENTRY(Kernel, name, level, supports)                                 \
  {                                                                                         \
    name, level, [](const FusedMoeArgs& a) { return supports(Kernel(), a); },               \
        [](const FusedMoeArgs& a) { fused_moe_pipeline(Kernel(), a); }                      \
  }

const ImplList<FusedMoeArgs>& fused_moe_impls() {
  static const ImplList<FusedMoeArgs> impls = {
      MOEKIT_MOE_FP8_ENTRY(moe_microkernel_fp8_amx, "fused_moe_fp8_amx", MOEKIT_ISA_AMX,
                           fp8_amx_fused_moe_supports),
      MOEKIT_MOE_FP8_ENTRY(moe_microkernel_fp8_avx512vbmi, "fused_moe_fp8_avx512vbmi_vnni",
                           MOEKIT_ISA_AMX, fp8_fused_moe_supports),
      MOEKIT_MOE_FP8_ENTRY(moe_microkernel_fp8_avx512bf16, "fused_moe_fp8_avx512bf16_vnni",
                           MOEKIT_ISA_AVX512_BF16, fp8_fused_moe_supports),
      MOEKIT_MOE_FP8_ENTRY(moe_microkernel_fp8_avx2, "fused_moe_fp8_avx2_vnni", MOEKIT_ISA_AVX2,
                           fp8_fused_moe_supports),
      MOEKIT_MOE_FP8_ENTRY(moe_microkernel_fp8_scalar, "fused_moe_fp8_scalar_vnni",
                           MOEKIT_ISA_SCALAR, fp8_fused_moe_supports),
      {"fused_moe_bf16_amx", MOEKIT_ISA_AMX, fused_moe_amx_supports, fused_moe_amx},  // moe_amx.h
      MOEKIT_MOE_PIPELINE_ENTRY(moe_microkernel_bf16_avx512bf16, "fused_moe_bf16_avx512bf16_vnni", MOEKIT_ISA_AVX512_BF16),
      MOEKIT_MOE_PIPELINE_ENTRY(moe_microkernel_bf16_avx512, "fused_moe_bf16_avx512_vnni", MOEKIT_ISA_AVX512),
      MOEKIT_MOE_PIPELINE_ENTRY(moe_microkernel_f32_avx512, "fused_moe_f32_avx512_vnni", MOEKIT_ISA_AVX512),
      MOEKIT_MOE_PIPELINE_ENTRY(moe_microkernel_bf16_avx2, "fused_moe_bf16_avx2_vnni", MOEKIT_ISA_AVX2),
      MOEKIT_MOE_PIPELINE_ENTRY(moe_microkernel_f32_avx2, "fused_moe_f32_avx2_vnni", MOEKIT_ISA_AVX2),
      MOEKIT_MOE_PIPELINE_ENTRY(moe_microkernel_bf16_scalar, "fused_moe_bf16_scalar_vnni", MOEKIT_ISA_SCALAR),
      MOEKIT_MOE_PIPELINE_ENTRY(moe_microkernel_f32_scalar, "fused_moe_f32_scalar_vnni", MOEKIT_ISA_SCALAR),
      {"ref_fused_moe", MOEKIT_ISA_SCALAR, nullptr, ref_fused_moe},
  };
  return impls;
}

}  // namespace moekit
