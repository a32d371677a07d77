// CPUID/XGETBV detection. The OS must enable a register state (XCR0) before its instructions
// may be used, and Linux additionally requires each process to ask for the AMX tile data state.
#include "dispatch/cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace moekit {
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl code, Linux >= 5.16
constexpr long kXfeatureXtiledata = 18;

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned subleaf) {
  Regs r;
  __cpuid_count(leaf, subleaf, r.a, r.b, r.c, r.d);
  return r;
}

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool bit(unsigned v, int b) { return (v >> b) & 1u; }

CpuFeatures detect() {
  CpuFeatures f;
  Regs r0 = cpuid(0, 0);
  const unsigned max_leaf = r0.a;
  char vendor[13] = {};
  std::memcpy(vendor + 0, &r0.b, 4);
  std::memcpy(vendor + 4, &r0.d, 4);
  std::memcpy(vendor + 8, &r0.c, 4);
  f.vendor = vendor;

  const unsigned max_extended = cpuid(0x80000000u, 0).a;
  if (max_extended >= 0x80000001u) f.lzcnt = bit(cpuid(0x80000001u, 0).c, 5);
  if (max_extended >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      Regs r = cpuid(0x80000002u + i, 0);
      std::memcpy(brand + 16 * i + 0, &r.a, 4);
      std::memcpy(brand + 16 * i + 4, &r.b, 4);
      std::memcpy(brand + 16 * i + 8, &r.c, 4);
      std::memcpy(brand + 16 * i + 12, &r.d, 4);
    }
    f.brand = brand;
    const size_t first = f.brand.find_first_not_of(' ');
    f.brand = first == std::string::npos ? "" : f.brand.substr(first);
  }
  if (max_leaf < 1) return f;

  Regs r1 = cpuid(1, 0);
  const bool osxsave = bit(r1.c, 27);
  f.fma = bit(r1.c, 12);
  f.f16c = bit(r1.c, 29);
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;           // SSE + YMM
  f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
  f.os_amx = (xcr0 & 0x60000) == 0x60000;   // XTILECFG (17) + XTILEDATA (18)

  if (max_leaf >= 7) {
    Regs r7 = cpuid(7, 0);
    f.avx2 = bit(r7.b, 5);
    f.bmi1 = bit(r7.b, 3);
    f.bmi2 = bit(r7.b, 8);
    f.avx512f = bit(r7.b, 16);
    f.avx512dq = bit(r7.b, 17);
    f.avx512bw = bit(r7.b, 30);
    f.avx512vl = bit(r7.b, 31);
    f.avx512_vbmi = bit(r7.c, 1);
    f.avx512_vnni = bit(r7.c, 11);
    f.amx_bf16 = bit(r7.d, 22);
    f.amx_tile = bit(r7.d, 24);
    f.amx_int8 = bit(r7.d, 25);
    if (r7.a >= 1) f.avx512_bf16 = bit(cpuid(7, 1).a, 5);
  }

  if (f.os_amx && f.amx_tile) {
    f.amx_permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }

  // Highway's AVX2 target also assumes BMI1/BMI2/LZCNT (every AVX2 CPU has them, but a
  // hypervisor may hide them).
  const bool avx2 = f.os_avx && f.avx2 && f.fma && f.f16c && f.bmi1 && f.bmi2 && f.lzcnt;
  const bool avx512 = avx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  const bool avx512_bf16 = avx512 && f.avx512_bf16 && f.avx512_vnni;
  // Every AMX CPU also has AVX512-VBMI; the amx level requires it so that amx-level kernels may
  // use byte permutes (the FP8 tables).
  const bool amx = avx512_bf16 && f.avx512_vbmi && f.amx_tile && f.amx_bf16 && f.amx_int8 &&
                   f.os_amx && f.amx_permitted;
  f.level = amx           ? MOEKIT_ISA_AMX
            : avx512_bf16 ? MOEKIT_ISA_AVX512_BF16
            : avx512      ? MOEKIT_ISA_AVX512
            : avx2        ? MOEKIT_ISA_AVX2
                          : MOEKIT_ISA_SCALAR;
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace moekit
