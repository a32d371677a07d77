// Scalar FP8 conversion (through a 256-entry table built from the reference decode) and the
// converter table.
#include "kernels/moe/fp8_convert.h"

#include <array>

#include "dispatch/runtime.h"
#include "reference/numeric.h"

namespace moekit {
namespace {

const std::array<float, 256>& f32_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int v = 0; v < 256; ++v) t[v] = fp8_e4m3_to_f32(static_cast<uint8_t>(v));
    return t;
  }();
  return table;
}

}  // namespace

const uint8_t* fp8_bf16_byte_tables() {
  static const std::array<uint8_t, 256> tables = [] {
    std::array<uint8_t, 256> t{};
    for (int v = 0; v < 128; ++v) {
      const uint16_t h = f32_to_bf16(fp8_e4m3_to_f32(static_cast<uint8_t>(v)));
      t[v] = static_cast<uint8_t>(h >> 8);
      t[128 + v] = static_cast<uint8_t>(h & 0xFF);
    }
    return t;
  }();
  return tables.data();
}

void fp8_e4m3_to_f32_scalar(const uint8_t* src, float* dst, int64_t n) {
  const std::array<float, 256>& t = f32_table();
  for (int64_t i = 0; i < n; ++i) dst[i] = t[src[i]];
}

void fp8_e4m3_to_bf16_scalar(const uint8_t* src, uint16_t* dst, int64_t n) {
  // Exact: an e4m3 value has 4 significant bits, bf16 has 8.
  const std::array<float, 256>& t = f32_table();
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(t[src[i]]);
}

void fp8_dequant_f32_scalar(const uint8_t* q, const float* block_scales, int64_t n,
                            int64_t block_k, float* dst) {
  const std::array<float, 256>& t = f32_table();
  for (int64_t i = 0; i < n; ++i) dst[i] = t[q[i]] * block_scales[i / block_k];
}

const std::vector<Fp8Converter>& fp8_converters() {
  static const std::vector<Fp8Converter> converters = {
      // VBMI is not part of any level, but every AMX CPU has it.
      {"fp8_convert_avx512vbmi", MOEKIT_ISA_AMX, fp8_e4m3_to_bf16_avx512vbmi,
       fp8_e4m3_to_f32_avx512vbmi, fp8_dequant_f32_avx512vbmi},
      {"fp8_convert_avx512", MOEKIT_ISA_AVX512, fp8_e4m3_to_bf16_avx512, fp8_e4m3_to_f32_avx512,
       fp8_dequant_f32_avx512},
      {"fp8_convert_avx2", MOEKIT_ISA_AVX2, fp8_e4m3_to_bf16_avx2, fp8_e4m3_to_f32_avx2,
       fp8_dequant_f32_avx2},
      {"fp8_convert_scalar", MOEKIT_ISA_SCALAR, fp8_e4m3_to_bf16_scalar, fp8_e4m3_to_f32_scalar,
       fp8_dequant_f32_scalar},
  };
  return converters;
}

const Fp8Converter& fp8_converter() {
  const moekit_isa cap = effective_isa();
  for (const Fp8Converter& c : fp8_converters())
    if (c.level <= cap) return c;
  return fp8_converters().back();
}

}  // namespace moekit
