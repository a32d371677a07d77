// The AMX-BF16 register peak: TDPBF16PS on tiles already loaded, no memory traffic. Compiled
// with the amx flags (bench/CMakeLists.txt); call only when moekit_detected_isa() is amx.
#ifndef MOEKIT_BENCH_AMX_PEAK_H_
#define MOEKIT_BENCH_AMX_PEAK_H_

#include <cstdint>

namespace moekit_bench {

// Runs `iterations` rounds of six independent 16x16x32 TDPBF16PS on the calling thread
// (configuring and releasing its tiles) and returns the floating-point operations done.
double amx_bf16_peak_loop(int64_t iterations);

// The fused-MoE kernels' inner loop on its own: `repeats` times one 32 x 32 output step (2 x 2
// accumulator tiles) over k_blocks blocks of 32 K values, A 32 bf16 rows at stride lda elements,
// B two column tiles of k_blocks 1 KiB tiles each, one after the other. Returns the
// floating-point operations done. How fast it runs against amx_bf16_peak_loop, as the operands'
// footprint grows past L1 and L2, is the ceiling of any kernel built on this step; with eight
// tile registers, 2 x 2 accumulators are the fewest loads per product a GEMM can have (one).
// loads_per_block 4 is that step; 3 or 2 load the second A tile, or it and the second B tile,
// only once per pass (no longer a GEMM): the difference is what the tile loads cost.
double amx_tile_loop(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t k_blocks,
                     int64_t repeats, int loads_per_block = 4);

}  // namespace moekit_bench

#endif  // MOEKIT_BENCH_AMX_PEAK_H_
