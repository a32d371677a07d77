// The AVX-512-BF16 register peak: VDPBF16PS on registers, no memory traffic. Compiled with the
// avx512_bf16 flags (bench/CMakeLists.txt); call only when the effective level is at least
// avx512_bf16.
#ifndef MOEKIT_BENCH_AVX512BF16_PEAK_H_
#define MOEKIT_BENCH_AVX512BF16_PEAK_H_

#include <cstdint>

namespace moekit_bench {

// Runs `iterations` rounds of twelve independent 16-lane VDPBF16PS on the calling thread and
// returns the floating-point operations done (64 per instruction: 16 lanes x 2 products).
double avx512bf16_peak_loop(int64_t iterations);

}  // namespace moekit_bench

#endif  // MOEKIT_BENCH_AVX512BF16_PEAK_H_
