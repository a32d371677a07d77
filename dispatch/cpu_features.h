// CPU feature detection: CPUID + XGETBV once per process, plus the Linux permission request
// for the AMX tile state. The result decides the detected dispatch level.
#ifndef MOEKIT_DISPATCH_CPU_FEATURES_H_
#define MOEKIT_DISPATCH_CPU_FEATURES_H_

#include <string>

#include "moekit/moekit.h"

namespace moekit {

struct CpuFeatures {
  std::string vendor;
  std::string brand;
  bool avx2 = false, fma = false, f16c = false, bmi1 = false, bmi2 = false, lzcnt = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vnni = false, avx512_vbmi = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false;      // XCR0 has the YMM state
  bool os_avx512 = false;   // XCR0 has opmask + ZMM states
  bool os_amx = false;      // XCR0 has the tile config + tile data states
  bool amx_permitted = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeded
  moekit_isa level = MOEKIT_ISA_SCALAR;
};

// Detected once (thread-safe) and cached.
const CpuFeatures& cpu_features();

}  // namespace moekit

#endif  // MOEKIT_DISPATCH_CPU_FEATURES_H_
