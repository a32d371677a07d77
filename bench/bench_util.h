// Shared benchmark helpers: random inputs and the machine's streaming-read ceiling, measured
// in the same process as the kernels so that ratios compare like with like.
#ifndef MOEKIT_BENCH_BENCH_UTIL_H_
#define MOEKIT_BENCH_BENCH_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "moekit/moekit.h"

namespace moekit_bench {

std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f);
std::vector<uint16_t> random_bf16(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f);

// Streaming-read bandwidth (bytes/s) of a buffer much larger than the last-level cache, read
// by `threads` OpenMP threads. Measured on first use per thread count and cached. The
// benchmark BM_StreamingRead reports the same figure beside the kernels.
double streaming_read_bandwidth(int threads);
// The same, measured now (best of 3 passes, not cached): on a shared machine whose bandwidth
// drifts within minutes, a row compared against this reading taken right after its own timing
// compares like with like in time as well.
double streaming_read_bandwidth_now(int threads);

// Bytes the bandwidth probe reads per pass (at least 4x the last-level cache).
size_t streaming_buffer_bytes();

// Register-peak FLOP/s of `level`'s matrix instruction (MOEKIT_ISA_AMX: TDPBF16PS on loaded
// tiles; MOEKIT_ISA_AVX512_BF16: VDPBF16PS on registers; MOEKIT_ISA_AVX512: f32 FMA on
// registers) on `threads` OpenMP threads, the best
// of a few passes; measured on first use per (level, threads) and cached, like the bandwidth
// above. 0 for other levels and on CPUs without that level (MOEKIT_ISA does not cap it).
double register_peak_flops(moekit_isa level, int threads);
// The same, measured now (best of 3 passes, not cached).
double register_peak_flops_now(moekit_isa level, int threads);

// FLOP/s of the AMX kernels' 2 x 2 tile step (amx_tile_loop in amx_peak.h) on `threads` OpenMP
// threads, each on its own operands of k_blocks blocks of K (4 KiB per block: 8 stay in L1,
// 96 in L2), measured now (best of 3 passes, not cached); 0 on CPUs without AMX. With
// loads_per_block 4 and operands in L1 it is the fastest a kernel built on this step runs.
double amx_tile_loop_flops(int threads, int64_t k_blocks, int loads_per_block = 4);

}  // namespace moekit_bench

#endif  // MOEKIT_BENCH_BENCH_UTIL_H_
