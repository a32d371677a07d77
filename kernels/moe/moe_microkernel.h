// The interface between the generic fused-MoE driver (moe_pipeline.cc) and the per-ISA
// microkernels (moe_gemm_<isa>.cc), plus the MOEKIT_LAYOUT_VNNI weight layout they share.
//
// NOTE (pipeline): fused_moe_pipeline(uk, args) runs every step that does not depend on the ISA:
//   1. align: the routed (token, slot) pairs are counting-sorted by local expert (experts
//      ascending, pairs in (token, slot) order within an expert; map -1 skipped). Rows are
//      compact (no padding rows); each expert's rows are cut into work segments of at most
//      uk.block_m rows. Shared experts (args.shared, S of them) follow as local experts E..E+S-1
//      with one row per token (row weight shared_scale[m] or 1), after every routed row; their
//      segments carry their own inter I_s (gate_up tiles of I_s, down K = I_s), and act rows
//      are wide enough for max(I, I_s).
//   2. A: hidden is used in place when its dtype is uk.a_dtype (and uk.pad_a is off), else it
//      is converted once into the workspace ([M, vnni_padded_k(H)], zero padded, bf16 by RNE).
//      With uk.sorted_a, each chunk's rows are instead converted in sorted row order (one row
//      per routed pair) so that a segment's rows are consecutive: the first chunk's before its
//      gate_up phase, every later chunk's as extra work items at the end of the previous
//      chunk's down phase, which nothing in it reads.
//   3. The rows are processed in chunks of whole segments (at most kMoeChunkRows rows, so the
//      intermediate buffer stays small); per chunk, inside one OpenMP region:
//      gate_up phase: work items (segment, column tile of I, gate_up_n wide), dynamic schedule;
//        uk.gate_up writes act = silu(x.w1) * (x.w3) for the tile, in uk.a_dtype.
//      down phase: work items are column tiles of H (down_n wide, half that over the last
//        quarter of H so that the phase ends on short items); each item walks the chunk's
//        segments in order and uk.down adds row_weight * (act.w2) into the f32 accumulator row
//        of each row's token. Each output element has exactly one writer, and the order of its
//        additions is the row order of the alignment, whatever the thread count: the result is
//        bit-identical for any number of threads, with no atomics.
//   4. The last chunk's down items write their columns of out (f32 accumulates in place; bf16
//      output is accumulated in an f32 workspace buffer and rounded once, RNE).
// Decode (few rows) gets parallelism from the column tiles: every active expert's weights are
// split across all threads.
//
// NOTE (VNNI layout): a matrix W [N][K] (N outputs, K the reduction) is stored as panels of
// kMoePanelN = 16 consecutive outputs. N is padded to a multiple of 16 and K to a multiple of
// kMoePanelK = 32 with zeros. Within panel p (outputs 16p..16p+15), elements are grouped in
// 32-bit words along K: for bf16, word (kk, n) = {W[16p+n][2kk], W[16p+n][2kk+1]} at bf16 index
// kk*32 + n*2 + i (the pairing _mm512_dpbf16_ps and TDPBF16PS want; 16 consecutive kk rows form
// one AMX B tile); for f32, W[16p+n][kk] at index kk*16 + n. Panels are consecutive, so the tile
// of columns [n0, n0+n) (n0 a multiple of 16) starts at panel n0/16 and a kernel streams it
// linearly. w1, w3 and w2 of every expert are packed alike.
#ifndef MOEKIT_KERNELS_MOE_MOE_MICROKERNEL_H_
#define MOEKIT_KERNELS_MOE_MOE_MICROKERNEL_H_

#include <cstddef>
#include <cstdint>

#include "kernels/moe/moe.h"

namespace moekit {

constexpr int64_t kMoePanelN = 16;  // outputs per packed panel
constexpr int64_t kMoePanelK = 32;  // K is padded to a multiple of this
// Rows of one chunk of the pipeline (bounds the intermediate buffer, see moe_workspace_size).
constexpr int64_t kMoeChunkRows = 4096;
// Widest column tile a microkernel may ask for (bounds the per-thread scratch).
constexpr int64_t kMoeMaxTileN = 64;

inline int64_t vnni_padded_k(int64_t K) { return (K + kMoePanelK - 1) / kMoePanelK * kMoePanelK; }
inline int64_t vnni_padded_n(int64_t N) { return (N + kMoePanelN - 1) / kMoePanelN * kMoePanelN; }
// Bytes of one panel (16 outputs x padded K) of a `dtype` matrix (F32 or BF16).
inline size_t vnni_panel_bytes(int64_t K, moekit_dtype dtype) {
  return static_cast<size_t>(vnni_padded_k(K) * kMoePanelN) * (dtype == MOEKIT_F32 ? 4 : 2);
}
inline size_t vnni_matrix_bytes(int64_t N, int64_t K, moekit_dtype dtype) {
  return static_cast<size_t>(vnni_padded_n(N) / kMoePanelN) * vnni_panel_bytes(K, dtype);
}
// Row stride (elements of elem_bytes) of the pipeline's A and intermediate buffers:
// vnni_padded_k(K) rounded up to an odd number of 64-byte lines, so that consecutive rows fall
// in different L1 sets (with a stride of a multiple of 2 KiB, such as 3072 bf16, the 16 rows of
// an AMX tile share two sets; bench_moe_amx BM_AmxGemmL2/lda_pad).
inline int64_t moe_row_stride(int64_t K, int64_t elem_bytes) {
  const int64_t per_line = 64 / elem_bytes;
  int64_t lines = (vnni_padded_k(K) + per_line - 1) / per_line;
  if (lines % 2 == 0) ++lines;
  return lines * per_line;
}
// Packs row-major src [N][K] (F32 or BF16, row stride K) into the VNNI layout at dst
// (vnni_matrix_bytes(N, K, dtype) bytes), and reads row n back as f32.
void vnni_pack_matrix(const void* src, moekit_dtype dtype, int64_t N, int64_t K, void* dst);
void vnni_decode_row(const void* packed, moekit_dtype dtype, int64_t K, int64_t n, float* out);

// gate_up microkernel call: for r < m, c < n:
//   gate = sum_k A[r][k] * W1[n0+c][k],  up = sum_k A[r][k] * W3[n0+c][k]  (f32 accumulation)
//   act[r * ld_act + c] = silu(gate) * up, stored as uk.a_dtype (bf16 rounded to nearest even).
// Row r of A is (a_dtype*)a + a_rows[r] * lda; exactly K elements of it are read (unless the
// kernel sets pad_a, see MoeMicrokernel). w1/w3 point at the tile's first panel (what
// uk.weight_tile returned). Only the n columns of each act row are written.
struct MoeGateUpCall {
  const void* a = nullptr;
  int64_t lda = 0;
  const int32_t* a_rows = nullptr;
  int64_t m = 0;  // rows, >= 1 (at most uk.block_m)
  int64_t K = 0;  // H
  // Set for uk.sorted_a kernels: a_rows[r] == a_rows[0] + r, rows are zero-padded to
  // vnni_padded_k(K), and 2 * kMoePanelN rows past the last one are readable, so the rows can
  // be read in place at stride lda (e.g. as AMX A tiles) without gathering them.
  bool a_consecutive = false;
  const void* w1 = nullptr;
  const void* w3 = nullptr;
  int64_t n = 0;  // columns, 1..uk.gate_up_n
  void* act = nullptr;
  int64_t ld_act = 0;
  void* scratch = nullptr;  // per-thread scratch for the kernel's own use
  size_t scratch_bytes = 0;
};

// down microkernel call: for r < m (in increasing order), c < n:
//   out[out_rows[r] * ld_out + c] += row_weight[r] * sum_k act[r * ld_act + k] * W2[n0+c][k]
// act rows are consecutive (stride ld_act, uk.a_dtype, K = I); exactly K elements of each row
// are read (pad_a kernels may read up to vnni_padded_k(K): the driver zeroes those columns, and
// vnni_padded_n(m) rows are readable). Rows of one call may share a token; their additions
// happen in row order.
struct MoeDownCall {
  const void* act = nullptr;
  int64_t ld_act = 0;
  int64_t m = 0;  // rows, >= 1, any count
  int64_t K = 0;  // I
  const void* w2 = nullptr;
  int64_t n = 0;  // columns, 1..uk.down_n
  const float* row_weight = nullptr;
  float* out = nullptr;  // already offset to column n0
  int64_t ld_out = 0;
  const int32_t* out_rows = nullptr;
  // The weights the same thread's next down call will read (the tile of the next expert in the
  // item), or null: a kernel may pull them toward the cache while it computes.
  const void* w2_next = nullptr;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
};

// One fused-MoE implementation: a layout, tile sizes and two microkernels. The fused_moe table
// wraps it as {name, level, [](a) { return fused_moe_pipeline_supports(uk, a); },
// [](a) { fused_moe_pipeline(uk, a); }}.
struct MoeMicrokernel {
  const char* name;
  moekit_dtype weight_dtype;  // the handle's dtype this kernel reads
  moekit_pack_layout layout;  // the handle's layout this kernel reads
  moekit_dtype a_dtype;       // activations and intermediate: MOEKIT_BF16 or MOEKIT_F32
  bool pad_a;                 // A rows need stride >= vnni_padded_k(K) with zero padding
  // gate_up wants A in the sorted row order (MoeGateUpCall::a_consecutive): the pipeline then
  // converts each chunk's rows of hidden into that order once, instead of the kernel gathering
  // a segment's rows for every column tile. Requires pad_a.
  bool sorted_a;
  int64_t block_m;            // most rows of one gate_up work item
  // Columns of I per gate_up item and of H per down item: multiples of 16, at most
  // kMoeMaxTileN, or wider for kernels whose weight_tile points into the handle and that use
  // no per-column scratch (the per-thread scratch is sized for kMoeMaxTileN columns).
  int64_t gate_up_n;
  int64_t down_n;
  // The packed tile of columns [n0, n0+n) of matrix `which` of expert e, as the microkernels
  // read it: a pointer into the handle (vnni_weight_tile), or a tile decoded into `scratch`
  // (moe_tile_scratch_bytes(K) bytes, per thread; e.g. FP8 dequantized to bf16 panels).
  const void* (*weight_tile)(const moekit_experts& w, int64_t e, ExpertMatrix which, int64_t n0,
                             int64_t n, void* scratch);
  // weight_tile returns pointers into the handle and uses no scratch, so the pipeline may also
  // ask it for the tile of a later call (MoeDownCall::w2_next).
  bool weight_tile_in_place;
  void (*gate_up)(const MoeGateUpCall& call);
  void (*down)(const MoeDownCall& call);
  // Optional (may be null): run by each thread on entering / leaving the parallel region
  // (e.g. AMX tile configuration and release).
  void (*thread_begin)();
  void (*thread_end)();
};

// weight_tile for handles in the VNNI layout: a pointer into the handle, no copy.
const void* vnni_weight_tile(const moekit_experts& w, int64_t e, ExpertMatrix which, int64_t n0,
                             int64_t n, void* scratch);

// Scratch the AVX-512-BF16 microkernel's FMA path needs whatever K (see bf16_fma_min_rows).
constexpr size_t kMoeFmaScratchBytes = 128 * 1024;
// Bytes of one per-thread scratch region: a tile of kMoeMaxTileN columns of K (4 bytes per
// value), and at least kMoeFmaScratchBytes. Each thread gets three regions of K = max(H, I): the
// w1 tile (also used for w2), the w3 tile, and MoeGateUpCall/MoeDownCall::scratch.
size_t moe_tile_scratch_bytes(int64_t K);
// Bytes of the sorted-A piece of the workspace for `rows` routed rows (see moe_workspace_size).
size_t moe_sorted_a_bytes(int64_t rows, int64_t H);

// nullptr when the pipeline with `uk` can serve `a` (layout, dtypes), else why not.
const char* fused_moe_pipeline_supports(const MoeMicrokernel& uk, const FusedMoeArgs& a);
void fused_moe_pipeline(const MoeMicrokernel& uk, const FusedMoeArgs& a);

// NOTE (bf16 FMA path): the AVX-512-BF16 microkernel runs a call of at least
// bf16_fma_min_rows() rows as f32 FMA over weights widened to f32 one K chunk at a time, and
// fewer rows with VDPBF16PS. The Intel cores measured (Sapphire and Emerald Rapids class) issue
// VDPBF16PS at half the FLOP rate of f32 FMA (bench_ceilings: BM_Avx512Bf16Peak against
// BM_Avx512FmaPeak), and from a few rows the widening costs less than it gains; with one or two
// rows both wait on the weights and VDPBF16PS reads them as they are. On other vendors' CPUs
// this is not measured, and VDPBF16PS (twice the work of an FMA per instruction) stays: the
// threshold is "never". The choice depends on the CPU and the shapes only, so results stay
// reproducible.
constexpr int64_t kBf16FmaDefaultMinRows = 8;  // measured with bench_moe, bench/RESULTS.md
constexpr int64_t kBf16FmaNever = INT64_MAX;
// The threshold in force: bf16_fma_set_min_rows(n > 0), else MOEKIT_BF16_FMA_MIN_ROWS (read
// once; "never" or a row count >= 1), else kBf16FmaDefaultMinRows on Intel CPUs and
// kBf16FmaNever on others.
int64_t bf16_fma_min_rows();
// Overrides the threshold for this process (benchmarks, tests); n <= 0 removes the override.
void bf16_fma_set_min_rows(int64_t rows);

// The microkernels of this family (each defined in its ISA's translation unit).
const MoeMicrokernel& moe_microkernel_bf16_avx512bf16();
const MoeMicrokernel& moe_microkernel_bf16_avx512();
const MoeMicrokernel& moe_microkernel_f32_avx512();
const MoeMicrokernel& moe_microkernel_bf16_avx2();
const MoeMicrokernel& moe_microkernel_f32_avx2();
const MoeMicrokernel& moe_microkernel_bf16_scalar();
const MoeMicrokernel& moe_microkernel_f32_scalar();

}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_MOE_MICROKERNEL_H_
