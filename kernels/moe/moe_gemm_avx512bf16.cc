// Fused-MoE microkernels for AVX-512-BF16: bf16 activations x bf16 VNNI weights -> f32 with
// _mm512_dpbf16_ps (one instruction does 16 columns x 2 K values), and, for calls of at least
// bf16_fma_min_rows() rows, f32 FMA over the weights widened to f32 one K chunk at a time (see
// the NOTE in moe_microkernel.h). The intermediate silu(gate) * up is rounded to bf16 (RNE) to
// feed the down GEMM.
//
// Register tiles: gate_up keeps MR x 2 panels of gate and of up accumulators (6 x 4 = 24 zmm),
// down keeps MR x 4 panels (24 zmm); each weight vector loaded is used by MR rows, each
// broadcast activation pair by every panel. The FMA path keeps 6 rows x 4 vectors.
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

// ---- prefill segments: f32 FMA over weights widened one K chunk at a time -----------------
// On cores where VDPBF16PS runs at half the FLOP rate of f32 FMA (the Intel cores measured;
// bench_ceilings: BM_Avx512Bf16Peak against BM_Avx512FmaPeak), a segment with enough rows runs
// faster as FMA over weights widened to f32 once and then shared by every row. A chunk of
// kFmaChunkK values of K of the tile's weight vectors is widened into an L1-sized buffer, the
// segment's rows of A for that chunk are widened beside it, and each block of kFmaRows rows adds
// the chunk's products to its f32 sums in the scratch; after the last chunk the epilogue reads the
// sums. bf16 products are exact in f32, so the result differs from the VDPBF16PS kernel's only in
// the order of the additions.

// 4 vectors x 16 columns x 64 K x 4 bytes: 16 KiB of weights, in L1 beside the rows' chunk.
// (128 measured 10-30% slower for 8-32 rows, 256 slower still.)
constexpr int64_t kFmaChunkK = 64;
constexpr int kFmaRows = 6;        // 6 rows x 4 vectors: 24 zmm accumulators
constexpr int kFmaMaxVectors = 4;  // gate_up: 2 panels of w1 and of w3; down: 4 panels of w2

// Vectors [0, nv) of 16 columns, K values [k0, k0 + kc) (k0 and kc even) of the VNNI panels at
// panel[v], widened to f32 at wide[(k - k0) * nv * 16 + v * 16]. Padding K is zero in the panels.
void widen_weight_chunk(const uint16_t* const* panel, int nv, int64_t k0, int64_t kc, float* wide) {
  for (int64_t kk = 0; kk < kc / 2; ++kk) {
    float* even = wide + 2 * kk * nv * kMoePanelN;
    float* odd = even + nv * kMoePanelN;
    for (int v = 0; v < nv; ++v) {
      __m512 e, o;
      avx512::bf16_pairs_to_f32(_mm512_loadu_si512(panel[v] + (k0 / 2 + kk) * 2 * kPanelWords), &e,
                                &o);
      _mm512_storeu_ps(even + v * kMoePanelN, e);
      _mm512_storeu_ps(odd + v * kMoePanelN, o);
    }
  }
}

// Values [k0, k0 + kc) of each of m bf16 rows, widened to f32 at dst[r * kc + (k - k0)]; values
// at or past K (the row's end) are zero and are not read.
void widen_rows_chunk(const uint16_t* const* row, int64_t m, int64_t K, int64_t k0, int64_t kc,
                      float* dst) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < kc; j += 16) {
      const __mmask16 mask = avx512::lanes(K - (k0 + j));
      _mm512_storeu_ps(dst + r * kc + j,
                       avx512::bf16x16_to_f32(_mm256_maskz_loadu_epi16(mask, row[r] + k0 + j)));
    }
}

// sums[r][v] (+)= a[r][0..kc) . wide[0..kc)[v] for MR rows and NV vectors of 16 columns; sums
// rows hold NV vectors. `first`: the sums start at zero.
template <int MR, int NV>
void fma_block(const float* a, int64_t kc, const float* wide, float* sums, bool first) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + (r * NV + v) * kMoePanelN);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wide + (k * NV + v) * kMoePanelN);
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * kc + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(sums + (r * NV + v) * kMoePanelN, acc[r][v]);
}

using FmaBlockFn = void (*)(const float*, int64_t, const float*, float*, bool);
template <int MR>
struct FmaRow {
  static constexpr FmaBlockFn fns[kFmaMaxVectors] = {fma_block<MR, 1>, fma_block<MR, 2>,
                                                     fma_block<MR, 3>, fma_block<MR, 4>};
};
const FmaBlockFn* const kFmaBlock[kFmaRows] = {FmaRow<1>::fns, FmaRow<2>::fns, FmaRow<3>::fns,
                                               FmaRow<4>::fns, FmaRow<5>::fns, FmaRow<6>::fns};

constexpr int64_t kFmaBlockRows = 128;  // rows whose A chunk and sums the scratch holds at once

// The per-thread scratch of the FMA path (kMoeFmaScratchBytes, which moe_tile_scratch_bytes
// covers): the widened weight chunk, a chunk of kFmaBlockRows rows of A, and their sums.
struct FmaScratch {
  float* wide;
  float* a;
  float* sums;
  explicit FmaScratch(void* scratch)
      : wide(static_cast<float*>(scratch)),
        a(wide + kFmaChunkK * kFmaMaxVectors * kMoePanelN),
        sums(a + kFmaBlockRows * kFmaChunkK) {}
};

// The f32 sums over all K of m <= kFmaBlockRows rows against nv weight vectors, into
// s.sums[r * nv * 16 + v * 16].
void fma_sums(const uint16_t* const* row, int64_t m, int64_t K, const uint16_t* const* panel,
              int nv, const FmaScratch& s) {
  const int64_t padded_k = vnni_padded_k(K);
  for (int64_t k0 = 0; k0 < padded_k; k0 += kFmaChunkK) {
    const int64_t kc = std::min(kFmaChunkK, padded_k - k0);
    widen_weight_chunk(panel, nv, k0, kc, s.wide);
    widen_rows_chunk(row, m, K, k0, kc, s.a);
    // Blocks of equal rows (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2): a block of few rows has
    // too few accumulators to hide the FMA latency and loads its weights for few FMAs.
    const int64_t blocks = (m + kFmaRows - 1) / kFmaRows;
    // The next chunk's weights (one 64-byte line per K pair and vector) are requested while
    // this chunk computes, a share before each block: widening is where the weights are first
    // read, and without this it waits on memory for a third of the kernel's time. (Spreading
    // the requests over the blocks' K steps instead measured slower.)
    const int64_t next_pairs = std::min(kFmaChunkK, padded_k - (k0 + kc)) / 2;
    const int64_t lines = next_pairs * nv;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t l = lines * b / blocks; l < lines * (b + 1) / blocks; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(panel[l % nv] +
                                                   ((k0 + kc) / 2 + l / nv) * 2 * kPanelWords),
                     _MM_HINT_T0);
      const int64_t r0 = m * b / blocks, mr = m * (b + 1) / blocks - r0;
      kFmaBlock[mr - 1][nv - 1](s.a + r0 * kc, kc, s.wide, s.sums + r0 * nv * kMoePanelN, k0 == 0);
    }
  }
}

void gate_up_fma(const MoeGateUpCall& call) {
  const int np = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN), nv = 2 * np;
  const int64_t panel_elems = vnni_padded_k(call.K) * kMoePanelN;
  const uint16_t* panel[kFmaMaxVectors];
  for (int p = 0; p < np; ++p) {
    panel[p] = static_cast<const uint16_t*>(call.w1) + p * panel_elems;
    panel[np + p] = static_cast<const uint16_t*>(call.w3) + p * panel_elems;
  }
  const FmaScratch s(call.scratch);
  const uint16_t* row[kFmaBlockRows];
  for (int64_t r0 = 0; r0 < call.m; r0 += kFmaBlockRows) {
    const int64_t m = std::min(kFmaBlockRows, call.m - r0);
    for (int64_t r = 0; r < m; ++r)
      row[r] = static_cast<const uint16_t*>(call.a) + call.a_rows[r0 + r] * call.lda;
    fma_sums(row, m, call.K, panel, nv, s);
    uint16_t* act = static_cast<uint16_t*>(call.act) + r0 * call.ld_act;
    for (int64_t r = 0; r < m; ++r)
      for (int p = 0; p < np; ++p) {
        const float* sum = s.sums + (r * nv + p) * kMoePanelN;
        avx512::store_act(
            act + r * call.ld_act + p * kMoePanelN, true,
            avx512::silu_mul(_mm512_loadu_ps(sum), _mm512_loadu_ps(sum + np * kMoePanelN)),
            call.n - p * kMoePanelN);
      }
  }
}

void down_fma(const MoeDownCall& call) {
  const int nv = static_cast<int>((call.n + kMoePanelN - 1) / kMoePanelN);
  const int64_t panel_elems = vnni_padded_k(call.K) * kMoePanelN;
  const uint16_t* panel[kFmaMaxVectors];
  for (int v = 0; v < nv; ++v) panel[v] = static_cast<const uint16_t*>(call.w2) + v * panel_elems;
  const FmaScratch s(call.scratch);
  const uint16_t* row[kFmaBlockRows];
  for (int64_t r0 = 0; r0 < call.m; r0 += kFmaBlockRows) {
    const int64_t m = std::min(kFmaBlockRows, call.m - r0);
    for (int64_t r = 0; r < m; ++r)
      row[r] = static_cast<const uint16_t*>(call.act) + (r0 + r) * call.ld_act;
    fma_sums(row, m, call.K, panel, nv, s);
    for (int64_t r = 0; r < m; ++r) {  // rows in order: rows of one call may share a token
      float* dst = call.out + call.out_rows[r0 + r] * call.ld_out;
      const __m512 weight = _mm512_set1_ps(call.row_weight[r0 + r]);
      for (int v = 0; v < nv; ++v) {
        const __mmask16 mask = avx512::lanes(call.n - v * kMoePanelN);
        const __m512 prev = _mm512_maskz_loadu_ps(mask, dst + v * kMoePanelN);
        const __m512 sum = _mm512_loadu_ps(s.sums + (r * nv + v) * kMoePanelN);
        _mm512_mask_storeu_ps(dst + v * kMoePanelN, mask, _mm512_fmadd_ps(weight, sum, prev));
      }
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
  if (call.m >= bf16_fma_min_rows()) return gate_up_fma(call);
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
  if (call.m >= bf16_fma_min_rows()) return down_fma(call);
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
