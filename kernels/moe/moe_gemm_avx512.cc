// Fused-MoE microkernels for AVX-512 without BF16 instructions: f32 FMA over f32 weights, or
// over bf16 weights widened to f32 (see moe_gemm_fma-inl.h). Tiles: gate_up 4 rows x 32
// columns of gate and of up (16 zmm accumulators), down 4 rows x 64 columns (16 zmm).
#include <immintrin.h>

// GCC 12 reports the deliberately undefined inputs inside its own AVX-512 intrinsics headers
// (_mm512_undefined_*) as uninitialized at -O3 (a false positive); silence it for this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "kernels/moe/moe_gemm_fma-inl.h"
#include "kernels/moe/moe_simd_avx512-inl.h"

namespace moekit {
namespace {

struct Avx512 {
  using F = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kUpRows = 6, kUpPanels = 2, kDownRows = 6, kDownPanels = 4;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void widen(const uint16_t* pairs, F* even, F* odd) {
    avx512::bf16_pairs_to_f32(_mm512_loadu_si512(pairs), even, odd);
  }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F silu_mul(F gate, F up) { return avx512::silu_mul(gate, up); }
  static void store(float* dst, F v, int64_t n) { _mm512_mask_storeu_ps(dst, avx512::lanes(n), v); }
  static void add_scaled(float* dst, float w, F v, int64_t n) {
    const __mmask16 mask = avx512::lanes(n);
    const F prev = _mm512_maskz_loadu_ps(mask, dst);
    _mm512_mask_storeu_ps(dst, mask, _mm512_fmadd_ps(_mm512_set1_ps(w), v, prev));
  }
};

}  // namespace

const MoeMicrokernel& moe_microkernel_bf16_avx512() {
  static const MoeMicrokernel uk =
      fma_kernels::make<Avx512, MOEKIT_BF16>("fused_moe_bf16_avx512_vnni");
  return uk;
}

const MoeMicrokernel& moe_microkernel_f32_avx512() {
  static const MoeMicrokernel uk =
      fma_kernels::make<Avx512, MOEKIT_F32>("fused_moe_f32_avx512_vnni");
  return uk;
}

}  // namespace moekit
