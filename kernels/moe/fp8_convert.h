// Conversion of float8_e4m3fn (the FP8 format of MiniMax-M2's expert weights) to bf16 and f32,
// exact for all 256 bit patterns: +-0, subnormals (m * 2^-9), normals, and NaN (S.1111.111;
// the format has no infinities). One converter per ISA level, best first, scalar last; the
// microkernels use the inline per-ISA helpers in fp8_convert_avx2.h / fp8_convert_avx512.h.
#ifndef MOEKIT_KERNELS_MOE_FP8_CONVERT_H_
#define MOEKIT_KERNELS_MOE_FP8_CONVERT_H_

#include <cstdint>
#include <vector>

#include "moekit/moekit.h"

namespace moekit {

// bf16 bit patterns of e4m3fn subnormals 0..7 (value m * 2^-9, a normal bf16): shared by the
// vector converters' lookup tables.
inline constexpr uint16_t kFp8SubnormalBf16[8] = {0x0000, 0x3B00, 0x3B80, 0x3BC0,
                                                  0x3C00, 0x3C20, 0x3C40, 0x3C60};
// The same values as fp16 (a normal fp16 too); their low bytes are all zero.
inline constexpr uint16_t kFp8SubnormalFp16[8] = {0x0000, 0x1800, 0x1C00, 0x1E00,
                                                  0x2000, 0x2100, 0x2200, 0x2300};
// bf16 / fp16 exponent rebias of an e4m3 normal whose magnitude bits were shifted into place:
// (127 - 7) << 7 and (15 - 7) << 10.
inline constexpr uint16_t kFp8ToBf16Rebias = 120 << 7;
inline constexpr uint16_t kFp8ToFp16Rebias = 8 << 10;
inline constexpr uint16_t kBf16QuietNaN = 0x7FC0;
inline constexpr uint16_t kFp16QuietNaN = 0x7E00;
inline constexpr uint8_t kFp8MagnitudeNaN = 0x7F;

struct Fp8Converter {
  const char* name;  // "fp8_convert_<isa>"
  moekit_isa level;
  void (*to_bf16)(const uint8_t* src, uint16_t* dst, int64_t n);
  void (*to_f32)(const uint8_t* src, float* dst, int64_t n);
  // dst[i] = fp8(q[i]) * block_scales[i / block_k], i < n: one row of a block-quantized matrix.
  void (*dequant_f32)(const uint8_t* q, const float* block_scales, int64_t n, int64_t block_k,
                      float* dst);
};

// Every converter of this build, best first, scalar last.
const std::vector<Fp8Converter>& fp8_converters();
// The best converter the effective ISA level allows.
const Fp8Converter& fp8_converter();

// 256 bytes: the high bytes of bf16(fp8 magnitude v) for v = 0..127, then the low bytes (the
// lookup tables of the VBMI converter).
const uint8_t* fp8_bf16_byte_tables();

void fp8_e4m3_to_bf16_scalar(const uint8_t* src, uint16_t* dst, int64_t n);
void fp8_e4m3_to_f32_scalar(const uint8_t* src, float* dst, int64_t n);
void fp8_dequant_f32_scalar(const uint8_t* q, const float* block_scales, int64_t n,
                            int64_t block_k, float* dst);
void fp8_e4m3_to_bf16_avx2(const uint8_t* src, uint16_t* dst, int64_t n);
void fp8_e4m3_to_f32_avx2(const uint8_t* src, float* dst, int64_t n);
void fp8_dequant_f32_avx2(const uint8_t* q, const float* block_scales, int64_t n,
                          int64_t block_k, float* dst);
void fp8_e4m3_to_bf16_avx512vbmi(const uint8_t* src, uint16_t* dst, int64_t n);
void fp8_e4m3_to_f32_avx512vbmi(const uint8_t* src, float* dst, int64_t n);
void fp8_dequant_f32_avx512vbmi(const uint8_t* q, const float* block_scales, int64_t n,
                                int64_t block_k, float* dst);
void fp8_e4m3_to_bf16_avx512(const uint8_t* src, uint16_t* dst, int64_t n);
void fp8_e4m3_to_f32_avx512(const uint8_t* src, float* dst, int64_t n);
void fp8_dequant_f32_avx512(const uint8_t* q, const float* block_scales, int64_t n,
                            int64_t block_k, float* dst);

}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_FP8_CONVERT_H_
