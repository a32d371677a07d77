// The fused_moe table spells out its entries' names (building it must run no code compiled for
// a higher ISA than the CPU has); each spelled name must equal its microkernel's own name.
#include <gtest/gtest.h>

#include <string>

#include "kernels/moe/fp8_vnni.h"
#include "kernels/moe/moe_microkernel.h"
#include "tests/test_util.h"

namespace {

using moekit::MoeMicrokernel;

struct Named {
  const MoeMicrokernel& (*kernel)();
  moekit_isa level;
};

const moekit::Impl<moekit::FusedMoeArgs>* find_entry(const std::string& name) {
  for (const auto& impl : moekit::fused_moe_impls())
    if (name == impl.name) return &impl;
  return nullptr;
}

TEST(MoeTable, SpelledNamesMatchTheMicrokernels) {
  const Named kernels[] = {
      {moekit::moe_microkernel_bf16_avx512bf16, MOEKIT_ISA_AVX512_BF16},
      {moekit::moe_microkernel_bf16_avx512, MOEKIT_ISA_AVX512},
      {moekit::moe_microkernel_f32_avx512, MOEKIT_ISA_AVX512},
      {moekit::moe_microkernel_bf16_avx2, MOEKIT_ISA_AVX2},
      {moekit::moe_microkernel_f32_avx2, MOEKIT_ISA_AVX2},
      {moekit::moe_microkernel_bf16_scalar, MOEKIT_ISA_SCALAR},
      {moekit::moe_microkernel_f32_scalar, MOEKIT_ISA_SCALAR},
      {moekit::moe_microkernel_fp8_amx, MOEKIT_ISA_AMX},
      {moekit::moe_microkernel_fp8_avx512vbmi, MOEKIT_ISA_AMX},
      {moekit::moe_microkernel_fp8_avx512bf16, MOEKIT_ISA_AVX512_BF16},
      {moekit::moe_microkernel_fp8_avx2, MOEKIT_ISA_AVX2},
      {moekit::moe_microkernel_fp8_scalar, MOEKIT_ISA_SCALAR},
  };
  int checked = 0;
  for (const Named& k : kernels) {
    if (!moekit_test::cpu_can_run(k.level)) continue;  // its code may not run here
    const std::string name = k.kernel().name;
    const auto* entry = find_entry(name);
    ASSERT_NE(entry, nullptr) << name << " is not in the fused_moe table";
    EXPECT_EQ(entry->level, k.level) << name;
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

}  // namespace
