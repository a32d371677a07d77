// Shared benchmark helpers: random inputs and the machine's streaming-read ceiling, measured
// in the same process as the kernels so that ratios compare like with like.
#ifndef MOEKIT_BENCH_BENCH_UTIL_H_
#define MOEKIT_BENCH_BENCH_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moekit_bench {

std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f);
std::vector<uint16_t> random_bf16(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f);

// Streaming-read bandwidth (bytes/s) of a buffer much larger than the last-level cache, read
// by `threads` OpenMP threads. Measured on first use per thread count and cached. The
// benchmark BM_StreamingRead reports the same figure beside the kernels.
double streaming_read_bandwidth(int threads);

// Bytes the bandwidth probe reads per pass (at least 4x the last-level cache).
size_t streaming_buffer_bytes();

}  // namespace moekit_bench

#endif  // MOEKIT_BENCH_BENCH_UTIL_H_
