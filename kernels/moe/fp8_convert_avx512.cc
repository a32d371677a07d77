// AVX-512 FP8 converters (see fp8_convert_avx512.h for the method). Tails use masked loads and
// stores, so no byte past the end is read or written.
#include "kernels/moe/fp8_convert_avx512.h"

namespace moekit {

namespace {

constexpr int64_t kStep = 32;  // e4m3 bytes per conversion

__mmask32 tail_mask(int64_t count) { return count >= 32 ? ~0u : (1u << count) - 1u; }
__mmask16 low_mask16(__mmask32 m) { return static_cast<__mmask16>(m); }
__mmask16 high_mask16(__mmask32 m) { return static_cast<__mmask16>(m >> 16); }

// Converts and scales q[0, count) (count <= 32) into dst.
inline void dequant_step(const uint8_t* q, int64_t count, __m512i table, __m512 scale,
                         float* dst) {
  __m512 lo, hi;
  if (count == kStep) {
    fp8_avx512::to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), table, &lo, &hi);
    _mm512_storeu_ps(dst, _mm512_mul_ps(lo, scale));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(hi, scale));
    return;
  }
  const __mmask32 m = tail_mask(count);
  fp8_avx512::to_f32(_mm256_maskz_loadu_epi8(m, q), table, &lo, &hi);
  _mm512_mask_storeu_ps(dst, low_mask16(m), _mm512_mul_ps(lo, scale));
  _mm512_mask_storeu_ps(dst + 16, high_mask16(m), _mm512_mul_ps(hi, scale));
}

}  // namespace

void fp8_e4m3_to_bf16_avx512(const uint8_t* src, uint16_t* dst, int64_t n) {
  const __m512i table = fp8_avx512::subnormal_table();
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep)
    _mm512_storeu_si512(dst + i, fp8_avx512::to_bf16(
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), table));
  if (i < n) {
    const __mmask32 m = tail_mask(n - i);
    _mm512_mask_storeu_epi16(dst + i, m,
                             fp8_avx512::to_bf16(_mm256_maskz_loadu_epi8(m, src + i), table));
  }
}

void fp8_e4m3_to_f32_avx512(const uint8_t* src, float* dst, int64_t n) {
  const __m512i table = fp8_avx512::subnormal_table();
  const __m512 one = _mm512_set1_ps(1.0f);  // exact: x * 1 == x, NaN stays NaN
  for (int64_t i = 0; i < n; i += kStep) dequant_step(src + i, n - i < kStep ? n - i : kStep, table, one, dst + i);
}

void fp8_dequant_f32_avx512(const uint8_t* q, const float* block_scales, int64_t n,
                            int64_t block_k, float* dst) {
  const __m512i table = fp8_avx512::subnormal_table();
  for (int64_t begin = 0, b = 0; begin < n; begin += block_k, ++b) {
    const int64_t end = begin + block_k < n ? begin + block_k : n;
    const __m512 scale = _mm512_set1_ps(block_scales[b]);
    for (int64_t i = begin; i < end; i += kStep)
      dequant_step(q + i, end - i < kStep ? end - i : kStep, table, scale, dst + i);
  }
}

}  // namespace moekit
