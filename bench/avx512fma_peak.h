// The AVX-512 f32 FMA register peak: VFMADD on registers, no memory traffic. Compiled with the
// avx512 flags (bench/CMakeLists.txt); call only when the effective level is at least avx512.
#ifndef MOEKIT_BENCH_AVX512FMA_PEAK_H_
#define MOEKIT_BENCH_AVX512FMA_PEAK_H_

#include <cstdint>

namespace moekit_bench {

// Runs `iterations` rounds of 24 independent 16-lane f32 FMAs on the calling thread and returns
// the floating-point operations done (32 per instruction: 16 lanes, multiply + add).
double avx512fma_peak_loop(int64_t iterations);

}  // namespace moekit_bench

#endif  // MOEKIT_BENCH_AVX512FMA_PEAK_H_
