// AVX512-VBMI FP8 converters (amx level; see fp8_convert_avx512vbmi.h for the method). Tails
// use masked loads and stores.
#include "kernels/moe/fp8_convert_avx512vbmi.h"

// GCC 12 reports its own intrinsics' _mm512_undefined_* placeholders as "maybe uninitialized"
// once inlined (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moekit {
namespace {

constexpr int64_t kStep = 64;

__mmask64 tail_mask(int64_t count) { return count >= 64 ? ~0ull : (1ull << count) - 1ull; }

inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Converts q[0, count) (count <= 64), scaled, into dst.
inline void dequant_step(const fp8_vbmi::Tables& t, const uint8_t* q, int64_t count, __m512 scale,
                         float* dst) {
  const __mmask64 m = tail_mask(count);
  __m512i b[2];
  fp8_vbmi::to_bf16x64(_mm512_maskz_loadu_epi8(m, q), t, &b[0], &b[1]);
  for (int i = 0; i < 4; ++i) {
    const __m256i h = i % 2 == 0 ? _mm512_castsi512_si256(b[i / 2]) : _mm512_extracti64x4_epi64(b[i / 2], 1);
    _mm512_mask_storeu_ps(dst + 16 * i, static_cast<__mmask16>(m >> (16 * i)), _mm512_mul_ps(widen(h), scale));
  }
}

}  // namespace

void fp8_e4m3_to_bf16_avx512vbmi(const uint8_t* src, uint16_t* dst, int64_t n) {
  const fp8_vbmi::Tables t = fp8_vbmi::make_tables();
  for (int64_t i = 0; i < n; i += kStep) {
    const __mmask64 m = tail_mask(n - i);
    __m512i first, second;
    fp8_vbmi::to_bf16x64(_mm512_maskz_loadu_epi8(m, src + i), t, &first, &second);
    _mm512_mask_storeu_epi16(dst + i, static_cast<__mmask32>(m), first);
    _mm512_mask_storeu_epi16(dst + i + 32, static_cast<__mmask32>(m >> 32), second);
  }
}

void fp8_e4m3_to_f32_avx512vbmi(const uint8_t* src, float* dst, int64_t n) {
  const fp8_vbmi::Tables t = fp8_vbmi::make_tables();
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += kStep) dequant_step(t, src + i, n - i < kStep ? n - i : kStep, one, dst + i);
}

void fp8_dequant_f32_avx512vbmi(const uint8_t* q, const float* block_scales, int64_t n,
                                int64_t block_k, float* dst) {
  const fp8_vbmi::Tables t = fp8_vbmi::make_tables();
  for (int64_t begin = 0, b = 0; begin < n; begin += block_k, ++b) {
    const int64_t end = begin + block_k < n ? begin + block_k : n;
    const __m512 scale = _mm512_set1_ps(block_scales[b]);
    for (int64_t i = begin; i < end; i += kStep)
      dequant_step(t, q + i, end - i < kStep ? end - i : kStep, scale, dst + i);
  }
}

}  // namespace moekit
