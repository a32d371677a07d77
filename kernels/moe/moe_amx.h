// AMX-BF16 building blocks of the blockwise expert matmul: the MOEKIT_LAYOUT_AMX weight layout,
// the per-thread tile state, GEMM microkernels with the fused-MoE epilogues, and the fused_moe
// entry built on them.
//
// NOTE (layout): a weight matrix W [N][K] (N outputs, K the reduction) is stored as 1 KiB tiles
// ready for tileloadd: N is padded to a multiple of 16 (kAmxTileN), K to a multiple of 32
// (kAmxTileK), and tile (nb, kb) holds W[16nb + n][32kb + 2p + i] at bf16 index p*32 + n*2 + i
// (16 rows of K-pairs, each row 16 columns of 2 bf16: the VNNI pairing TDPBF16PS wants). The
// tiles of one column block are consecutive along K, so a kernel streams each column block
// linearly; padding is zero. w1 and w3 are packed alike, so one pass over column block nb of
// both yields matching gate and up columns.
//
// NOTE (tiles): the kernels use palette 1 with all eight tiles 16 rows x 64 bytes: C0..C3 f32
// accumulators (2 row tiles x 2 column tiles = 32x32 outputs), A0..A1 (16 rows x 32 bf16 of the
// activations), B0..B1 (two weight tiles). The configuration is per thread: the kernels load it
// on first use and AmxTileScope releases it (tilerelease) when the top-level call leaves the
// thread, so the caller never inherits our tile state.
//
// This header contains no intrinsics; it may be included anywhere. The functions below marked
// "AMX" may only be called when the effective level is MOEKIT_ISA_AMX.
#ifndef MOEKIT_KERNELS_MOE_MOE_AMX_H_
#define MOEKIT_KERNELS_MOE_MOE_AMX_H_

#include <cstddef>
#include <cstdint>

#include "moekit/moekit.h"

namespace moekit {

constexpr int64_t kAmxTileM = 16;                         // rows of an A or C tile
constexpr int64_t kAmxTileK = 32;                         // bf16 values per A tile row (64 bytes)
constexpr int64_t kAmxTileN = 16;                         // columns of a B or C tile
constexpr int64_t kAmxTileElems = kAmxTileK * kAmxTileN;  // bf16 values per B tile (1 KiB)

inline int64_t amx_padded_k(int64_t k) { return (k + kAmxTileK - 1) / kAmxTileK * kAmxTileK; }
inline int64_t amx_padded_n(int64_t n) { return (n + kAmxTileN - 1) / kAmxTileN * kAmxTileN; }
inline int64_t amx_padded_m(int64_t m) { return (m + kAmxTileM - 1) / kAmxTileM * kAmxTileM; }

// ---- layout ---------------------------------------------------------------------------
// MOEKIT_LAYOUT_AMX is written and read by vnni_pack_matrix / vnni_decode_row
// (moe_microkernel.h): for bf16 the VNNI panels are exactly the tile order above.
inline size_t amx_packed_bytes(int64_t n, int64_t k) {
  return static_cast<size_t>(amx_padded_n(n) * amx_padded_k(k)) * 2;
}

// ---- tile state (AMX) ---------------------------------------------------------------------

// Loads the tile configuration on this thread if it is not loaded yet.
void amx_tile_configure();
// Releases the tile state of this thread if this library configured it, or puts back the
// configuration the thread had before (its tile data is not kept).
void amx_tile_release();

// Configures on construction, releases on destruction: put one in each thread of a top-level
// call (inside the OpenMP parallel region).
class AmxTileScope {
 public:
  AmxTileScope() { amx_tile_configure(); }
  ~AmxTileScope() { amx_tile_release(); }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};

// ---- microkernels (AMX) -------------------------------------------------------------------
// Activations `a` are bf16 rows with stride a_stride (elements, >= amx_padded_k(K)); the columns
// [K, amx_padded_k(K)) must be zero (0 * NaN would poison the sums), and amx_padded_m(rows) rows
// must be readable (rows past `rows` are computed and discarded). Each call configures the tiles
// if needed; the caller releases them (AmxTileScope).

// c[m][n] = sum_k a[m][k] * W[n][k] in f32, for m < rows, n < N (c_stride elements).
void amx_gemm_bf16(const uint16_t* a, int64_t a_stride, int64_t rows, const uint16_t* w_packed,
                   int64_t N, int64_t K, float* c, int64_t c_stride);

// act[m][i] = bf16(silu(x_m . w1_i) * (x_m . w3_i)) for i < I; act columns [I, amx_padded_k(I))
// are written as zero so that `act` can feed amx_down_weighted directly. x: [rows][H]; act holds
// amx_padded_m(rows) rows, all written.
void amx_gate_up_silu(const uint16_t* x, int64_t x_stride, int64_t rows, const uint16_t* w1_packed,
                      const uint16_t* w3_packed, int64_t I, int64_t H, uint16_t* act,
                      int64_t act_stride);

// For each row m < rows with dst[m] != nullptr: dst[m][h] (+)= row_weight[m] * (act_m . w2_h)
// for h < H; accumulate selects += over =. act: [rows][I].
void amx_down_weighted(const uint16_t* act, int64_t act_stride, int64_t rows,
                       const uint16_t* w2_packed, int64_t H, int64_t I, const float* row_weight,
                       float* const* dst, bool accumulate);

// ---- the fused-MoE pipeline on AMX -------------------------------------------------------
// NOTE (dispatch): the fused_moe entry "fused_moe_bf16_amx" (level amx) runs the generic
// pipeline with moe_microkernel_bf16_amx() on bf16 handles in the AMX layout (what
// moekit_experts_pack chooses for bf16 on an AMX machine) or the VNNI layout: for bf16 the two
// are the same bytes, each VNNI panel being a column of AMX B tiles. Within a call each expert
// segment is dispatched by its row count: segments of at least amx_min_rows() rows run on AMX
// tiles, smaller ones (decode) on the AVX-512-BF16 microkernel, since a tile pass costs the same
// for 1 row as for 16. The result depends on the shapes and the routing only, never on the
// thread count. Calls of fewer tokens than amx_min_rows() (decode), where no segment can reach
// the threshold, run the AVX-512-BF16 pipeline outright. Below the amx level (MOEKIT_ISA
// capped) the VNNI microkernels of every level read AMX handles, and the reference reads them
// through decode_row.

struct MoeMicrokernel;
struct FusedMoeArgs;

// Rows from which an expert segment runs on AMX tiles: bench_moe_amx on a 2-core AMX machine
// (bench/RESULTS.md, "AMX expert matmul") found the two microkernels even up to ~4 rows (both
// wait on the weights) and AMX ahead from 8; MOEKIT_AMX_MIN_ROWS=<n> overrides it.
constexpr int64_t kAmxDefaultMinRows = 8;

// The threshold in force: amx_set_min_rows(n > 0), else MOEKIT_AMX_MIN_ROWS (read once), else
// kAmxDefaultMinRows.
int64_t amx_min_rows();
// Overrides the threshold for this process (benchmarks, tests); n <= 0 removes the override.
void amx_set_min_rows(int64_t rows);
// The threshold for `weights` (BF16 or FP8_E4M3): FP8 moves to the tiles at a quarter of it,
// since its AVX-512 path pays a conversion per weight that the tiles share over the rows.
int64_t amx_min_rows_for(moekit_dtype weights);

// The AMX microkernel of the pipeline (moe_gemm_amx.cc); layout MOEKIT_LAYOUT_AMX.
const MoeMicrokernel& moe_microkernel_bf16_amx();

// The fused_moe table entry (moe_amx.cc).
const char* fused_moe_amx_supports(const FusedMoeArgs& a);
void fused_moe_amx(const FusedMoeArgs& a);

}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_MOE_AMX_H_
