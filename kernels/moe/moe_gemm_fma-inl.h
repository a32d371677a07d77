// Fused-MoE microkernels on f32 FMA, written once over a vector traits class V and compiled
// for AVX-512 (moe_gemm_avx512.cc) and AVX2 (moe_gemm_avx2.cc). Weights are f32 or bf16 in
// the VNNI layout; bf16 weights are widened exactly to f32 (a bf16 is the high half of an f32),
// activations and the intermediate are f32.
//
// V provides: F (vector of kLanes floats), zero(), set1(float), load(const float*),
// widen(const uint16_t* pairs, F* even, F* odd) (kLanes columns x 2 K values of a bf16 panel
// row), fmadd(a, b, c) = a*b+c, silu_mul(gate, up), store(float*, F, n lanes),
// add_scaled(float* dst, float w, F v, n lanes): dst += w * v.
// Tile shape from V: kUpRows x kUpPanels panels for gate_up, kDownRows x kDownPanels for down.
#ifndef MOEKIT_KERNELS_MOE_MOE_GEMM_FMA_INL_H_
#define MOEKIT_KERNELS_MOE_MOE_GEMM_FMA_INL_H_

#include <algorithm>
#include <cstdint>

#include "kernels/moe/moe_microkernel.h"

namespace moekit {
// Internal linkage: each including translation unit has its own ISA flags (see
// moe_simd_avx512-inl.h).
namespace {
namespace fma_kernels {

template <class V>
constexpr int vectors_per_panel() {
  return static_cast<int>(kMoePanelN) / V::kLanes;
}

// Accumulates sum_k x[r][k] * W[c][k] for MR rows into acc[r][v] (NV vectors of columns) of
// one or two matrices (TWO: gate and up together, sharing the activation broadcasts).
template <class V, moekit_dtype kW, int MR, int NV, bool TWO>
inline void accumulate(const float* const* x, int64_t K, const void* wa, const void* wb,
                       int64_t panel_elems, typename V::F (*acc_a)[NV],
                       typename V::F (*acc_b)[NV]) {
  using F = typename V::F;
  constexpr int VP = vectors_per_panel<V>();
  if constexpr (kW == MOEKIT_F32) {
    const float* pa = static_cast<const float*>(wa);
    const float* pb = static_cast<const float*>(wb);
    for (int64_t kx = 0; kx < K; ++kx) {
      F ba[NV], bb[NV];
      for (int v = 0; v < NV; ++v) {
        const int64_t at = (v / VP) * panel_elems + kx * kMoePanelN + (v % VP) * V::kLanes;
        ba[v] = V::load(pa + at);
        if constexpr (TWO) bb[v] = V::load(pb + at);
      }
      for (int r = 0; r < MR; ++r) {
        const F xv = V::set1(x[r][kx]);
        for (int v = 0; v < NV; ++v) {
          acc_a[r][v] = V::fmadd(xv, ba[v], acc_a[r][v]);
          if constexpr (TWO) acc_b[r][v] = V::fmadd(xv, bb[v], acc_b[r][v]);
        }
      }
    }
  } else {
    const uint16_t* pa = static_cast<const uint16_t*>(wa);
    const uint16_t* pb = static_cast<const uint16_t*>(wb);
    // One K pair of every panel; `odd` is false only for the single last value of an odd K.
    const auto pair_step = [&](int64_t kk, bool odd) {
      for (int v = 0; v < NV; ++v) {
        const int64_t at = (v / VP) * panel_elems + kk * 2 * kMoePanelN + (v % VP) * 2 * V::kLanes;
        F ea, oa, eb, ob;
        V::widen(pa + at, &ea, &oa);
        if constexpr (TWO) V::widen(pb + at, &eb, &ob);
        for (int r = 0; r < MR; ++r) {
          const F x0 = V::set1(x[r][2 * kk]);
          acc_a[r][v] = V::fmadd(x0, ea, acc_a[r][v]);
          if constexpr (TWO) acc_b[r][v] = V::fmadd(x0, eb, acc_b[r][v]);
          if (odd) {
            const F x1 = V::set1(x[r][2 * kk + 1]);
            acc_a[r][v] = V::fmadd(x1, oa, acc_a[r][v]);
            if constexpr (TWO) acc_b[r][v] = V::fmadd(x1, ob, acc_b[r][v]);
          }
        }
      }
    };
    const int64_t pairs = K / 2;
    for (int64_t kk = 0; kk < pairs; ++kk) pair_step(kk, true);
    if (K & 1) pair_step(pairs, false);
  }
}

template <class V, moekit_dtype kW, int MR, int NP>
void gate_up_tile(const float* const* x, int64_t K, const void* w1, const void* w3,
                  int64_t panel_elems, int64_t n, float* act, int64_t ld_act) {
  using F = typename V::F;
  constexpr int NV = NP * vectors_per_panel<V>();
  F g[MR][NV], u[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) g[r][v] = u[r][v] = V::zero();
  accumulate<V, kW, MR, NV, true>(x, K, w1, w3, panel_elems, g, u);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      V::store(act + r * ld_act + v * V::kLanes, V::silu_mul(g[r][v], u[r][v]), n - v * V::kLanes);
}

template <class V, moekit_dtype kW, int MR, int NP>
void down_tile(const float* act, int64_t ld_act, int64_t K, const void* w2, int64_t panel_elems,
               int64_t n, const float* row_weight, float* out, int64_t ld_out,
               const int32_t* out_rows) {
  using F = typename V::F;
  constexpr int NV = NP * vectors_per_panel<V>();
  F c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = V::zero();
  const float* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = act + r * ld_act;
  accumulate<V, kW, MR, NV, false>(x, K, w2, nullptr, panel_elems, c, nullptr);
  for (int r = 0; r < MR; ++r)  // rows in order: rows of one call may share a token
    for (int v = 0; v < NV; ++v)
      V::add_scaled(out + out_rows[r] * ld_out + v * V::kLanes, row_weight[r], c[r][v],
                    n - v * V::kLanes);
}

using GateUpFn = void (*)(const float* const*, int64_t, const void*, const void*, int64_t, int64_t,
                          float*, int64_t);
using DownFn = void (*)(const float*, int64_t, int64_t, const void*, int64_t, int64_t, const float*,
                        float*, int64_t, const int32_t*);

// The instantiation for (rows, panels) chosen at run time; MR rows fixed at compile time by
// recursion over the remainders.
template <class V, moekit_dtype kW, int MR, int NP>
GateUpFn pick_gate_up(int rows, int panels) {
  if constexpr (NP > 1)
    if (panels < NP) return pick_gate_up<V, kW, MR, NP - 1>(rows, panels);
  if constexpr (MR > 1)
    if (rows < MR) return pick_gate_up<V, kW, MR - 1, NP>(rows, panels);
  return gate_up_tile<V, kW, MR, NP>;
}

template <class V, moekit_dtype kW, int MR, int NP>
DownFn pick_down(int rows, int panels) {
  if constexpr (NP > 1)
    if (panels < NP) return pick_down<V, kW, MR, NP - 1>(rows, panels);
  if constexpr (MR > 1)
    if (rows < MR) return pick_down<V, kW, MR - 1, NP>(rows, panels);
  return down_tile<V, kW, MR, NP>;
}

inline int panels_of(int64_t n) { return static_cast<int>((n + kMoePanelN - 1) / kMoePanelN); }

// Rows from which a bf16 tile is widened to f32 once (into the per-thread scratch, where it
// stays in L2) instead of on every pass of the register tile over K: widening costs two vector
// ALU operations per weight vector, which compete with the FMAs for the same ports.
constexpr int64_t kWidenMinRows = 8;

// bf16 VNNI panels -> f32 VNNI panels (exactly), `panels` panels of K.
template <class V>
void widen_tile(const uint16_t* src, int64_t panels, int64_t K, float* dst) {
  constexpr int VP = vectors_per_panel<V>();
  const int64_t panel_elems = vnni_padded_k(K) * kMoePanelN;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t kk = 0; kk < (K + 1) / 2; ++kk)
      for (int v = 0; v < VP; ++v) {
        typename V::F even, odd;
        V::widen(src + p * panel_elems + kk * 2 * kMoePanelN + v * 2 * V::kLanes, &even, &odd);
        float* row = dst + p * panel_elems + 2 * kk * kMoePanelN + v * V::kLanes;
        V::store(row, even, V::kLanes);
        V::store(row + kMoePanelN, odd, V::kLanes);
      }
}

template <class V, moekit_dtype kW>
void gate_up(const MoeGateUpCall& call) {
  if constexpr (kW == MOEKIT_BF16) {
    if (call.m >= kWidenMinRows) {
      const int64_t panels = panels_of(call.n), panel_elems = vnni_padded_k(call.K) * kMoePanelN;
      float* w1 = static_cast<float*>(call.scratch);
      float* w3 = w1 + panels * panel_elems;
      widen_tile<V>(static_cast<const uint16_t*>(call.w1), panels, call.K, w1);
      widen_tile<V>(static_cast<const uint16_t*>(call.w3), panels, call.K, w3);
      MoeGateUpCall widened = call;
      widened.w1 = w1;
      widened.w3 = w3;
      gate_up<V, MOEKIT_F32>(widened);
      return;
    }
  }
  const int64_t panel_elems = vnni_padded_k(call.K) * kMoePanelN;
  const int np = panels_of(call.n);
  for (int64_t r0 = 0; r0 < call.m; r0 += V::kUpRows) {
    const int mr = static_cast<int>(std::min<int64_t>(V::kUpRows, call.m - r0));
    const float* x[V::kUpRows];
    for (int r = 0; r < mr; ++r)
      x[r] = static_cast<const float*>(call.a) + call.a_rows[r0 + r] * call.lda;
    pick_gate_up<V, kW, V::kUpRows, V::kUpPanels>(mr, np)(
        x, call.K, call.w1, call.w3, panel_elems, call.n,
        static_cast<float*>(call.act) + r0 * call.ld_act, call.ld_act);
  }
}

template <class V, moekit_dtype kW>
void down(const MoeDownCall& call) {
  if constexpr (kW == MOEKIT_BF16) {
    if (call.m >= kWidenMinRows) {
      float* w2 = static_cast<float*>(call.scratch);
      widen_tile<V>(static_cast<const uint16_t*>(call.w2), panels_of(call.n), call.K, w2);
      MoeDownCall widened = call;
      widened.w2 = w2;
      down<V, MOEKIT_F32>(widened);
      return;
    }
  }
  const int64_t panel_elems = vnni_padded_k(call.K) * kMoePanelN;
  const int np = panels_of(call.n);
  for (int64_t r0 = 0; r0 < call.m; r0 += V::kDownRows) {
    const int mr = static_cast<int>(std::min<int64_t>(V::kDownRows, call.m - r0));
    pick_down<V, kW, V::kDownRows, V::kDownPanels>(mr, np)(
        static_cast<const float*>(call.act) + r0 * call.ld_act, call.ld_act, call.K, call.w2,
        panel_elems, call.n, call.row_weight + r0, call.out, call.ld_out, call.out_rows + r0);
  }
}

template <class V, moekit_dtype kW>
MoeMicrokernel make(const char* name) {
  MoeMicrokernel k{};
  k.name = name;
  k.weight_dtype = kW;
  k.layout = MOEKIT_LAYOUT_VNNI;
  k.a_dtype = MOEKIT_F32;
  k.pad_a = false;
  k.block_m = 128;
  k.gate_up_n = V::kUpPanels * kMoePanelN;
  k.down_n = V::kDownPanels * kMoePanelN;
  k.weight_tile = vnni_weight_tile;
  k.gate_up = gate_up<V, kW>;
  k.down = down<V, kW>;
  return k;
}

}  // namespace fma_kernels
}  // namespace
}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_MOE_GEMM_FMA_INL_H_
