// Fused-MoE microkernels for FP8 weights with AMX-BF16, for segments of several rows;
// segments of fewer than amx_min_rows() / 4 rows go to the AVX-512 VBMI microkernel (a tile
// pass costs the same for 1 row as for 16).
//
// NOTE: per call and per K block of the block scales (block_k a multiple of 32):
//   1. the tile's panels for the block are converted fp8 -> bf16 once (VBMI tables, exact,
//      unscaled) into a buffer; in the FP8 VNNI order each 16 K pairs of a panel are exactly
//      one AMX B tile (16 rows of 16 columns x 2 bf16);
//   2. for each step of 32 rows x 32 columns: four f32 C tiles are zeroed, the block's
//      TDPBF16PS products are accumulated (A tiles loaded in place from the sorted rows), and the
//      C tiles are stored to a small scratch from which AVX-512 adds them times the panels'
//      scales into the f32 accumulator rows (acc += C * scale).
// From kPrescaleRows rows per call (prefill), the per-block epilogue of step 2 would cost about
// half as much as the tile products, so the whole K of the tile is instead dequantized once
// with its scales, rounded to bf16 (RNE; the rounding a bf16 copy of the weights has), and the
// tiles accumulate all of K before one epilogue.
// The epilogue (silu(gate) * up to bf16, or row_weight * dot into the output rows) is the one
// of the AVX-512 kernels. Tiles: palette 1, eight tiles of 16 rows x 64 bytes (the AMX
// configuration of moe_amx.h): 0..3 C, 4..5 A, 6..7 B.
#include "kernels/moe/fp8_convert_avx512vbmi.h"
#include "kernels/moe/fp8_moe_avx512.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_simd_avx512-inl.h"

// GCC 12 reports its own intrinsics' _mm512_undefined_* placeholders as "maybe uninitialized"
// once inlined (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moekit {
namespace {

using fp8_moe::kMaxPanels;
using fp8_moe::kPairBytes;
using fp8_moe::kTileN;

constexpr int64_t kTilePairs = 16;  // K pairs of one B tile
constexpr int64_t kStepRows = 2 * kAmxTileM;
constexpr long kTileRowBytes = 64;
// From this many rows per call the weights are dequantized with their block scales into bf16
// (one rounding per weight, as a bf16 checkpoint has) and the tiles run all of K at once; below
// it, every K block's sums are scaled in f32 (exact weights, one epilogue per block).
constexpr int64_t kPrescaleRows = 64;
// Segments of up to 256 rows dequantize each expert's weights once per call at M = 4096 (128
// rows per expert on average; bench_moe_fp8 on a 16-thread AMX machine: 0.72-0.79 of bf16's
// speed against 0.68 with 128-row segments).
constexpr int64_t kAmxFp8BlockM = 256;

// tileloadd is not known to read memory; keep earlier stores to its buffers in place.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

// AMX reduction of NM matrices over `rows` rows of bf16 A (row stride lda elements, K columns
// zero-padded to a multiple of 32, amx_padded_m(rows) rows readable), adding the scaled block
// sums into acc[m] (rows x kTileN f32, zeroed here).
template <int NM>
void amx_reduce(const uint16_t* a, int64_t lda, int64_t rows, int64_t K, const void* const* tiles,
                int np, float* const* acc) {
  const Fp8PanelHeader& h = fp8_panel_header(tiles[0]);
  const int64_t block_k = h.block_k, panel_bytes = h.panel_bytes;
  const size_t header_bytes = fp8_panel_header_bytes(K, block_k);
  const int64_t block_pairs = block_k / 2;  // a multiple of 16 (supports)
  // Many rows: the weights are dequantized with their scales (rounded to bf16) for the whole K
  // once, and the tiles accumulate all of K before a single epilogue (see the NOTE).
  const bool prescale = rows >= kPrescaleRows;
  const int64_t buffer_pairs = prescale ? vnni_padded_k(K) / 2 : block_pairs;
  auto* buffer = reinterpret_cast<uint16_t*>(fp8_thread_buffer(
      0, static_cast<size_t>(NM * kMaxPanels * buffer_pairs * kPairBytes) * sizeof(uint16_t)));
  for (int m = 0; m < NM; ++m) std::memset(acc[m], 0, static_cast<size_t>(rows * kTileN) * 4);
  const fp8_vbmi::Tables tables = fp8_vbmi::make_tables();
  const long a_bytes = static_cast<long>(lda) * 2;
  alignas(64) float c[kStepRows * 2 * kAmxTileN];
  constexpr long kCBytes = 2 * kAmxTileN * 4;
  const auto panel_of = [&](int m, int p) {
    return static_cast<const unsigned char*>(tiles[m]) + p * panel_bytes;
  };
  // Whole B tiles: the panels and A are zero beyond K up to a multiple of 32 values.
  const auto tile_pairs = [](Fp8PairRange r) {
    return (r.kk1 - r.kk0 + kTilePairs - 1) / kTilePairs * kTilePairs;
  };
  // Converts block kb of every panel into the buffer (at the block's place when prescaling),
  // times its scale when prescaling.
  const auto convert_block = [&](int64_t kb) {
    const Fp8PairRange range = fp8_block_pairs(kb, block_k, K);
    const int64_t pairs = tile_pairs(range);
    for (int m = 0; m < NM; ++m)
      for (int p = 0; p < np; ++p) {
        const unsigned char* panel = panel_of(m, p);
        const uint8_t* src = panel + header_bytes + range.kk0 * kPairBytes;
        uint16_t* dst = buffer + ((m * kMaxPanels + p) * buffer_pairs + (prescale ? range.kk0 : 0)) * kPairBytes;
        const __m512 scale = _mm512_set1_ps(fp8_panel_scales(panel)[kb]);
        for (int64_t j = 0; j < pairs; j += 2) {
          __m512i w[2];
          fp8_vbmi::to_bf16x64(_mm512_loadu_si512(src + j * kPairBytes), tables, &w[0], &w[1]);
          if (prescale)
            for (__m512i& v : w) {  // bf16 -> f32, times the scale, -> bf16 (RNE)
              const __m512 lo = avx512::bf16x16_to_f32(_mm512_castsi512_si256(v));
              const __m512 hi = avx512::bf16x16_to_f32(_mm512_extracti64x4_epi64(v, 1));
              v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale));
            }
          _mm512_store_si512(dst + j * kPairBytes, w[0]);
          _mm512_store_si512(dst + (j + 1) * kPairBytes, w[1]);
        }
      }
  };
  // The tile products over pairs [kk0, kk0 + pairs) from the buffer, added times scale[m][p]
  // into acc.
  const auto run_tiles = [&](int64_t kk0, int64_t pairs, const float (*scale)[kMaxPanels]) {
    compiler_barrier();
    const int64_t chunks = pairs / kTilePairs;
    const int64_t offset = prescale ? kk0 : 0;  // of the first pair in the buffer
    for (int m = 0; m < NM; ++m)
      for (int p0 = 0; p0 < np; p0 += 2) {
        const bool two_cols = p0 + 1 < np;
        const uint16_t* b0 = buffer + ((m * kMaxPanels + p0) * buffer_pairs + offset) * kPairBytes;
        const uint16_t* b1 = b0 + buffer_pairs * kPairBytes;
        for (int64_t r0 = 0; r0 < rows; r0 += kStepRows) {
          const bool two_rows = rows - r0 > kAmxTileM;
          const uint16_t* a0 = a + r0 * lda + 2 * kk0;
          const uint16_t* a1 = a0 + kAmxTileM * lda;
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t t = 0; t < chunks; ++t) {
            _tile_loadd(4, a0 + t * kAmxTileK, a_bytes);
            _tile_loadd(6, b0 + t * kTilePairs * kPairBytes, kTileRowBytes);
            _tile_dpbf16ps(0, 4, 6);
            if (two_cols) {
              _tile_loadd(7, b1 + t * kTilePairs * kPairBytes, kTileRowBytes);
              _tile_dpbf16ps(1, 4, 7);
            }
            if (two_rows) {
              _tile_loadd(5, a1 + t * kAmxTileK, a_bytes);
              _tile_dpbf16ps(2, 5, 6);
              if (two_cols) _tile_dpbf16ps(3, 5, 7);
            }
          }
          _tile_stored(0, c, kCBytes);
          _tile_stored(1, c + kAmxTileN, kCBytes);
          _tile_stored(2, c + kAmxTileM * 2 * kAmxTileN, kCBytes);
          _tile_stored(3, c + kAmxTileM * 2 * kAmxTileN + kAmxTileN, kCBytes);
          compiler_barrier();
          const int64_t step_rows = std::min<int64_t>(kStepRows, rows - r0);
          const __m512 s0 = _mm512_set1_ps(scale[m][p0]);
          const __m512 s1 = _mm512_set1_ps(two_cols ? scale[m][p0 + 1] : 0.0f);
          for (int64_t r = 0; r < step_rows; ++r) {
            float* out = acc[m] + (r0 + r) * kTileN + p0 * kMoePanelN;
            _mm512_store_ps(out, _mm512_fmadd_ps(_mm512_load_ps(c + r * 2 * kAmxTileN), s0, _mm512_load_ps(out)));
            if (two_cols)
              _mm512_store_ps(out + kMoePanelN, _mm512_fmadd_ps(_mm512_load_ps(c + r * 2 * kAmxTileN + kAmxTileN), s1,
                                                                _mm512_load_ps(out + kMoePanelN)));
          }
        }
      }
  };
  if (prescale) {
    for (int64_t kb = 0; kb < h.num_kb; ++kb) convert_block(kb);
    float ones[NM][kMaxPanels];
    for (int m = 0; m < NM; ++m)
      for (int p = 0; p < kMaxPanels; ++p) ones[m][p] = 1.0f;
    const Fp8PairRange last = fp8_block_pairs(h.num_kb - 1, block_k, K);
    run_tiles(0, last.kk0 + tile_pairs(last), ones);
    return;
  }
  for (int64_t kb = 0; kb < h.num_kb; ++kb) {
    convert_block(kb);
    float scale[NM][kMaxPanels];
    for (int m = 0; m < NM; ++m)
      for (int p = 0; p < np; ++p) scale[m][p] = fp8_panel_scales(panel_of(m, p))[kb];
    const Fp8PairRange range = fp8_block_pairs(kb, block_k, K);
    run_tiles(range.kk0, tile_pairs(range), scale);
  }
}

// The AVX-512 FP8 path pays a conversion per weight that the AMX path shares by up to 16 rows,
// so FP8 moves to the tiles at a quarter of the bf16 threshold (2 rows by default).
bool use_amx(int64_t rows) { return rows >= amx_min_rows_for(MOEKIT_FP8_E4M3); }

void gate_up(const MoeGateUpCall& call) {
  if (!use_amx(call.m) || !call.a_consecutive)
    return moe_microkernel_fp8_avx512vbmi().gate_up(call);
  amx_tile_configure();
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  // The pipeline hands this kernel (sorted_a) its rows in order, zero-padded to
  // vnni_padded_k(K) with readable rows past the last: tiles load them in place.
  const uint16_t* a = static_cast<const uint16_t*>(call.a) + call.a_rows[0] * call.lda;
  float* acc_base;
  fp8_moe::row_buffers(call.m, 2, &acc_base);
  float* acc[2] = {acc_base, acc_base + call.m * kTileN};
  const void* tiles[2] = {call.w1, call.w3};
  amx_reduce<2>(a, call.lda, call.m, call.K, tiles, np, acc);
  // The SiLU epilogue in vectors: at prefill sizes a scalar exp per value cost ~10% of the call.
  for (int64_t r = 0; r < call.m; ++r) {
    uint16_t* out = static_cast<uint16_t*>(call.act) + r * call.ld_act;
    const float* g = acc[0] + r * kTileN;
    const float* u = acc[1] + r * kTileN;
    for (int64_t col = 0; col < call.n; col += 16)
      avx512::store_act(out + col, true,
                        avx512::silu_mul(_mm512_loadu_ps(g + col), _mm512_loadu_ps(u + col)),
                        call.n - col);
  }
}

void down(const MoeDownCall& call) {
  if (!use_amx(call.m)) return moe_microkernel_fp8_avx512vbmi().down(call);
  amx_tile_configure();
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  float* acc;
  fp8_moe::row_buffers(call.m, 1, &acc);
  const void* tiles[1] = {call.w2};
  // act rows are consecutive, zero-padded to vnni_padded_k(I), and amx_padded_m(m) rows are
  // readable (the pipeline keeps a panel of spare rows).
  amx_reduce<1>(static_cast<const uint16_t*>(call.act), call.ld_act, call.m, call.K, tiles, np, &acc);
  for (int64_t r = 0; r < call.m; ++r) {  // in row order: rows may share a token
    float* out = call.out + call.out_rows[r] * call.ld_out;
    const float* d = acc + r * kTileN;
    for (int64_t col = 0; col < call.n; ++col) out[col] += call.row_weight[r] * d[col];
  }
}

}  // namespace

const MoeMicrokernel& moe_microkernel_fp8_amx() {
  static const MoeMicrokernel uk = [] {
    MoeMicrokernel k{};
    k.name = "fused_moe_fp8_amx";
    k.weight_dtype = MOEKIT_FP8_E4M3;
    k.layout = MOEKIT_LAYOUT_VNNI;
    k.a_dtype = MOEKIT_BF16;
    k.pad_a = true;
    k.sorted_a = true;
    k.block_m = kAmxFp8BlockM;
    k.gate_up_n = kTileN;
    k.down_n = kTileN;
    k.weight_tile = fp8_vnni_weight_tile;
    k.gate_up = gate_up;
    k.down = down;
    k.thread_begin = amx_tile_configure;
    k.thread_end = amx_tile_release;
    return k;
  }();
  return uk;
}

}  // namespace moekit
