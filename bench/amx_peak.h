// The AMX-BF16 register peak: TDPBF16PS on tiles already loaded, no memory traffic. Compiled
// with the amx flags (bench/CMakeLists.txt); call only when moekit_detected_isa() is amx.
#ifndef MOEKIT_BENCH_AMX_PEAK_H_
#define MOEKIT_BENCH_AMX_PEAK_H_

#include <cstdint>

namespace moekit_bench {

// Runs `iterations` rounds of six independent 16x16x32 TDPBF16PS on the calling thread
// (configuring and releasing its tiles) and returns the floating-point operations done.
double amx_bf16_peak_loop(int64_t iterations);

}  // namespace moekit_bench

#endif  // MOEKIT_BENCH_AMX_PEAK_H_
