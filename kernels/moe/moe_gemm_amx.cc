// AMX-BF16 microkernels of the blockwise expert matmul (compiled with the amx flags; called only
// when the effective level is MOEKIT_ISA_AMX). Layout and tile assignment: see moe_amx.h.
//
// NOTE: each kernel walks the output in steps of up to 32 rows x 2 column tiles. A step zeroes
// the (up to) four f32 accumulator tiles, runs the whole reduction (one A tile per 16 rows and
// one B tile per column tile per 32 values of K, then the 2x2 TDPBF16PS products), and stores
// the accumulators to a 4 KiB stack scratch from which an AVX-512 epilogue writes the result:
// plain f32 (amx_gemm_bf16), SiLU(gate)*up rounded to bf16 (amx_gate_up_silu, whose two column
// tiles are the same columns of w1 and w3), or weight * result stored or added into per-row
// destinations (amx_down_weighted). Column steps are the outer loop, so each weight column
// block is read from memory once per call and the 32-row steps reuse it from cache.
// GCC 12's AVX-512 intrinsics seed their pass-through operand with _mm512_undefined_ps(), which
// -Wmaybe-uninitialized reports once inlined; the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dispatch/cpu_features.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"
#include "kernels/moe/moe_simd_avx512-inl.h"

namespace moekit {
namespace {

// Tile register numbers (the intrinsics take them as literals).
//   0..3: C[row tile][column tile] = C00 C01 C10 C11; 4, 5: A rows 0-15 / 16-31; 6, 7: B tiles.
constexpr int kStepRows = 2 * kAmxTileM;  // 32
constexpr int kStepCols = 2 * kAmxTileN;  // 32
constexpr long kTileRowBytes = 64;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

TileConfig make_tile_config() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kTileRowBytes;
    cfg.rows[t] = kAmxTileM;
  }
  return cfg;
}

thread_local bool t_tiles_configured = false;
// The tile configuration this thread had when the library configured its own, put back on
// release: an engine whose kernels configure tiles once per thread (psABI-volatile as they are)
// must not find them released after a moekit call. Palette 0 means it had none.
thread_local TileConfig t_callers_config;

// GCC's tileloadd asm does not tell the compiler that it reads memory; a compiler barrier makes
// sure earlier stores to the buffers it loads have been emitted.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

constexpr int64_t kPrefetchBlocks = 2;  // K blocks ahead

inline void prefetch_l1(const uint16_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// Lines of weights that the next piece of work will read, pulled into L2 a few per K block
// while this step computes, so that streaming them from memory overlaps the tile products.
struct L2Prefetch {
  const char* p0 = nullptr;  // two ranges of `lines` 64-byte lines each (p1 may be null)
  const char* p1 = nullptr;
  int64_t lines = 0;
  int64_t lines_per_kb = 0;
};

// One output step: C[rows of kRowTiles tiles][kColTiles tiles] over k_blocks K blocks, stored
// at c (row stride c_stride floats). a: the step's first row; b0/b1: the first tile of each
// weight column block; pf: weights to pull into L2 meanwhile.
template <int kRowTiles, int kColTiles>
inline void tile_step(const uint16_t* a, int64_t a_stride, const uint16_t* b0, const uint16_t* b1,
                      int64_t k_blocks, float* c, int64_t c_stride, const L2Prefetch& pf) {
  const long a_bytes = static_cast<long>(a_stride) * 2;
  const long c_bytes = static_cast<long>(c_stride) * 4;
  const uint16_t* a1 = a + kAmxTileM * a_stride;
  float* c1 = c + kAmxTileM * c_stride;
  _tile_zero(0);
  if constexpr (kColTiles == 2) _tile_zero(1);
  if constexpr (kRowTiles == 2) _tile_zero(2);
  if constexpr (kRowTiles == 2 && kColTiles == 2) _tile_zero(3);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    // The eight tiles leave no room to load the next K block early, so its lines are prefetched
    // into L1 instead (bench_moe_amx BM_AmxGemmL2: ~+15% on L2-resident operands).
    if (kb + kPrefetchBlocks < k_blocks) {
      const int64_t pk = kb + kPrefetchBlocks;
      for (int r = 0; r < kAmxTileM; ++r) {
        prefetch_l1(a + r * a_stride + pk * kAmxTileK);
        if constexpr (kRowTiles == 2) prefetch_l1(a1 + r * a_stride + pk * kAmxTileK);
        prefetch_l1(b0 + pk * kAmxTileElems + r * kTileRowBytes / 2);
        if constexpr (kColTiles == 2) prefetch_l1(b1 + pk * kAmxTileElems + r * kTileRowBytes / 2);
      }
    }
    // Written out here, not in a helper: GCC finds that a function which only prefetches has no
    // effect and deletes its calls, and this L2 prefetch was lost that way until it moved here.
    for (int64_t l = kb * pf.lines_per_kb; l < std::min((kb + 1) * pf.lines_per_kb, pf.lines);
         ++l) {
      _mm_prefetch(pf.p0 + l * 64, _MM_HINT_T1);
      if (pf.p1) _mm_prefetch(pf.p1 + l * 64, _MM_HINT_T1);
    }
    // Each product follows the loads it needs, so that it can start while the next tile loads
    // (a load into a tile waits for the products still reading it).
    _tile_loadd(4, a + kb * kAmxTileK, a_bytes);
    _tile_loadd(6, b0 + kb * kAmxTileElems, kTileRowBytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kColTiles == 2) {
      _tile_loadd(7, b1 + kb * kAmxTileElems, kTileRowBytes);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kRowTiles == 2) {
      _tile_loadd(5, a1 + kb * kAmxTileK, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kColTiles == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_bytes);
  if constexpr (kColTiles == 2) _tile_stored(1, c + kAmxTileN, c_bytes);
  if constexpr (kRowTiles == 2) _tile_stored(2, c1, c_bytes);
  if constexpr (kRowTiles == 2 && kColTiles == 2) _tile_stored(3, c1 + kAmxTileN, c_bytes);
}

void run_step(int row_tiles, int col_tiles, const uint16_t* a, int64_t a_stride, const uint16_t* b0,
              const uint16_t* b1, int64_t k_blocks, float* c, int64_t c_stride = kStepCols,
              const L2Prefetch& pf = L2Prefetch{}) {
  if (row_tiles == 2) {
    if (col_tiles == 2)
      tile_step<2, 2>(a, a_stride, b0, b1, k_blocks, c, c_stride, pf);
    else
      tile_step<2, 1>(a, a_stride, b0, b1, k_blocks, c, c_stride, pf);
  } else {
    if (col_tiles == 2)
      tile_step<1, 2>(a, a_stride, b0, b1, k_blocks, c, c_stride, pf);
    else
      tile_step<1, 1>(a, a_stride, b0, b1, k_blocks, c, c_stride, pf);
  }
}

// Row steps from which a call pulls its next weights into L2 (gate_up: the next column block,
// down: the next expert's tile). A scratch harness on a 2-core AMX VM, 64 experts of MiniMax-M2
// shape: with 128 rows per expert 15% faster with it; with about 32 (one or two steps, where
// the call streams its weights from memory anyway) 13% slower, so those go without.
constexpr int64_t kL2PrefetchMinSteps = 3;

// The prefetch slice of row step `step` of `steps` (each of k_blocks K blocks) over two ranges
// of `lines` lines.
L2Prefetch prefetch_for_step(const void* p0, const void* p1, int64_t lines, int64_t step,
                             int64_t steps, int64_t k_blocks) {
  L2Prefetch pf;
  if (p0 == nullptr) return pf;
  const int64_t per_step = (lines + steps - 1) / steps;
  const int64_t first = std::min(lines, step * per_step);
  pf.p0 = static_cast<const char*>(p0) + first * 64;
  pf.p1 = p1 ? static_cast<const char*>(p1) + first * 64 : nullptr;
  pf.lines = std::min(per_step, lines - first);
  pf.lines_per_kb = (pf.lines + k_blocks - 1) / k_blocks;
  return pf;
}

inline void store_bf16x16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

}  // namespace

void amx_tile_configure() {
  if (t_tiles_configured) return;
  static const TileConfig config = [] {
    (void)cpu_features();  // makes sure this process has asked Linux for the tile state
    return make_tile_config();
  }();
  _tile_storeconfig(&t_callers_config);  // all zero when no configuration is loaded
  _tile_loadconfig(&config);
  t_tiles_configured = true;
}

void amx_tile_release() {
  if (!t_tiles_configured) return;
  if (t_callers_config.palette_id != 0)
    _tile_loadconfig(&t_callers_config);  // its tile data is gone, as after any call
  else
    _tile_release();
  t_tiles_configured = false;
}

void amx_gemm_bf16(const uint16_t* a, int64_t a_stride, int64_t rows, const uint16_t* w_packed,
                   int64_t N, int64_t K, float* c, int64_t c_stride) {
  amx_tile_configure();
  compiler_barrier();
  const int64_t k_blocks = amx_padded_k(K) / kAmxTileK;
  const int64_t n_blocks = amx_padded_n(N) / kAmxTileN;
  alignas(64) float scratch[kStepRows * kStepCols];
  for (int64_t nb = 0; nb < n_blocks; nb += 2) {
    const int col_tiles = nb + 1 < n_blocks ? 2 : 1;
    const uint16_t* b0 = w_packed + nb * k_blocks * kAmxTileElems;
    const uint16_t* b1 = b0 + k_blocks * kAmxTileElems;
    const int64_t n0 = nb * kAmxTileN;
    for (int64_t m0 = 0; m0 < rows; m0 += kStepRows) {
      const int row_tiles = rows - m0 > kAmxTileM ? 2 : 1;
      run_step(row_tiles, col_tiles, a + m0 * a_stride, a_stride, b0, b1, k_blocks, scratch);
      const int64_t step_rows = rows - m0 < kStepRows ? rows - m0 : kStepRows;
      for (int64_t r = 0; r < step_rows; ++r)
        for (int t = 0; t < col_tiles; ++t) {
          const int64_t n = n0 + t * kAmxTileN;
          if (n >= N) break;
          _mm512_mask_storeu_ps(c + (m0 + r) * c_stride + n, avx512::lanes(N - n),
                                _mm512_load_ps(scratch + r * kStepCols + t * kAmxTileN));
        }
    }
  }
}

void amx_gate_up_silu(const uint16_t* x, int64_t x_stride, int64_t rows, const uint16_t* w1_packed,
                      const uint16_t* w3_packed, int64_t I, int64_t H, uint16_t* act,
                      int64_t act_stride) {
  amx_tile_configure();
  compiler_barrier();
  const int64_t k_blocks = amx_padded_k(H) / kAmxTileK;
  const int64_t n_blocks = amx_padded_n(I) / kAmxTileN;
  const int64_t padded_rows = amx_padded_m(rows);
  alignas(64) float scratch[kStepRows * kStepCols];
  for (int64_t nb = 0; nb < n_blocks; ++nb) {
    const uint16_t* gate = w1_packed + nb * k_blocks * kAmxTileElems;
    const uint16_t* up = w3_packed + nb * k_blocks * kAmxTileElems;
    for (int64_t m0 = 0; m0 < padded_rows; m0 += kStepRows) {
      const int row_tiles = padded_rows - m0 > kAmxTileM ? 2 : 1;
      run_step(row_tiles, 2, x + m0 * x_stride, x_stride, gate, up, k_blocks, scratch);
      // Padded weight rows are zero, so columns past I come out as silu(0) * 0 = 0.
      for (int64_t r = 0; r < row_tiles * kAmxTileM; ++r)
        store_bf16x16(act + (m0 + r) * act_stride + nb * kAmxTileN,
                      avx512::silu_mul(_mm512_load_ps(scratch + r * kStepCols),
                                       _mm512_load_ps(scratch + r * kStepCols + kAmxTileN)));
    }
  }
  // The down GEMM reduces over amx_padded_k(I) columns; clear the ones no tile wrote.
  const int64_t written = n_blocks * kAmxTileN, needed = amx_padded_k(I);
  for (int64_t r = 0; r < padded_rows && written < needed; ++r)
    for (int64_t i = written; i < needed; ++i) act[r * act_stride + i] = 0;
}

void amx_down_weighted(const uint16_t* act, int64_t act_stride, int64_t rows,
                       const uint16_t* w2_packed, int64_t H, int64_t I, const float* row_weight,
                       float* const* dst, bool accumulate) {
  amx_tile_configure();
  compiler_barrier();
  const int64_t k_blocks = amx_padded_k(I) / kAmxTileK;
  const int64_t n_blocks = amx_padded_n(H) / kAmxTileN;
  alignas(64) float scratch[kStepRows * kStepCols];
  for (int64_t nb = 0; nb < n_blocks; nb += 2) {
    const int col_tiles = nb + 1 < n_blocks ? 2 : 1;
    const uint16_t* b0 = w2_packed + nb * k_blocks * kAmxTileElems;
    const uint16_t* b1 = b0 + k_blocks * kAmxTileElems;
    const int64_t n0 = nb * kAmxTileN;
    for (int64_t m0 = 0; m0 < rows; m0 += kStepRows) {
      const int row_tiles = rows - m0 > kAmxTileM ? 2 : 1;
      run_step(row_tiles, col_tiles, act + m0 * act_stride, act_stride, b0, b1, k_blocks, scratch);
      const int64_t step_rows = rows - m0 < kStepRows ? rows - m0 : kStepRows;
      for (int64_t r = 0; r < step_rows; ++r) {
        float* out = dst[m0 + r];
        if (out == nullptr) continue;
        const __m512 weight = _mm512_set1_ps(row_weight[m0 + r]);
        for (int t = 0; t < col_tiles; ++t) {
          const int64_t n = n0 + t * kAmxTileN;
          if (n >= H) break;
          const __mmask16 mask = avx512::lanes(H - n);
          __m512 v = _mm512_mul_ps(weight, _mm512_load_ps(scratch + r * kStepCols + t * kAmxTileN));
          if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out + n), v);
          _mm512_mask_storeu_ps(out + n, mask, v);
        }
      }
    }
  }
}

// ---- the fused-MoE pipeline's AMX microkernel ------------------------------------------------
//
// NOTE: the kernel sets sorted_a, so the pipeline (moe_pipeline.cc) writes each chunk's A rows
// (bf16, zero-padded to vnni_padded_k(H), at a row stride of an odd number of cache lines) in
// sorted order: a segment's rows are consecutive and tiles load them in place. gate_up walks
// column blocks (16 columns of w1 and of w3) outside 32-row steps, so a block's weights stay in
// L2 for every step, and pulls the next block's weights into L2 while it computes; down walks
// 32-row steps outside column blocks, so a step's intermediate rows stay in L2 for every block,
// and pulls the next expert's weight tile (MoeDownCall::w2_next) into L2 meanwhile.
// Segments of fewer than amx_min_rows() rows go to the AVX-512-BF16 microkernel instead: a tile
// pass costs the same for 1 row as for 16, and the VNNI panels it reads are the same bytes. Its
// tiles are narrower than ours, so such calls are split into column pieces of its width.
namespace {

// Wide items: every gate_up item reads its segment's A rows, and every down item the whole
// chunk's intermediate rows, from beyond L2, so that traffic is divided by the item width.
// 128 columns keep a gate_up item's A rows and one column block of weights within L2; 96
// columns give MiniMax-M2 (H 3072) 32 down items per chunk, two whole rounds for 16 threads
// (128 left 24, one and a half), which the pipeline turns into 24 items of 96 and 16 of 48
// (its narrow tail). Segments of up to 256 rows read each expert's weights once
// per call at M = 4096 (mean 128 rows per expert, often more). Measured with bench_moe on a
// 16-thread AMX machine (bench/RESULTS.md, "AMX expert matmul"). The weight tiles point into
// the handle and the kernels use no per-column scratch, so kMoeMaxTileN does not bound them.
constexpr int64_t kAmxGateUpN = 128;  // 8 column tiles of w1 and of w3 per gate_up item
constexpr int64_t kAmxDownN = 96;
constexpr int64_t kAmxBlockM = 256;

// Routes a small segment to the AVX-512-BF16 microkernel, `width` columns at a time.
void gate_up_small(const MoeGateUpCall& call) {
  const MoeMicrokernel& small = moe_microkernel_bf16_avx512bf16();
  const size_t panel_bytes = vnni_panel_bytes(call.K, MOEKIT_BF16);
  for (int64_t c0 = 0; c0 < call.n; c0 += small.gate_up_n) {
    MoeGateUpCall piece = call;
    const size_t offset = static_cast<size_t>(c0 / kMoePanelN) * panel_bytes;
    piece.w1 = static_cast<const unsigned char*>(call.w1) + offset;
    piece.w3 = static_cast<const unsigned char*>(call.w3) + offset;
    piece.n = std::min(small.gate_up_n, call.n - c0);
    piece.act = static_cast<uint16_t*>(call.act) + c0;
    small.gate_up(piece);
  }
}

void down_small(const MoeDownCall& call) {
  const MoeMicrokernel& small = moe_microkernel_bf16_avx512bf16();
  const size_t panel_bytes = vnni_panel_bytes(call.K, MOEKIT_BF16);
  for (int64_t c0 = 0; c0 < call.n; c0 += small.down_n) {
    MoeDownCall piece = call;
    piece.w2 = static_cast<const unsigned char*>(call.w2) +
               static_cast<size_t>(c0 / kMoePanelN) * panel_bytes;
    piece.n = std::min(small.down_n, call.n - c0);
    piece.out = call.out + c0;
    small.down(piece);
  }
}

bool use_amx(int64_t rows) {
  return rows >= amx_min_rows() || rows > moe_microkernel_bf16_avx512bf16().block_m;
}

// gate_up for the call's rows, found at `a` (row stride a_stride, zero padded to
// amx_padded_k(K), amx_padded_m(rows) rows readable).
void gate_up_rows(const MoeGateUpCall& call, const uint16_t* a, int64_t a_stride) {
  const int64_t rows = call.m;
  const int64_t padded_k = amx_padded_k(call.K);
  const int64_t k_blocks = padded_k / kAmxTileK;
  const size_t panel_elems = static_cast<size_t>(padded_k * kAmxTileN);
  compiler_barrier();
  const auto* w1 = static_cast<const uint16_t*>(call.w1);
  const auto* w3 = static_cast<const uint16_t*>(call.w3);
  auto* act = static_cast<uint16_t*>(call.act);
  const int64_t steps = (rows + kStepRows - 1) / kStepRows;
  const int64_t block_lines = k_blocks * 16;  // cache lines of one column block of w1 (or w3)
  // The f32 sums of every row step for one column block (gate | up).
  alignas(64) float sums[kAmxBlockM * kStepCols];
  for (int64_t nb = 0; nb * kAmxTileN < call.n; ++nb) {
    const __mmask16 cols = avx512::lanes(call.n - nb * kAmxTileN);
    const uint16_t* gate = w1 + nb * panel_elems;
    const uint16_t* up = w3 + nb * panel_elems;
    // The next column block's gate and up tiles are pulled into L2 during this one.
    const bool has_next = (nb + 1) * kAmxTileN < call.n && steps >= kL2PrefetchMinSteps;
    for (int64_t m0 = 0; m0 < rows; m0 += kStepRows)
      run_step(rows - m0 > kAmxTileM ? 2 : 1, 2, a + m0 * a_stride, a_stride, gate, up, k_blocks,
               sums + m0 * kStepCols, kStepCols,
               prefetch_for_step(has_next ? gate + panel_elems : nullptr, up + panel_elems,
                                 block_lines, m0 / kStepRows, steps, k_blocks));
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 v = avx512::silu_mul(_mm512_load_ps(sums + r * kStepCols),
                                        _mm512_load_ps(sums + r * kStepCols + kAmxTileN));
      _mm256_mask_storeu_epi16(act + r * call.ld_act + nb * kAmxTileN, cols,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

void pipeline_gate_up(const MoeGateUpCall& call) {
  // The pipeline hands this kernel (sorted_a) its rows in order, where tiles load them in place.
  if (!use_amx(call.m) || !call.a_consecutive) return gate_up_small(call);
  amx_tile_configure();
  gate_up_rows(call, static_cast<const uint16_t*>(call.a) + call.a_rows[0] * call.lda, call.lda);
}

void pipeline_down(const MoeDownCall& call) {
  if (!use_amx(call.m)) return down_small(call);
  // act rows are consecutive, zero-padded to vnni_padded_k(I), and amx_padded_m(m) rows are
  // readable (the pipeline's intermediate buffer has a panel of spare rows).
  amx_tile_configure();
  compiler_barrier();
  const int64_t k_blocks = amx_padded_k(call.K) / kAmxTileK;
  const size_t panel_elems = static_cast<size_t>(k_blocks * kAmxTileElems);
  const int64_t n_blocks = (call.n + kAmxTileN - 1) / kAmxTileN;
  const auto* act = static_cast<const uint16_t*>(call.act);
  const auto* w2 = static_cast<const uint16_t*>(call.w2);
  const int64_t steps = (call.m + kStepRows - 1) / kStepRows;
  // The f32 sums of one row step for all the call's columns.
  alignas(64) float sums[kStepRows * kAmxDownN];
  // Row steps outside: a step's rows are read from beyond L2 once and stay there for every
  // column block, while the item's weights (n x K) stay in L2 across the steps.
  for (int64_t m0 = 0; m0 < call.m; m0 += kStepRows) {
    const int row_tiles = call.m - m0 > kAmxTileM ? 2 : 1;
    const int64_t step_rows = std::min<int64_t>(kStepRows, call.m - m0);
    for (int64_t nb = 0; nb < n_blocks; nb += 2)
      run_step(row_tiles, nb + 1 < n_blocks ? 2 : 1, act + m0 * call.ld_act, call.ld_act,
               w2 + nb * panel_elems, w2 + (nb + 1) * panel_elems, k_blocks, sums + nb * kAmxTileN,
               kAmxDownN,
               prefetch_for_step(steps >= kL2PrefetchMinSteps ? call.w2_next : nullptr, nullptr,
                                 n_blocks * k_blocks * 16,
                                 (m0 / kStepRows) * ((n_blocks + 1) / 2) + nb / 2,
                                 steps * ((n_blocks + 1) / 2), k_blocks));
    for (int64_t r = 0; r < step_rows; ++r) {  // in row order: rows may share a token
      float* out = call.out + call.out_rows[m0 + r] * call.ld_out;
      const __m512 weight = _mm512_set1_ps(call.row_weight[m0 + r]);
      for (int64_t n = 0; n < call.n; n += kAmxTileN) {
        const __mmask16 mask = avx512::lanes(call.n - n);
        const __m512 prev = _mm512_maskz_loadu_ps(mask, out + n);
        _mm512_mask_storeu_ps(
            out + n, mask, _mm512_fmadd_ps(weight, _mm512_load_ps(sums + r * kAmxDownN + n), prev));
      }
    }
  }
}

}  // namespace

const MoeMicrokernel& moe_microkernel_bf16_amx() {
  static const MoeMicrokernel uk = [] {
    MoeMicrokernel k{};
    k.name = "fused_moe_bf16_amx";
    k.weight_dtype = MOEKIT_BF16;
    k.layout = MOEKIT_LAYOUT_AMX;
    k.a_dtype = MOEKIT_BF16;
    k.pad_a = true;
    k.sorted_a = true;
    k.block_m = kAmxBlockM;
    k.gate_up_n = kAmxGateUpN;
    k.down_n = kAmxDownN;
    k.weight_tile = vnni_weight_tile;
    k.weight_tile_in_place = true;
    k.gate_up = pipeline_gate_up;
    k.down = pipeline_down;
    k.thread_begin = amx_tile_configure;
    k.thread_end = amx_tile_release;
    return k;
  }();
  return uk;
}

}  // namespace moekit
