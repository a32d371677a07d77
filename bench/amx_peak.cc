// AMX-BF16 register peak loop (see amx_peak.h). Six accumulators C0..C5 against one A tile (6)
// and one B tile (7): six independent dependency chains hide the TDPBF16PS latency, so the loop
// runs at the instruction's throughput.
#include "bench/amx_peak.h"

#include <immintrin.h>

#include <cstdint>

#include "kernels/moe/moe_amx.h"

namespace moekit_bench {

double amx_bf16_peak_loop(int64_t iterations) {
  constexpr double kFlopsPerTile = 2.0 * 16 * 16 * 32;
  constexpr int kChains = 6;
  // The values do not matter (zeros keep the accumulators finite).
  alignas(64) static const uint16_t kZeros[16 * 32] = {};
  // Palette 1, all tiles 16 rows x 64 bytes.
  moekit::amx_tile_configure();
  _tile_loadd(6, kZeros, 64);
  _tile_loadd(7, kZeros, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  for (int64_t i = 0; i < iterations; ++i) {
    _tile_dpbf16ps(0, 6, 7);
    _tile_dpbf16ps(1, 6, 7);
    _tile_dpbf16ps(2, 6, 7);
    _tile_dpbf16ps(3, 6, 7);
    _tile_dpbf16ps(4, 6, 7);
    _tile_dpbf16ps(5, 6, 7);
  }
  moekit::amx_tile_release();
  return kFlopsPerTile * kChains * static_cast<double>(iterations);
}

namespace {

// kLoads tile loads per K block: 4 is the GEMM step; 3 loads the second A tile (rows 16-31)
// once per pass and 2 the second B tile too, which keeps the four products per block but is no
// longer a GEMM: what the step gains when it loads less is what its loads cost.
template <int kLoads>
double tile_loop(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t k_blocks,
                 int64_t repeats) {
  moekit::amx_tile_configure();
  const long a_bytes = static_cast<long>(lda) * 2;
  const uint16_t* a1 = a + 16 * lda;
  const uint16_t* b1 = b + k_blocks * 512;
  alignas(64) static thread_local float c[16 * 16];
  for (int64_t r = 0; r < repeats; ++r) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if constexpr (kLoads < 4) _tile_loadd(5, a1, a_bytes);
    if constexpr (kLoads < 3) _tile_loadd(7, b1, 64);
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      _tile_loadd(4, a + kb * 32, a_bytes);
      _tile_loadd(6, b + kb * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (kLoads >= 3) _tile_loadd(7, b1 + kb * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (kLoads >= 4) _tile_loadd(5, a1 + kb * 32, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, 64);  // one result leaves the tiles, so the loop cannot be dropped
  }
  moekit::amx_tile_release();
  return 4.0 * 2 * 16 * 16 * 32 * static_cast<double>(k_blocks * repeats);
}

}  // namespace

double amx_tile_loop(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t k_blocks,
                     int64_t repeats, int loads_per_block) {
  switch (loads_per_block) {
    case 2:
      return tile_loop<2>(a, lda, b, k_blocks, repeats);
    case 3:
      return tile_loop<3>(a, lda, b, k_blocks, repeats);
    default:
      return tile_loop<4>(a, lda, b, k_blocks, repeats);
  }
}

}  // namespace moekit_bench
