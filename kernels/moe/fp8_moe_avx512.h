// The AVX-512-BF16 fused-MoE microkernels for FP8 VNNI weights (fp8_vnni.h), written once over
// an fp8 -> bf16 converter: included by moe_gemm_fp8_avx512bf16.cc (AVX512-BW conversion) and
// moe_gemm_fp8_avx512vbmi.cc (VBMI table conversion). Everything here is in an unnamed
// namespace, so each including file (compiled with its own flags) keeps its own copy.
//
// NOTE: the block scales are applied once per K block: each block's partial dot products are
// accumulated in zeroed f32 registers with _mm512_dpbf16_ps on the exactly converted (unscaled)
// bf16 weights, then multiplied by the panel's scale for the block and added to an f32
// accumulator row in memory (acc += partial * scale). Two ways to feed the weights:
//   direct (at most kDirectRows rows, e.g. decode): each 64 weight bytes are converted in
//     registers right before their dot products; nothing is stored.
//   buffered (more rows): each K block of the tile is converted once per call into a small
//     buffer (4 panels x 64 pairs x 64 bytes = 16 KiB per matrix at block_k 128, in L1), and
//     every group of up to MR rows reads it back, so conversion is paid once per weight per
//     call whatever the row count.
// Converter: struct with `void operator()(const uint8_t* src, __m512i* pair0, __m512i* pair1)`
// turning the 64 bytes at src (two K pairs of a panel) into the bf16 operands of two dot
// products, and `static constexpr bool kLaneOrder`: whether it also has
// `lane_order(src, lanes_low, lanes_high)` (see block_tile_lane_order), used for single rows.
#ifndef MOEKIT_KERNELS_MOE_FP8_MOE_AVX512_H_
#define MOEKIT_KERNELS_MOE_FP8_MOE_AVX512_H_

#if !defined(__AVX512BF16__)
#error "fp8_moe_avx512.h needs a translation unit compiled at the avx512_bf16 level or above"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/moe/fp8_vnni.h"
#include "reference/numeric.h"

namespace moekit {
namespace {
namespace fp8_moe {

constexpr int kMaxPanels = 4;    // tile width: 64 columns
constexpr int kUpRows = 3;       // buffered gate_up tile: 3 rows x 4 panels x (gate, up) = 24 zmm
constexpr int kDownRows = 6;     // buffered down tile: 6 rows x 4 panels = 24 zmm
constexpr int kDirectRows = 2;   // direct tiles: at most 2 rows x 4 panels x 2 matrices
constexpr int64_t kPairBytes = 2 * kMoePanelN;  // fp8 bytes (and bf16 values) of one K pair
constexpr int64_t kTileN = kMaxPanels * kMoePanelN;

inline __m512bh pair_at(const uint16_t* x, int64_t kk) {
  int32_t word;
  std::memcpy(&word, x + 2 * kk, sizeof word);
  return (__m512bh)_mm512_set1_epi32(word);
}
// {x[K-1], 0}: the last pair of an odd K, never reading past the row.
inline __m512bh last_pair(const uint16_t* x, int64_t K) {
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[K - 1]));
}
inline __m512bh pair_or_last(const uint16_t* x, int64_t kk, int64_t K) {
  return 2 * kk + 1 < K ? pair_at(x, kk) : last_pair(x, K);
}

// Weights from the conversion buffer: buf[m][p][kk - kk0][32 bf16].
struct BufferedWeights {
  const uint16_t* buf[2];
  int64_t kk0, pairs;
  inline void get(int m, int p, int64_t kk, __m512i* w0, __m512i* w1) const {
    const uint16_t* at = buf[m] + (p * pairs + (kk - kk0)) * kPairBytes;
    *w0 = _mm512_load_si512(at);
    *w1 = _mm512_load_si512(at + kPairBytes);
  }
};

// Weights converted in registers from the panels: data[m][p] + kk * 32.
template <class Converter>
struct DirectWeights {
  const uint8_t* data[2][kMaxPanels];
  Converter convert;
  inline void get(int m, int p, int64_t kk, __m512i* w0, __m512i* w1) const {
    convert(data[m][p] + kk * kPairBytes, w0, w1);
  }
};

// One K block for MR rows x NP panels of NM matrices (2: gate and up; 1: down), two K pairs
// per step. x[r]: bf16 rows; acc[m] + r * kTileN + 16p: the f32 accumulators;
// scale[m][p]: the block's scale of panel p of matrix m. A step may fetch one pair past the
// block (in bounds: panels hold a multiple of 16 pairs); it is not used.
template <int MR, int NP, int NM, class Weights>
inline void block_tile(const uint16_t* const* x, int64_t K, Fp8PairRange range,
                       const Weights& weights, const float (*scale)[kMaxPanels],
                       float* const* acc) {
  __m512 s[NM][MR][NP];
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < NP; ++p) s[m][r][p] = _mm512_setzero_ps();
  const auto step = [&](int64_t kk, const __m512bh* a0, const __m512bh* a1, bool second) {
    for (int m = 0; m < NM; ++m)
      for (int p = 0; p < NP; ++p) {
        __m512i w0, w1;
        weights.get(m, p, kk, &w0, &w1);
        for (int r = 0; r < MR; ++r) s[m][r][p] = _mm512_dpbf16_ps(s[m][r][p], a0[r], (__m512bh)w0);
        if (second)
          for (int r = 0; r < MR; ++r) s[m][r][p] = _mm512_dpbf16_ps(s[m][r][p], a1[r], (__m512bh)w1);
      }
  };
  __m512bh a0[MR], a1[MR];
  const int64_t full_end = std::min(range.kk1, K / 2);  // pairs with both values inside K
  int64_t kk = range.kk0;
  for (; kk + 2 <= full_end; kk += 2) {
    for (int r = 0; r < MR; ++r) {
      a0[r] = pair_at(x[r], kk);
      a1[r] = pair_at(x[r], kk + 1);
    }
    step(kk, a0, a1, true);
  }
  if (kk < range.kk1) {  // one or two pairs left, the last possibly half inside K
    const bool second = kk + 1 < range.kk1;
    for (int r = 0; r < MR; ++r) {
      a0[r] = pair_or_last(x[r], kk, K);
      a1[r] = second ? pair_or_last(x[r], kk + 1, K) : a0[r];
    }
    step(kk, a0, a1, second);
  }
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < NP; ++p) {
        float* a = acc[m] + r * kTileN + p * kMoePanelN;
        _mm512_store_ps(a, _mm512_fmadd_ps(s[m][r][p], _mm512_set1_ps(scale[m][p]), _mm512_load_ps(a)));
      }
}

template <int MR, int NM, class Weights>
void block_tile_np(int np, const uint16_t* const* x, int64_t K, Fp8PairRange range,
                   const Weights& w, const float (*scale)[kMaxPanels], float* const* acc) {
  switch (np) {
    case 1: return block_tile<MR, 1, NM>(x, K, range, w, scale, acc);
    case 2: return block_tile<MR, 2, NM>(x, K, range, w, scale, acc);
    case 3: return block_tile<MR, 3, NM>(x, K, range, w, scale, acc);
    default: return block_tile<MR, 4, NM>(x, K, range, w, scale, acc);
  }
}

template <int NM, class Weights>
void block_rows(int mr, int np, const uint16_t* const* x, int64_t K, Fp8PairRange range,
                const Weights& w, const float (*scale)[kMaxPanels], float* const* acc) {
  switch (mr) {
    case 1: return block_tile_np<1, NM>(np, x, K, range, w, scale, acc);
    case 2: return block_tile_np<2, NM>(np, x, K, range, w, scale, acc);
    case 3: return block_tile_np<3, NM>(np, x, K, range, w, scale, acc);
    case 4: if constexpr (NM == 1) return block_tile_np<4, NM>(np, x, K, range, w, scale, acc);
      break;
    case 5: if constexpr (NM == 1) return block_tile_np<5, NM>(np, x, K, range, w, scale, acc);
      break;
    case 6: if constexpr (NM == 1) return block_tile_np<6, NM>(np, x, K, range, w, scale, acc);
      break;
  }
}

// One K block for a single row with a converter in lane order (Converter::kLaneOrder): the 64
// bytes of two K pairs kk, kk+1 of a panel convert to L (input bytes 0-7, 16-23, 32-39, 48-55)
// and H (bytes 8-15, 24-31, 40-47, 56-63). As dot-product lanes (one per output and pair):
//   L: lanes 0-3 (kk, n 0-3), 4-7 (kk, n 8-11), 8-11 (kk+1, n 0-3), 12-15 (kk+1, n 8-11)
//   H: the same with n 4-7 and n 12-15,
// so both take the activation vector {pair kk in lanes 0-7, pair kk+1 in lanes 8-15}, and the
// halves are added and put in output order once per block.
template <int NP, int NM, class Converter>
inline void block_tile_lane_order(const uint16_t* x, int64_t K, Fp8PairRange range,
                                  const uint8_t* const (*data)[kMaxPanels], const Converter& convert,
                                  const float (*scale)[kMaxPanels], float* const* acc) {
  __m512 sl[NM][NP], sh[NM][NP];
  for (int m = 0; m < NM; ++m)
    for (int p = 0; p < NP; ++p) sl[m][p] = sh[m][p] = _mm512_setzero_ps();
  const auto step = [&](int64_t kk, __m512bh a, __mmask16 lanes) {
    for (int m = 0; m < NM; ++m)
      for (int p = 0; p < NP; ++p) {
        __m512i wl, wh;
        convert.lane_order(data[m][p] + kk * kPairBytes, &wl, &wh);
        sl[m][p] = _mm512_mask_dpbf16_ps(sl[m][p], lanes, a, (__m512bh)wl);
        sh[m][p] = _mm512_mask_dpbf16_ps(sh[m][p], lanes, a, (__m512bh)wh);
      }
  };
  constexpr __mmask16 kBothPairs = 0xFFFF, kFirstPair = 0x00FF;
  const int64_t full_end = std::min(range.kk1, K / 2);
  int64_t kk = range.kk0;
  for (; kk + 2 <= full_end; kk += 2)
    step(kk, (__m512bh)_mm512_mask_blend_epi32(0xFF00, (__m512i)pair_at(x, kk), (__m512i)pair_at(x, kk + 1)),
         kBothPairs);
  if (kk < range.kk1) {  // one or two pairs left, the last possibly half inside K
    const bool second = kk + 1 < range.kk1;
    const __m512i a0 = (__m512i)pair_or_last(x, kk, K);
    const __m512i a1 = second ? (__m512i)pair_or_last(x, kk + 1, K) : a0;
    // Without a second pair its lanes are left untouched (its bytes may be another block's).
    step(kk, (__m512bh)_mm512_mask_blend_epi32(0xFF00, a0, a1), second ? kBothPairs : kFirstPair);
  }
  // Output order: n 0-3 from L lanes 0-3 (+ 8-11), n 4-7 from H 0-3 (+ 8-11), n 8-11 from
  // L 4-7 (+ 12-15), n 12-15 from H 4-7 (+ 12-15).
  const __m512i order = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  for (int m = 0; m < NM; ++m)
    for (int p = 0; p < NP; ++p) {
      const __m512 l = _mm512_add_ps(sl[m][p], _mm512_maskz_shuffle_f32x4(0xFFFF, sl[m][p], sl[m][p], 0x4E));
      const __m512 h = _mm512_add_ps(sh[m][p], _mm512_maskz_shuffle_f32x4(0xFFFF, sh[m][p], sh[m][p], 0x4E));
      const __m512 sum = _mm512_permutex2var_ps(l, order, h);
      float* a = acc[m] + p * kMoePanelN;
      _mm512_store_ps(a, _mm512_fmadd_ps(sum, _mm512_set1_ps(scale[m][p]), _mm512_load_ps(a)));
    }
}

template <int NM, class Converter>
void block_lane_order_np(int np, const uint16_t* x, int64_t K, Fp8PairRange range,
                         const uint8_t* const (*data)[kMaxPanels], const Converter& convert,
                         const float (*scale)[kMaxPanels], float* const* acc) {
  switch (np) {
    case 1: return block_tile_lane_order<1, NM>(x, K, range, data, convert, scale, acc);
    case 2: return block_tile_lane_order<2, NM>(x, K, range, data, convert, scale, acc);
    case 3: return block_tile_lane_order<3, NM>(x, K, range, data, convert, scale, acc);
    default: return block_tile_lane_order<4, NM>(x, K, range, data, convert, scale, acc);
  }
}

// Runs every K block of NM matrices (first panels tiles[m]) over rows x[0..rows), leaving the
// scaled sums in acc[m] (rows x kTileN f32 each).
template <int NM, int kMaxRows, class Converter>
void reduce_all_blocks(const uint16_t* const* x, int64_t rows, int64_t K, const void* const* tiles,
                       int np, float* const* acc) {
  const Fp8PanelHeader& h = fp8_panel_header(tiles[0]);
  const int64_t block_k = h.block_k, panel_bytes = h.panel_bytes;
  const size_t header_bytes = fp8_panel_header_bytes(K, block_k);
  for (int m = 0; m < NM; ++m) std::memset(acc[m], 0, static_cast<size_t>(rows * kTileN) * 4);
  const auto panel = [&](int m, int p) {
    return static_cast<const unsigned char*>(tiles[m]) + p * panel_bytes;
  };
  if (rows <= kDirectRows) {
    DirectWeights<Converter> w;
    for (int m = 0; m < NM; ++m)
      for (int p = 0; p < np; ++p) w.data[m][p] = panel(m, p) + header_bytes;
    for (int64_t kb = 0; kb < h.num_kb; ++kb) {
      float scale[NM][kMaxPanels];
      for (int m = 0; m < NM; ++m)
        for (int p = 0; p < np; ++p) scale[m][p] = fp8_panel_scales(panel(m, p))[kb];
      const Fp8PairRange range = fp8_block_pairs(kb, block_k, K);
      if constexpr (Converter::kLaneOrder) {
        if (rows == 1) {  // decode: the lane-order conversion, one shuffle fewer per 64 weights
          block_lane_order_np<NM>(np, x[0], K, range, w.data, w.convert, scale, acc);
          continue;
        }
      }
      block_rows<NM>(static_cast<int>(rows), np, x, K, range, w, scale, acc);
    }
    return;
  }
  // Buffer: per matrix kMaxPanels x (max_pairs + 1) pairs (one pair of slack for the last step).
  const int64_t max_pairs = std::min<int64_t>(block_k / 2, vnni_padded_k(K) / 2) + 1;
  auto* block = reinterpret_cast<uint16_t*>(fp8_thread_buffer(
      0, static_cast<size_t>(NM * kMaxPanels * max_pairs * kPairBytes) * sizeof(uint16_t)));
  const Converter convert;
  for (int64_t kb = 0; kb < h.num_kb; ++kb) {
    const Fp8PairRange range = fp8_block_pairs(kb, block_k, K);
    BufferedWeights w;
    w.kk0 = range.kk0;
    w.pairs = range.kk1 - range.kk0;
    float scale[NM][kMaxPanels];
    for (int m = 0; m < NM; ++m) {
      uint16_t* buf = block + m * kMaxPanels * max_pairs * kPairBytes;
      w.buf[m] = buf;
      for (int p = 0; p < np; ++p) {
        scale[m][p] = fp8_panel_scales(panel(m, p))[kb];
        const uint8_t* src = panel(m, p) + header_bytes + range.kk0 * kPairBytes;
        uint16_t* dst = buf + p * w.pairs * kPairBytes;
        for (int64_t j = 0; j < w.pairs; j += 2) {
          __m512i w0, w1;
          convert(src + j * kPairBytes, &w0, &w1);
          _mm512_store_si512(dst + j * kPairBytes, w0);
          _mm512_store_si512(dst + (j + 1) * kPairBytes, w1);
        }
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
      float* acc_rows[NM];
      for (int m = 0; m < NM; ++m) acc_rows[m] = acc[m] + r0 * kTileN;
      block_rows<NM>(mr, np, x + r0, K, range, w, scale, acc_rows);
    }
  }
}

// Row pointers for `rows` rows and, 64-byte aligned after them, `matrices` accumulator blocks
// of rows x kTileN f32.
inline const uint16_t** row_buffers(int64_t rows, int matrices, float** acc) {
  const size_t pointer_bytes = (static_cast<size_t>(rows) * sizeof(void*) + 63) / 64 * 64;
  unsigned char* p = fp8_thread_buffer(
      1, pointer_bytes + static_cast<size_t>(matrices * rows * kTileN) * sizeof(float));
  *acc = reinterpret_cast<float*>(p + pointer_bytes);
  return reinterpret_cast<const uint16_t**>(p);
}

template <class Converter>
void gate_up(const MoeGateUpCall& call) {
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  float* acc_base;
  const uint16_t** x = row_buffers(call.m, 2, &acc_base);
  for (int64_t r = 0; r < call.m; ++r) x[r] = static_cast<const uint16_t*>(call.a) + call.a_rows[r] * call.lda;
  float* acc[2] = {acc_base, acc_base + call.m * kTileN};
  const void* tiles[2] = {call.w1, call.w3};
  reduce_all_blocks<2, kUpRows, Converter>(x, call.m, call.K, tiles, np, acc);
  for (int64_t r = 0; r < call.m; ++r) {
    uint16_t* out = static_cast<uint16_t*>(call.act) + r * call.ld_act;
    const float* g = acc[0] + r * kTileN;
    const float* u = acc[1] + r * kTileN;
    for (int64_t c = 0; c < call.n; ++c) out[c] = f32_to_bf16(g[c] / (1.0f + std::exp(-g[c])) * u[c]);
  }
}

template <class Converter>
void down(const MoeDownCall& call) {
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  float* acc;
  const uint16_t** x = row_buffers(call.m, 1, &acc);
  for (int64_t r = 0; r < call.m; ++r) x[r] = static_cast<const uint16_t*>(call.act) + r * call.ld_act;
  const void* tiles[1] = {call.w2};
  reduce_all_blocks<1, kDownRows, Converter>(x, call.m, call.K, tiles, np, &acc);
  for (int64_t r = 0; r < call.m; ++r) {  // in row order: rows may share a token
    float* out = call.out + call.out_rows[r] * call.ld_out;
    const float* d = acc + r * kTileN;
    for (int64_t c = 0; c < call.n; ++c) out[c] += call.row_weight[r] * d[c];
  }
}

template <class Converter>
MoeMicrokernel make_microkernel(const char* name) {
  MoeMicrokernel k{};
  k.name = name;
  k.weight_dtype = MOEKIT_FP8_E4M3;
  k.layout = MOEKIT_LAYOUT_VNNI;
  k.a_dtype = MOEKIT_BF16;
  k.pad_a = false;
  k.block_m = 64;
  k.gate_up_n = kTileN;
  k.down_n = kTileN;
  k.weight_tile = fp8_vnni_weight_tile;
  k.gate_up = gate_up<Converter>;
  k.down = down<Converter>;
  return k;
}

}  // namespace fp8_moe
}  // namespace
}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_FP8_MOE_AVX512_H_
