// Inline AVX-512 (F/BW/VL/DQ) conversion of float8_e4m3fn, for translation units compiled at
// the avx512 level (or above). Exact for every bit pattern.
//
// NOTE: an e4m3 normal S.EEEE.MMM becomes bf16 by shifting its magnitude into place and
// rebiasing the exponent with an integer add: bf16 = (mag << 4) + ((127 - 7) << 7). Subnormals
// (E = 0, value M * 2^-9) are normal bf16 numbers; they come from an 8-entry table through a
// masked vpermw (AVX512-BW), indexed by the magnitude itself (< 8 for subnormals). The NaN
// magnitude 0x7F becomes a quiet NaN, and vpternlog copies the sign from the sign-extended
// byte. The results are normal bf16 numbers, so vdpbf16ps (which treats bf16 subnormals as
// zero) and AMX read them exactly. bf16 widens to f32 by a 16-bit shift.
#ifndef MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX512_H_
#define MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX512_H_

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "fp8_convert_avx512.h needs a translation unit compiled at the avx512 level"
#endif

#include <immintrin.h>

// GCC 12 reports its own intrinsics' _mm512_undefined_* placeholders as "maybe uninitialized"
// once they are inlined (a false positive); silence it for the including AVX-512 file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "kernels/moe/fp8_convert.h"

namespace moekit {
// Unnamed: each including file (compiled with its own ISA flags) keeps its own copy, so the
// linker can never substitute another level's version.
namespace {
namespace fp8_avx512 {

inline __m512i subnormal_table() {
  return _mm512_setr_epi32(kFp8SubnormalBf16[0] | kFp8SubnormalBf16[1] << 16,
                           kFp8SubnormalBf16[2] | kFp8SubnormalBf16[3] << 16,
                           kFp8SubnormalBf16[4] | kFp8SubnormalBf16[5] << 16,
                           kFp8SubnormalBf16[6] | kFp8SubnormalBf16[7] << 16, 0, 0, 0, 0, 0, 0,
                           0, 0, 0, 0, 0, 0);
}

// 32 e4m3 bytes -> 32 bf16 bit patterns (in element order). `table` is subnormal_table(),
// hoisted by callers that convert in a loop.
inline __m512i to_bf16(__m256i q, __m512i table) {
  const __m512i sx = _mm512_cvtepi8_epi16(q);  // bit 15 = sign
  const __m512i mag = _mm512_and_si512(sx, _mm512_set1_epi16(0x7F));
  __m512i h = _mm512_add_epi16(_mm512_slli_epi16(mag, 4),
                               _mm512_set1_epi16(static_cast<short>(kFp8ToBf16Rebias)));
  h = _mm512_mask_permutexvar_epi16(h, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag,
                                    table);
  h = _mm512_mask_mov_epi16(h, _mm512_cmpeq_epi16_mask(mag, _mm512_set1_epi16(kFp8MagnitudeNaN)),
                            _mm512_set1_epi16(static_cast<short>(kBf16QuietNaN)));
  // h | (sx & 0x8000)
  return _mm512_ternarylogic_epi32(h, sx, _mm512_set1_epi16(static_cast<short>(0x8000)), 0xF8);
}

// 16 bf16 bit patterns -> 16 f32.
inline __m512 bf16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 32 e4m3 bytes -> 32 f32: elements 0..15 in *lo, 16..31 in *hi.
inline void to_f32(__m256i q, __m512i table, __m512* lo, __m512* hi) {
  const __m512i h = to_bf16(q, table);
  *lo = bf16_to_f32(_mm512_castsi512_si256(h));
  *hi = bf16_to_f32(_mm512_extracti64x4_epi64(h, 1));
}

}  // namespace fp8_avx512
}  // namespace
}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX512_H_
