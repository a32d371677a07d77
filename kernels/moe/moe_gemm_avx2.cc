// Fused-MoE microkernels for AVX2 + FMA: f32 FMA over f32 weights, or over bf16 weights widened
// to f32 (see moe_gemm_fma-inl.h). With 16 ymm registers the tiles are small: gate_up 2 rows x
// 16 columns of gate and of up (8 accumulators), down 2 rows x 32 columns (8 accumulators).
#include <immintrin.h>

#include "kernels/moe/moe_gemm_fma-inl.h"

namespace moekit {
namespace {

// e^x with a degree-6 polynomial after range reduction (relative error about 2e-7).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n by building the exponent field; n is in [-126, 127] after the clamp.
  const __m256i scale =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// Mask of lanes [0, n) of 8.
inline __m256i lanes(int64_t n) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n)), index);
}

struct Avx2 {
  using F = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kUpRows = 2, kUpPanels = 1, kDownRows = 2, kDownPanels = 2;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void widen(const uint16_t* pairs, F* even, F* odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd =
        _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F silu_mul(F gate, F up) {
    const F e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gate));
    return _mm256_mul_ps(_mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), up);
  }
  static void store(float* dst, F v, int64_t n) {
    if (n >= kLanes)
      _mm256_storeu_ps(dst, v);
    else if (n > 0)
      _mm256_maskstore_ps(dst, lanes(n), v);
  }
  static void add_scaled(float* dst, float w, F v, int64_t n) {
    if (n >= kLanes) {
      _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_set1_ps(w), v, _mm256_loadu_ps(dst)));
    } else if (n > 0) {
      const __m256i mask = lanes(n);
      const F prev = _mm256_maskload_ps(dst, mask);
      _mm256_maskstore_ps(dst, mask, _mm256_fmadd_ps(_mm256_set1_ps(w), v, prev));
    }
  }
};

}  // namespace

const MoeMicrokernel& moe_microkernel_bf16_avx2() {
  static const MoeMicrokernel uk = fma_kernels::make<Avx2, MOEKIT_BF16>("fused_moe_bf16_avx2_vnni");
  return uk;
}

const MoeMicrokernel& moe_microkernel_f32_avx2() {
  static const MoeMicrokernel uk = fma_kernels::make<Avx2, MOEKIT_F32>("fused_moe_f32_avx2_vnni");
  return uk;
}

}  // namespace moekit
