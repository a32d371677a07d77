// Fused-MoE microkernels for AVX-512-BF16: bf16 activations x bf16 VNNI weights -> f32 with
// _mm512_dpbf16_ps (one instruction does 16 columns x 2 K values). The intermediate
// silu(gate) * up is rounded to bf16 (RNE) to feed the down GEMM.
//
// Register tiles: gate_up keeps MR x 2 panels of gate and of up accumulators (6 x 4 = 24 zmm),
// down keeps MR x 4 panels (24 zmm); each weight vector loaded is used by MR rows, each
// broadcast activation pair by every panel.
#include <immintrin.h>

// GCC 12 reports the deliberately undefined inputs inside its own AVX-512 intrinsics headers
// (_mm512_undefined_*) as uninitialized at -O3 (a false positive); silence it for this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>

#include "kernels/moe/moe_microkernel.h"
#include "kernels/moe/moe_simd_avx512-inl.h"

namespace moekit {
namespace {

constexpr int kMaxRows = 6;
constexpr int kUpPanels = 2;                 // gate_up tile: 32 columns of gate and of up
constexpr int kDownPanels = 4;               // down tile: 64 columns
constexpr int64_t kPanelWords = kMoePanelN;  // 32-bit words per K pair row of a panel

// The activation pair {x[2kk], x[2kk+1]} broadcast to every lane.
inline __m512bh pair_at(const uint16_t* x, int64_t kk) {
  int32_t word;
  std::memcpy(&word, x + 2 * kk, sizeof word);
  return (__m512bh)_mm512_set1_epi32(word);
}
// The last pair of an odd K: {x[K-1], 0}; never reads past the row.
inline __m512bh last_pair(const uint16_t* x, int64_t K) {
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[K - 1]));
}
inline __m512bh panel_pair(const uint16_t* panel, int64_t kk) {
  return (__m512bh)_mm512_loadu_si512(panel + kk * 2 * kPanelWords);
}

// gate/up over all K for MR rows and NP panels; epilogue silu(gate) * up -> bf16 act.
template <int MR, int NP>
void gate_up_tile(const uint16_t* const* x, int64_t K, const uint16_t* w1, const uint16_t* w3,
                  int64_t panel_elems, int64_t n, uint16_t* act, int64_t ld_act) {
  __m512 g[MR][NP], u[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) g[r][p] = u[r][p] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kk = 0; kk < pairs; ++kk) {
    __m512bh b1[NP], b3[NP];
    for (int p = 0; p < NP; ++p) {
      b1[p] = panel_pair(w1 + p * panel_elems, kk);
      b3[p] = panel_pair(w3 + p * panel_elems, kk);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = pair_at(x[r], kk);
      for (int p = 0; p < NP; ++p) {
        g[r][p] = _mm512_dpbf16_ps(g[r][p], av, b1[p]);
        u[r][p] = _mm512_dpbf16_ps(u[r][p], av, b3[p]);
      }
    }
  }
  if (K & 1)
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = last_pair(x[r], K);
      for (int p = 0; p < NP; ++p) {
        g[r][p] = _mm512_dpbf16_ps(g[r][p], av, panel_pair(w1 + p * panel_elems, pairs));
        u[r][p] = _mm512_dpbf16_ps(u[r][p], av, panel_pair(w3 + p * panel_elems, pairs));
      }
    }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p)
      avx512::store_act(act + r * ld_act + p * kMoePanelN, true, avx512::silu_mul(g[r][p], u[r][p]),
                        n - p * kMoePanelN);
}

template <int MR, int NP>
void down_tile(const uint16_t* act, int64_t ld_act, int64_t K, const uint16_t* w2,
               int64_t panel_elems, int64_t n, const float* row_weight, float* out, int64_t ld_out,
               const int32_t* out_rows) {
  __m512 c[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) c[r][p] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kk = 0; kk < pairs; ++kk) {
    __m512bh b[NP];
    for (int p = 0; p < NP; ++p) b[p] = panel_pair(w2 + p * panel_elems, kk);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = pair_at(act + r * ld_act, kk);
      for (int p = 0; p < NP; ++p) c[r][p] = _mm512_dpbf16_ps(c[r][p], av, b[p]);
    }
  }
  if (K & 1)
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = last_pair(act + r * ld_act, K);
      for (int p = 0; p < NP; ++p)
        c[r][p] = _mm512_dpbf16_ps(c[r][p], av, panel_pair(w2 + p * panel_elems, pairs));
    }
  for (int r = 0; r < MR; ++r) {  // rows in order: rows of one call may share a token
    float* dst = out + out_rows[r] * ld_out;
    const __m512 weight = _mm512_set1_ps(row_weight[r]);
    for (int p = 0; p < NP; ++p) {
      const __mmask16 mask = avx512::lanes(n - p * kMoePanelN);
      const __m512 prev = _mm512_maskz_loadu_ps(mask, dst + p * kMoePanelN);
      _mm512_mask_storeu_ps(dst + p * kMoePanelN, mask, _mm512_fmadd_ps(weight, c[r][p], prev));
    }
  }
}

// Tables of the instantiations: [rows - 1][panels - 1].
using GateUpFn = void (*)(const uint16_t* const*, int64_t, const uint16_t*, const uint16_t*,
                          int64_t, int64_t, uint16_t*, int64_t);
using DownFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t,
                        const float*, float*, int64_t, const int32_t*);

template <int MR>
struct Row {
  static constexpr GateUpFn up[kUpPanels] = {gate_up_tile<MR, 1>, gate_up_tile<MR, 2>};
  static constexpr DownFn down[kDownPanels] = {down_tile<MR, 1>, down_tile<MR, 2>, down_tile<MR, 3>,
                                               down_tile<MR, 4>};
};
const GateUpFn* const kGateUp[kMaxRows] = {Row<1>::up, Row<2>::up, Row<3>::up,
                                           Row<4>::up, Row<5>::up, Row<6>::up};
const DownFn* const kDown[kMaxRows] = {Row<1>::down, Row<2>::down, Row<3>::down,
                                       Row<4>::down, Row<5>::down, Row<6>::down};

int64_t panels_of(int64_t n) { return (n + kMoePanelN - 1) / kMoePanelN; }

void gate_up(const MoeGateUpCall& call) {
  const int64_t panel_elems = vnni_padded_k(call.K) * kMoePanelN;
  const GateUpFn* fns = nullptr;
  const int64_t np = panels_of(call.n);
  const auto* w1 = static_cast<const uint16_t*>(call.w1);
  const auto* w3 = static_cast<const uint16_t*>(call.w3);
  for (int64_t r0 = 0; r0 < call.m; r0 += kMaxRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, call.m - r0));
    const uint16_t* x[kMaxRows];
    for (int r = 0; r < mr; ++r)
      x[r] = static_cast<const uint16_t*>(call.a) + call.a_rows[r0 + r] * call.lda;
    fns = kGateUp[mr - 1];
    fns[np - 1](x, call.K, w1, w3, panel_elems, call.n,
                static_cast<uint16_t*>(call.act) + r0 * call.ld_act, call.ld_act);
  }
}

void down(const MoeDownCall& call) {
  const int64_t panel_elems = vnni_padded_k(call.K) * kMoePanelN;
  const int64_t np = panels_of(call.n);
  for (int64_t r0 = 0; r0 < call.m; r0 += kMaxRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, call.m - r0));
    kDown[mr - 1][np - 1](static_cast<const uint16_t*>(call.act) + r0 * call.ld_act, call.ld_act,
                          call.K, static_cast<const uint16_t*>(call.w2), panel_elems, call.n,
                          call.row_weight + r0, call.out, call.ld_out, call.out_rows + r0);
  }
}

}  // namespace

const MoeMicrokernel& moe_microkernel_bf16_avx512bf16() {
  static const MoeMicrokernel uk = [] {
    MoeMicrokernel k{};
    k.name = "fused_moe_bf16_avx512bf16_vnni";
    k.weight_dtype = MOEKIT_BF16;
    k.layout = MOEKIT_LAYOUT_VNNI;
    k.a_dtype = MOEKIT_BF16;
    k.pad_a = false;
    k.block_m = 128;
    k.gate_up_n = kUpPanels * kMoePanelN;
    k.down_n = kDownPanels * kMoePanelN;
    k.weight_tile = vnni_weight_tile;
    k.gate_up = gate_up;
    k.down = down;
    return k;
  }();
  return uk;
}

}  // namespace moekit
