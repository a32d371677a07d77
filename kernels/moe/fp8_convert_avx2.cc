// AVX2 + F16C FP8 converters (see fp8_convert_avx2.h for the method).
#include <cstring>

#include "kernels/moe/fp8_convert_avx2.h"

namespace moekit {

namespace {
constexpr int64_t kStep = 16;  // e4m3 bytes per conversion
}  // namespace

void fp8_e4m3_to_bf16_avx2(const uint8_t* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        fp8_avx2::to_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  if (i < n) {
    alignas(32) uint8_t in[kStep] = {};
    alignas(32) uint16_t out[kStep];
    std::memcpy(in, src + i, static_cast<size_t>(n - i));
    _mm256_store_si256(reinterpret_cast<__m256i*>(out),
                       fp8_avx2::to_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(in))));
    std::memcpy(dst + i, out, static_cast<size_t>(n - i) * sizeof(uint16_t));
  }
}

void fp8_e4m3_to_f32_avx2(const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  __m256 lo, hi;
  for (; i + kStep <= n; i += kStep) {
    fp8_avx2::to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), &lo, &hi);
    _mm256_storeu_ps(dst + i, lo);
    _mm256_storeu_ps(dst + i + 8, hi);
  }
  if (i < n) {
    alignas(32) uint8_t in[kStep] = {};
    alignas(32) float out[kStep];
    std::memcpy(in, src + i, static_cast<size_t>(n - i));
    fp8_avx2::to_f32(_mm_load_si128(reinterpret_cast<const __m128i*>(in)), &lo, &hi);
    _mm256_store_ps(out, lo);
    _mm256_store_ps(out + 8, hi);
    std::memcpy(dst + i, out, static_cast<size_t>(n - i) * sizeof(float));
  }
}

void fp8_dequant_f32_avx2(const uint8_t* q, const float* block_scales, int64_t n,
                          int64_t block_k, float* dst) {
  for (int64_t begin = 0, b = 0; begin < n; begin += block_k, ++b) {
    const int64_t end = begin + block_k < n ? begin + block_k : n;
    const __m256 scale = _mm256_set1_ps(block_scales[b]);
    int64_t i = begin;
    __m256 lo, hi;
    for (; i + kStep <= end; i += kStep) {
      fp8_avx2::to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)), &lo, &hi);
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(lo, scale));
      _mm256_storeu_ps(dst + i + 8, _mm256_mul_ps(hi, scale));
    }
    if (i < end) {
      alignas(32) uint8_t in[kStep] = {};
      alignas(32) float out[kStep];
      std::memcpy(in, q + i, static_cast<size_t>(end - i));
      fp8_avx2::to_f32(_mm_load_si128(reinterpret_cast<const __m128i*>(in)), &lo, &hi);
      _mm256_store_ps(out, _mm256_mul_ps(lo, scale));
      _mm256_store_ps(out + 8, _mm256_mul_ps(hi, scale));
      std::memcpy(dst + i, out, static_cast<size_t>(end - i) * sizeof(float));
    }
  }
}

}  // namespace moekit
