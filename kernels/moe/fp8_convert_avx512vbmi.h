// Inline AVX512-VBMI conversion of float8_e4m3fn to bf16, for translation units compiled at the
// amx level: every CPU with AMX also has AVX512-VBMI (which no level of its own guarantees), so
// this header enables VBMI for the including file.
//
// NOTE: 64 weights per step. vpermi2b looks up 128-entry byte tables indexed by the low 7 bits
// of each byte (the magnitude; the sign bit is ignored), giving the high and the low byte of
// the bf16 value of every magnitude, subnormals and NaN included (tables built from the
// reference decode, fp8_bf16_byte_tables()). The sign is or-ed into the high byte, and
// vpunpck{l,h}bw interleave low and high bytes into words. The unpacks work inside 128-bit
// lanes, so one vpermb first arranges the input bytes such that the words come out in element
// order: 6 instructions per 64 weights, exact for all 256 bit patterns.
#ifndef MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX512VBMI_H_
#define MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX512VBMI_H_

#if !defined(__AMX_TILE__) || !defined(__AVX512BW__)
#error "fp8_convert_avx512vbmi.h needs a translation unit compiled at the amx level"
#endif

#pragma GCC target("avx512vbmi")
#include <immintrin.h>

#include "kernels/moe/fp8_convert.h"

namespace moekit {
namespace {  // each including file keeps its own copy (see fp8_convert_avx512.h)
namespace fp8_vbmi {

struct Tables {
  __m512i high0, high1, low0, low1;  // bytes of bf16(magnitude) for magnitudes 0..63, 64..127
  __m512i arrange;                   // vpermb indices that put the unpacked words in order
};

inline Tables make_tables() {
  const uint8_t* t = fp8_bf16_byte_tables();
  Tables r;
  r.high0 = _mm512_loadu_si512(t);
  r.high1 = _mm512_loadu_si512(t + 64);
  r.low0 = _mm512_loadu_si512(t + 128);
  r.low1 = _mm512_loadu_si512(t + 192);
  // Byte 16j + i (i < 8) of 128-bit lane j takes element 8j + i, byte 16j + 8 + i element
  // 32 + 8j + i: then unpacklo gives elements 0..31 and unpackhi elements 32..63.
  alignas(64) uint8_t arrange[64];
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 8; ++i) {
      arrange[16 * j + i] = static_cast<uint8_t>(8 * j + i);
      arrange[16 * j + 8 + i] = static_cast<uint8_t>(32 + 8 * j + i);
    }
  r.arrange = _mm512_load_si512(arrange);
  return r;
}

// 64 e4m3 bytes -> bf16 elements 0..31 in *first, 32..63 in *second.
inline void to_bf16x64(__m512i q, const Tables& t, __m512i* first, __m512i* second) {
  const __m512i a = _mm512_permutexvar_epi8(t.arrange, q);
  __m512i high = _mm512_permutex2var_epi8(t.high0, a, t.high1);
  const __m512i low = _mm512_permutex2var_epi8(t.low0, a, t.low1);
  high = _mm512_ternarylogic_epi32(high, a, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
  *first = _mm512_unpacklo_epi8(low, high);
  *second = _mm512_unpackhi_epi8(low, high);
}

// The same without the arranging vpermb: *lanes_low holds the words of input bytes 0-7, 16-23,
// 32-39, 48-55 and *lanes_high those of bytes 8-15, 24-31, 40-47, 56-63 (each 128-bit lane j
// of the results covers input bytes 16j .. 16j + 15). Callers that can use that order save one
// shuffle per 64 weights.
inline void to_bf16x64_lane_order(__m512i q, const Tables& t, __m512i* lanes_low,
                                  __m512i* lanes_high) {
  __m512i high = _mm512_permutex2var_epi8(t.high0, q, t.high1);
  const __m512i low = _mm512_permutex2var_epi8(t.low0, q, t.low1);
  high = _mm512_ternarylogic_epi32(high, q, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
  *lanes_low = _mm512_unpacklo_epi8(low, high);
  *lanes_high = _mm512_unpackhi_epi8(low, high);
}

}  // namespace fp8_vbmi
}  // namespace
}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_FP8_CONVERT_AVX512VBMI_H_
