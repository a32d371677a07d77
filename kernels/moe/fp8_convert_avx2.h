// Inline AVX2 + F16C conversion of float8_e4m3fn, for translation units compiled at the avx2
// level (or above). Exact for every bit pattern.
//
// NOTE: an e4m3 normal S.EEEE.MMM is an fp16 (or bf16) whose magnitude bits are shifted into
// place and whose exponent is rebiased by an integer add: fp16 = (mag << 7) + ((15 - 7) << 10).
// Subnormals (E = 0, value M * 2^-9) are normal numbers in fp16 and bf16; they come from an
// 8-entry table through vpshufb. The NaN magnitude 0x7F is forced to a quiet NaN, and the sign
// bit is copied from the sign-extended byte. F16C then widens fp16 to f32 exactly.
#ifndef MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX2_H_
#define MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX2_H_

#if !defined(__AVX2__) || !defined(__F16C__)
#error "fp8_convert_avx2.h needs a translation unit compiled at the avx2 level"
#endif

#include <immintrin.h>

#include "kernels/moe/fp8_convert.h"

namespace moekit {
// Unnamed: each including file (compiled with its own ISA flags) keeps its own copy, so the
// linker can never substitute another level's version.
namespace {
namespace fp8_avx2 {

// 16 e4m3 bytes -> 16 fp16 bit patterns (in element order).
inline __m256i to_fp16(__m128i q) {
  const __m256i sx = _mm256_cvtepi8_epi16(q);  // bit 15 = sign
  const __m256i mag = _mm256_and_si256(sx, _mm256_set1_epi16(0x7F));
  const __m256i normal = _mm256_add_epi16(_mm256_slli_epi16(mag, 7),
                                          _mm256_set1_epi16(static_cast<short>(kFp8ToFp16Rebias)));
  // High bytes of kFp8SubnormalFp16 (its low bytes are zero), in both 128-bit lanes.
  const __m256i sub_high = _mm256_broadcastsi128_si256(_mm_setr_epi8(
      0, 0x18, 0x1C, 0x1E, 0x20, 0x21, 0x22, 0x23, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m256i sub = _mm256_slli_epi16(_mm256_shuffle_epi8(sub_high, mag), 8);
  const __m256i is_sub = _mm256_cmpgt_epi16(_mm256_set1_epi16(8), mag);
  __m256i h = _mm256_blendv_epi8(normal, sub, is_sub);
  const __m256i is_nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(kFp8MagnitudeNaN));
  h = _mm256_or_si256(h, _mm256_and_si256(is_nan, _mm256_set1_epi16(static_cast<short>(kFp16QuietNaN))));
  return _mm256_or_si256(h, _mm256_and_si256(sx, _mm256_set1_epi16(static_cast<short>(0x8000))));
}

// 16 e4m3 bytes -> 16 f32: elements 0..7 in *lo, 8..15 in *hi.
inline void to_f32(__m128i q, __m256* lo, __m256* hi) {
  const __m256i h = to_fp16(q);
  *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// 8 e4m3 bytes (the low 8 of q) -> 8 f32.
inline __m256 to_f32x8(__m128i q) {
  return _mm256_cvtph_ps(_mm256_castsi256_si128(to_fp16(q)));
}

// 16 e4m3 bytes -> 16 bf16 bit patterns.
inline __m256i to_bf16(__m128i q) {
  const __m256i sx = _mm256_cvtepi8_epi16(q);
  const __m256i mag = _mm256_and_si256(sx, _mm256_set1_epi16(0x7F));
  const __m256i normal = _mm256_add_epi16(_mm256_slli_epi16(mag, 4),
                                          _mm256_set1_epi16(static_cast<short>(kFp8ToBf16Rebias)));
  // Low and high bytes of kFp8SubnormalBf16.
  const __m256i sub_low = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(0, 0x00, char(0x80), char(0xC0), 0x00, 0x20, 0x40, 0x60, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m256i sub_high = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(0, 0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m256i sub = _mm256_or_si256(_mm256_shuffle_epi8(sub_low, mag),
                                      _mm256_slli_epi16(_mm256_shuffle_epi8(sub_high, mag), 8));
  const __m256i is_sub = _mm256_cmpgt_epi16(_mm256_set1_epi16(8), mag);
  __m256i h = _mm256_blendv_epi8(normal, sub, is_sub);
  const __m256i is_nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(kFp8MagnitudeNaN));
  h = _mm256_or_si256(h, _mm256_and_si256(is_nan, _mm256_set1_epi16(static_cast<short>(kBf16QuietNaN))));
  return _mm256_or_si256(h, _mm256_and_si256(sx, _mm256_set1_epi16(static_cast<short>(0x8000))));
}

}  // namespace fp8_avx2
}  // namespace
}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX2_H_
