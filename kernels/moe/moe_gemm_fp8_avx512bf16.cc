// Fused-MoE microkernels for FP8 weights on AVX-512-BF16: bf16 activations x FP8 VNNI weights
// (fp8_vnni.h) -> f32 with _mm512_dpbf16_ps.
//
// NOTE: per call, for each K block of the weights' block scales (block_k values, e.g. 128):
//   1. the tile's panels for that block are converted fp8 -> bf16 once (exact, unscaled) into a
//      small buffer (L1-resident: 4 panels x 64 pairs x 64 bytes = 16 KiB per matrix);
//   2. every row group of the call (MR rows x NP panels of accumulators, gate and up together)
//      runs its dot products over the block from that buffer into zeroed f32 registers;
//   3. each partial sum is multiplied by its panel's scale for the block and added to an f32
//      accumulator row in memory: acc += partial * scale.
// So each weight byte is read from memory once per call and converted once, whatever the row
// count, and the scale costs one FMA per 16 outputs per block. The epilogue applies
// silu(gate) * up (rounded to bf16, RNE) or adds row_weight * dot into the output rows.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/moe/fp8_convert_avx512.h"
#include "kernels/moe/fp8_vnni.h"
#include "reference/numeric.h"

namespace moekit {
namespace {

constexpr int kMaxPanels = 4;  // tile width: 64 columns
constexpr int kUpRows = 3;     // gate_up register tile: 3 rows x 4 panels x (gate, up) = 24 zmm
constexpr int kDownRows = 6;   // down register tile: 6 rows x 4 panels = 24 zmm
constexpr int64_t kPairBytes = 2 * kMoePanelN;  // fp8 bytes of one K pair of a panel
constexpr int64_t kTileN = kMaxPanels * kMoePanelN;

using PairRange = Fp8PairRange;

// Converts pairs [kk0, kk1) of `panels` panels of `tile` to bf16: buf[p][kk - kk0][32].
void convert_block(const unsigned char* tile, int64_t panel_bytes, size_t header_bytes,
                   int panels, PairRange r, uint16_t* buf) {
  const __m512i table = fp8_avx512::subnormal_table();
  const int64_t pairs = r.kk1 - r.kk0;
  for (int p = 0; p < panels; ++p) {
    const uint8_t* src = tile + p * panel_bytes + header_bytes + r.kk0 * kPairBytes;
    uint16_t* dst = buf + p * pairs * kPairBytes;
    for (int64_t j = 0; j < pairs; ++j)
      _mm512_store_si512(dst + j * kPairBytes,
                         fp8_avx512::to_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j * kPairBytes)), table));
  }
}

inline __m512bh pair_at(const uint16_t* x, int64_t kk) {
  int32_t word;
  std::memcpy(&word, x + 2 * kk, sizeof word);
  return (__m512bh)_mm512_set1_epi32(word);
}
// {x[K-1], 0}: the last pair of an odd K, never reading past the row.
inline __m512bh last_pair(const uint16_t* x, int64_t K) {
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[K - 1]));
}

// One K block for MR rows x NP panels of NM matrices (2: gate and up; 1: down).
// x[r]: bf16 rows; buf[m]: the converted block of matrix m; acc[m] + r * kTileN + 16p: the f32
// accumulators; scale[m][p]: the block's scale of panel p of matrix m.
template <int MR, int NP, int NM>
void block_tile(const uint16_t* const* x, int64_t K, PairRange range, const uint16_t* const* buf,
                const float (*scale)[kMaxPanels], float* const* acc) {
  __m512 s[NM][MR][NP];
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < NP; ++p) s[m][r][p] = _mm512_setzero_ps();
  const int64_t pairs = range.kk1 - range.kk0;
  const auto step = [&](int64_t kk, const __m512bh* av) {
    const int64_t j = kk - range.kk0;
    for (int m = 0; m < NM; ++m)
      for (int p = 0; p < NP; ++p) {
        const __m512bh w = (__m512bh)_mm512_load_si512(buf[m] + (p * pairs + j) * kPairBytes);
        for (int r = 0; r < MR; ++r) s[m][r][p] = _mm512_dpbf16_ps(s[m][r][p], av[r], w);
      }
  };
  const int64_t full_end = std::min(range.kk1, K / 2);  // pairs with both values inside K
  __m512bh av[MR];
  for (int64_t kk = range.kk0; kk < full_end; ++kk) {
    for (int r = 0; r < MR; ++r) av[r] = pair_at(x[r], kk);
    step(kk, av);
  }
  if (full_end < range.kk1) {  // odd K
    for (int r = 0; r < MR; ++r) av[r] = last_pair(x[r], K);
    step(full_end, av);
  }
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < NP; ++p) {
        float* a = acc[m] + r * kTileN + p * kMoePanelN;
        _mm512_store_ps(a, _mm512_fmadd_ps(s[m][r][p], _mm512_set1_ps(scale[m][p]), _mm512_load_ps(a)));
      }
}

using BlockTileFn = void (*)(const uint16_t* const*, int64_t, PairRange, const uint16_t* const*,
                             const float (*)[kMaxPanels], float* const*);

template <int NM, int MR>
constexpr BlockTileFn pick(int np) {
  return np == 1 ? block_tile<MR, 1, NM> : np == 2 ? block_tile<MR, 2, NM>
         : np == 3 ? block_tile<MR, 3, NM> : block_tile<MR, 4, NM>;
}
template <int NM>
BlockTileFn pick_tile(int mr, int np) {
  switch (mr) {
    case 1: return pick<NM, 1>(np);
    case 2: return pick<NM, 2>(np);
    case 3: return pick<NM, 3>(np);
    case 4: return pick<NM, 4>(np);
    case 5: return pick<NM, 5>(np);
    default: return pick<NM, 6>(np);
  }
}

// Runs every K block of NM matrices (first panels tiles[m]) over the rows x[0..rows), leaving
// the scaled sums in acc[m] (rows x kTileN f32 each).
template <int NM, int kMaxRows>
void reduce_all_blocks(const uint16_t* const* x, int64_t rows, int64_t K,
                       const void* const* tiles, int np, float* const* acc) {
  const Fp8PanelHeader& h = fp8_panel_header(tiles[0]);
  const int64_t block_k = h.block_k, panel_bytes = h.panel_bytes;
  const size_t header_bytes = fp8_panel_header_bytes(K, block_k);
  const int64_t max_pairs = std::min<int64_t>(block_k / 2, vnni_padded_k(K) / 2);
  uint16_t* bufs[NM];
  uint16_t* block = reinterpret_cast<uint16_t*>(fp8_thread_buffer(
      0, static_cast<size_t>(NM * kMaxPanels * max_pairs * kPairBytes) * sizeof(uint16_t)));
  for (int m = 0; m < NM; ++m) bufs[m] = block + m * kMaxPanels * max_pairs * kPairBytes;
  for (int m = 0; m < NM; ++m) std::memset(acc[m], 0, static_cast<size_t>(rows * kTileN) * 4);
  for (int64_t kb = 0; kb < h.num_kb; ++kb) {
    const PairRange range = fp8_block_pairs(kb, block_k, K);
    float scale[NM][kMaxPanels];
    for (int m = 0; m < NM; ++m) {
      const auto* tile = static_cast<const unsigned char*>(tiles[m]);
      convert_block(tile, panel_bytes, header_bytes, np, range, bufs[m]);
      for (int p = 0; p < np; ++p) scale[m][p] = fp8_panel_scales(tile + p * panel_bytes)[kb];
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
      float* acc_rows[NM];
      for (int m = 0; m < NM; ++m) acc_rows[m] = acc[m] + r0 * kTileN;
      pick_tile<NM>(mr, np)(x + r0, K, range, bufs, scale, acc_rows);
    }
  }
}

// Row pointers for `rows` rows and, 64-byte aligned after them, `matrices` accumulator blocks
// of rows x kTileN f32.
const uint16_t** row_buffers(int64_t rows, int matrices, float** acc) {
  const size_t pointer_bytes = (static_cast<size_t>(rows) * sizeof(void*) + 63) / 64 * 64;
  unsigned char* p = fp8_thread_buffer(
      1, pointer_bytes + static_cast<size_t>(matrices * rows * kTileN) * sizeof(float));
  *acc = reinterpret_cast<float*>(p + pointer_bytes);
  return reinterpret_cast<const uint16_t**>(p);
}

void gate_up(const MoeGateUpCall& call) {
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  float* acc_base;
  const uint16_t** x = row_buffers(call.m, 2, &acc_base);
  for (int64_t r = 0; r < call.m; ++r) x[r] = static_cast<const uint16_t*>(call.a) + call.a_rows[r] * call.lda;
  float* acc[2] = {acc_base, acc_base + call.m * kTileN};
  const void* tiles[2] = {call.w1, call.w3};
  reduce_all_blocks<2, kUpRows>(x, call.m, call.K, tiles, np, acc);
  for (int64_t r = 0; r < call.m; ++r) {
    uint16_t* out = static_cast<uint16_t*>(call.act) + r * call.ld_act;
    const float* g = acc[0] + r * kTileN;
    const float* u = acc[1] + r * kTileN;
    for (int64_t c = 0; c < call.n; ++c) out[c] = f32_to_bf16(g[c] / (1.0f + std::exp(-g[c])) * u[c]);
  }
}

void down(const MoeDownCall& call) {
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  float* acc;
  const uint16_t** x = row_buffers(call.m, 1, &acc);
  for (int64_t r = 0; r < call.m; ++r) x[r] = static_cast<const uint16_t*>(call.act) + r * call.ld_act;
  const void* tiles[1] = {call.w2};
  reduce_all_blocks<1, kDownRows>(x, call.m, call.K, tiles, np, &acc);
  for (int64_t r = 0; r < call.m; ++r) {  // in row order: rows may share a token
    float* out = call.out + call.out_rows[r] * call.ld_out;
    const float* d = acc + r * kTileN;
    for (int64_t c = 0; c < call.n; ++c) out[c] += call.row_weight[r] * d[c];
  }
}

}  // namespace

const MoeMicrokernel& moe_microkernel_fp8_avx512bf16() {
  static const MoeMicrokernel uk = [] {
    MoeMicrokernel k{};
    k.name = "fused_moe_fp8_avx512bf16_vnni";
    k.weight_dtype = MOEKIT_FP8_E4M3;
    k.layout = MOEKIT_LAYOUT_VNNI;
    k.a_dtype = MOEKIT_BF16;
    k.pad_a = false;
    k.block_m = 64;
    k.gate_up_n = kTileN;
    k.down_n = kTileN;
    k.weight_tile = fp8_vnni_weight_tile;
    k.gate_up = gate_up;
    k.down = down;
    return k;
  }();
  return uk;
}

}  // namespace moekit
