// AVX-512 f32 FMA register peak loop (see avx512fma_peak.h). Two FMA ports with a latency of
// four cycles need eight chains in flight; 24 leave margin (12 measured a third below the peak
// on a Sapphire Rapids-class core).
// GCC 12 reports the undefined placeholders inside its own AVX-512 intrinsics as uninitialized
// once inlined (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "bench/avx512fma_peak.h"

#include <immintrin.h>

#include <cstdint>

namespace moekit_bench {

double avx512fma_peak_loop(int64_t iterations) {
  constexpr int kChains = 24;
  constexpr double kFlopsPerInstruction = 2.0 * 16;  // 16 lanes, multiply + add
  __m512 c[kChains];
  // Distinct starting values hidden from the compiler, so that it cannot merge equal chains.
#pragma GCC unroll 24
  for (int i = 0; i < kChains; ++i) {
    c[i] = _mm512_set1_ps(static_cast<float>(i));
    asm volatile("" : "+v"(c[i]));
  }
  // Values near 1 keep the sums finite; the opaque asm stops the compiler from folding them.
  __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.001f);
  asm volatile("" : "+v"(a), "+v"(b));
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) c[i] = _mm512_fmadd_ps(c[i], a, b);
  }
  __m512 sum = c[0];
#pragma GCC unroll 24
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, c[i]);
  volatile float sink = _mm512_reduce_add_ps(sum);  // keeps the loop
  (void)sink;
  return kFlopsPerInstruction * kChains * static_cast<double>(iterations);
}

}  // namespace moekit_bench
