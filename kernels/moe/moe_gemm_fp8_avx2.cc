// Fused-MoE microkernels for FP8 weights on AVX2 + FMA + F16C: f32 activations x FP8 VNNI
// weights (fp8_vnni.h), dequantized through F16C (fp8_convert_avx2.h).
//
// NOTE: as in the AVX-512-BF16 kernel, each K block of the tile is converted once per call
// (fp8 -> f32, exact, unscaled) into a buffer, every row group reduces the block from it into
// zeroed registers, and the partial sums are added times the block scale into f32 accumulators
// in memory. The buffer keeps the VNNI pair order, so a register holds 4 outputs x 2 K values
// and is multiplied by the broadcast activation pair {x[2kk], x[2kk+1]}; the two halves of each
// output are added in the epilogue.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/moe/fp8_convert_avx2.h"
#include "kernels/moe/fp8_vnni.h"

namespace moekit {
namespace {

constexpr int kMaxPanels = 4;
constexpr int kMaxRows = 3;  // register tile: 3 rows x 1 panel x 4 ymm = 12 accumulators
constexpr int64_t kPairValues = 2 * kMoePanelN;  // values of one K pair of a panel (32)
constexpr int64_t kTileN = kMaxPanels * kMoePanelN;
constexpr int64_t kAccRow = 2 * kTileN;  // pair-lane accumulators per row and matrix

// Converts pairs [kk0, kk1) of `panels` panels of `tile` to f32: buf[p][kk - kk0][32].
void convert_block(const unsigned char* tile, int64_t panel_bytes, size_t header_bytes,
                   int panels, Fp8PairRange r, float* buf) {
  const int64_t pairs = r.kk1 - r.kk0;
  for (int p = 0; p < panels; ++p) {
    const uint8_t* src = tile + p * panel_bytes + header_bytes + r.kk0 * kPairValues;
    float* dst = buf + p * pairs * kPairValues;
    for (int64_t j = 0; j < 2 * pairs; ++j) {  // 16 bytes per step
      __m256 lo, hi;
      fp8_avx2::to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j * 16)), &lo, &hi);
      _mm256_store_ps(dst + j * 16, lo);
      _mm256_store_ps(dst + j * 16 + 8, hi);
    }
  }
}

inline __m256 pair_at(const float* x, int64_t kk) {
  return _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x + 2 * kk)));
}

// One K block, one panel, MR rows: acc[r * kAccRow + 0..31] += partial * scale.
template <int MR>
void block_panel(const float* const* x, int64_t K, Fp8PairRange range, const float* buf,
                 float scale, float* acc) {
  __m256 s[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) s[r][q] = _mm256_setzero_ps();
  const auto step = [&](const float* w, const __m256* av) {
    for (int q = 0; q < 4; ++q) {
      const __m256 wq = _mm256_load_ps(w + 8 * q);
      for (int r = 0; r < MR; ++r) s[r][q] = _mm256_fmadd_ps(av[r], wq, s[r][q]);
    }
  };
  const int64_t full_end = std::min(range.kk1, K / 2);
  __m256 av[MR];
  for (int64_t kk = range.kk0; kk < full_end; ++kk) {
    for (int r = 0; r < MR; ++r) av[r] = pair_at(x[r], kk);
    step(buf + (kk - range.kk0) * kPairValues, av);
  }
  if (full_end < range.kk1) {  // odd K: {x[K-1], 0}
    for (int r = 0; r < MR; ++r) av[r] = _mm256_setr_ps(x[r][K - 1], 0, x[r][K - 1], 0, x[r][K - 1], 0, x[r][K - 1], 0);
    step(buf + (full_end - range.kk0) * kPairValues, av);
  }
  const __m256 sv = _mm256_set1_ps(scale);
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) {
      float* a = acc + r * kAccRow + 8 * q;
      _mm256_store_ps(a, _mm256_fmadd_ps(s[r][q], sv, _mm256_load_ps(a)));
    }
}

using BlockPanelFn = void (*)(const float* const*, int64_t, Fp8PairRange, const float*, float, float*);
constexpr BlockPanelFn kBlockPanel[kMaxRows] = {block_panel<1>, block_panel<2>, block_panel<3>};

// Scaled sums of matrix `tile` over rows x[0..rows) into acc (rows x kAccRow, pair lanes).
void reduce_all_blocks(const float* const* x, int64_t rows, int64_t K, const void* tile, int np,
                       float* acc) {
  const Fp8PanelHeader& h = fp8_panel_header(tile);
  const size_t header_bytes = fp8_panel_header_bytes(K, h.block_k);
  const int64_t max_pairs = std::min<int64_t>(h.block_k / 2, vnni_padded_k(K) / 2);
  float* buf = reinterpret_cast<float*>(
      fp8_thread_buffer(0, static_cast<size_t>(kMaxPanels * max_pairs * kPairValues) * 4));
  std::memset(acc, 0, static_cast<size_t>(rows * kAccRow) * 4);
  const auto* base = static_cast<const unsigned char*>(tile);
  for (int64_t kb = 0; kb < h.num_kb; ++kb) {
    const Fp8PairRange range = fp8_block_pairs(kb, h.block_k, K);
    const int64_t pairs = range.kk1 - range.kk0;
    convert_block(base, h.panel_bytes, header_bytes, np, range, buf);
    for (int p = 0; p < np; ++p) {
      const float scale = fp8_panel_scales(base + p * h.panel_bytes)[kb];
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
        kBlockPanel[mr - 1](x + r0, K, range, buf + p * pairs * kPairValues, scale,
                            acc + r0 * kAccRow + p * kPairValues);
      }
    }
  }
}

// Row pointers and `matrices` accumulator blocks (rows x kAccRow f32), 64-byte aligned.
const float** row_buffers(int64_t rows, int matrices, float** acc) {
  const size_t pointer_bytes = (static_cast<size_t>(rows) * sizeof(void*) + 63) / 64 * 64;
  unsigned char* p = fp8_thread_buffer(
      1, pointer_bytes + static_cast<size_t>(matrices * rows * kAccRow) * sizeof(float));
  *acc = reinterpret_cast<float*>(p + pointer_bytes);
  return reinterpret_cast<const float**>(p);
}

void gate_up(const MoeGateUpCall& call) {
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  float* acc;
  const float** x = row_buffers(call.m, 2, &acc);
  for (int64_t r = 0; r < call.m; ++r) x[r] = static_cast<const float*>(call.a) + call.a_rows[r] * call.lda;
  float* acc_up = acc + call.m * kAccRow;
  reduce_all_blocks(x, call.m, call.K, call.w1, np, acc);
  reduce_all_blocks(x, call.m, call.K, call.w3, np, acc_up);
  for (int64_t r = 0; r < call.m; ++r) {
    float* out = static_cast<float*>(call.act) + r * call.ld_act;
    const float* g = acc + r * kAccRow;
    const float* u = acc_up + r * kAccRow;
    for (int64_t c = 0; c < call.n; ++c) {
      const float gate = g[2 * c] + g[2 * c + 1], up = u[2 * c] + u[2 * c + 1];
      out[c] = gate / (1.0f + std::exp(-gate)) * up;
    }
  }
}

void down(const MoeDownCall& call) {
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  float* acc;
  const float** x = row_buffers(call.m, 1, &acc);
  for (int64_t r = 0; r < call.m; ++r) x[r] = static_cast<const float*>(call.act) + r * call.ld_act;
  reduce_all_blocks(x, call.m, call.K, call.w2, np, acc);
  for (int64_t r = 0; r < call.m; ++r) {  // in row order: rows may share a token
    float* out = call.out + call.out_rows[r] * call.ld_out;
    const float* d = acc + r * kAccRow;
    for (int64_t c = 0; c < call.n; ++c) out[c] += call.row_weight[r] * (d[2 * c] + d[2 * c + 1]);
  }
}

}  // namespace

const MoeMicrokernel& moe_microkernel_fp8_avx2() {
  static const MoeMicrokernel uk = [] {
    MoeMicrokernel k{};
    k.name = "fused_moe_fp8_avx2_vnni";
    k.weight_dtype = MOEKIT_FP8_E4M3;
    k.layout = MOEKIT_LAYOUT_VNNI;
    k.a_dtype = MOEKIT_F32;
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
