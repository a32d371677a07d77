// AVX-512 helpers shared by the fused-MoE microkernels compiled for AVX-512 (include only from
// translation units built with the avx512, avx512_bf16 or amx flags): exp, SiLU, bf16
// widening and masked stores.
#ifndef MOEKIT_KERNELS_MOE_MOE_SIMD_AVX512_INL_H_
#define MOEKIT_KERNELS_MOE_MOE_SIMD_AVX512_INL_H_

#include <immintrin.h>

#include <cstdint>

namespace moekit {
// Internal linkage: each translation unit that includes this is compiled with its own ISA
// flags, and must not share (ODR-merge) these functions with another.
namespace {
namespace avx512 {

// e^x with a degree-6 polynomial on [-ln2/2, ln2/2] (relative error about 2e-7); inputs are
// clamped to the finite range of the result.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// silu(gate) * up = gate / (1 + e^-gate) * up; NaN in gate stays NaN.
inline __m512 silu_mul(__m512 gate, __m512 up) {
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate));
  return _mm512_mul_ps(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), up);
}

// Lanes [0, n) of 16 (none when n <= 0).
inline __mmask16 lanes(int64_t n) {
  if (n <= 0) return 0;
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// 16 bf16 -> 16 f32, exactly (a bf16 is the high half of an f32).
inline __m512 bf16x16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 16 bf16 pairs {x[2i], x[2i+1]} (one row of a VNNI panel) -> the even and the odd values as
// 16 f32 each, exactly.
inline void bf16_pairs_to_f32(__m512i pairs, __m512* even, __m512* odd) {
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  *odd = _mm512_castsi512_ps(
      _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Round to nearest even as f32_to_bf16 does (NaN quieted), 16 lanes.
inline __m256i to_bf16_rne(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// Stores lanes [0, n) of v as bf16 (RNE) or f32 at dst.
inline void store_act(void* dst, bool bf16, __m512 v, int64_t n) {
  if (bf16)
    _mm256_mask_storeu_epi16(dst, lanes(n), to_bf16_rne(v));
  else
    _mm512_mask_storeu_ps(dst, lanes(n), v);
}

}  // namespace avx512
}  // namespace
}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_MOE_SIMD_AVX512_INL_H_
