// The FP8 form of the MOEKIT_LAYOUT_VNNI weight layout: weights stay float8_e4m3fn (one byte
// each, no bf16 copy) and every panel carries its own block scales, so a microkernel needs
// nothing but the tile pointer.
//
// NOTE (layout): a matrix W [N][K] with block scales S [ceil(N/block_n)][ceil(K/block_k)] is
// stored as panels of kMoePanelN = 16 consecutive outputs (N padded to 16, K to kMoePanelK = 32,
// padding bytes 0x00 = +0). Panel p is
//   header: Fp8PanelHeader (16 bytes), then the f32 scales of the panel's block row
//           S[16p / block_n][0 .. num_kb), the whole header padded to 64 bytes;
//   data:   the bytes of W in the bf16 VNNI order of moe_microkernel.h: byte (kk*16 + n)*2 + i
//           holds W[16p + n][2kk + i], i.e. 32 bytes per K pair. Converted to bf16 in element
//           order, 32 bytes give exactly the operand of one _mm512_dpbf16_ps, and 16 K pairs
//           one AMX B tile.
//   slack:  kFp8PanelSlackBytes zero bytes, so that a kernel converting two K pairs at a time
//           may read one pair past the end of a block (an odd block_k / 2) without leaving
//           the panel.
// A panel must lie inside one block row, so block_n must be a multiple of 16; block_k must be
// even (a block never splits a K pair). Panels are consecutive: the tile of columns
// [n0, n0 + n) (n0 a multiple of 16) starts at panel n0 / 16.
#ifndef MOEKIT_KERNELS_MOE_FP8_VNNI_H_
#define MOEKIT_KERNELS_MOE_FP8_VNNI_H_

#include <cstddef>
#include <cstdint>

#include "kernels/moe/moe.h"
#include "kernels/moe/moe_microkernel.h"

namespace moekit {

struct Fp8PanelHeader {
  int32_t block_k;      // K values per scale
  int32_t num_kb;       // scales in this panel: ceil(K / block_k)
  int64_t panel_bytes;  // header + data: the distance to the next panel
};
static_assert(sizeof(Fp8PanelHeader) == 16, "the scales follow at byte 16");

constexpr size_t kFp8PanelSlackBytes = 64;

inline int64_t fp8_num_k_blocks(int64_t K, int64_t block_k) { return (K + block_k - 1) / block_k; }
inline size_t fp8_panel_header_bytes(int64_t K, int64_t block_k) {
  return static_cast<size_t>((16 + 4 * fp8_num_k_blocks(K, block_k) + 63) / 64 * 64);
}
size_t fp8_vnni_panel_bytes(int64_t K, int64_t block_k);
size_t fp8_vnni_matrix_bytes(int64_t N, int64_t K, int64_t block_k);

// The whole handle for `d` (dtype FP8_E4M3) in the VNNI layout; sets the error on failure.
moekit_status fp8_pack_experts_vnni(const moekit_experts_desc& d, moekit_experts** out);

// Why the FP8 VNNI layout cannot hold these block sizes, or nullptr.
const char* fp8_vnni_unsupported(int64_t block_n, int64_t block_k);

// Packs row-major q [N][K] with its block scales into dst (fp8_vnni_matrix_bytes bytes).
void fp8_vnni_pack_matrix(const uint8_t* q, const float* scales, int64_t N, int64_t K,
                          int64_t block_n, int64_t block_k, unsigned char* dst);
// Row n, dequantized to f32 exactly as the reference does (q * scale).
void fp8_vnni_decode_row(const unsigned char* packed, int64_t K, int64_t block_k, int64_t n,
                         float* out);

// A panel's pieces.
inline const Fp8PanelHeader& fp8_panel_header(const void* panel) {
  return *static_cast<const Fp8PanelHeader*>(panel);
}
inline const float* fp8_panel_scales(const void* panel) {
  return reinterpret_cast<const float*>(static_cast<const unsigned char*>(panel) + 16);
}
inline const uint8_t* fp8_panel_data(const void* panel, int64_t K) {
  const Fp8PanelHeader& h = fp8_panel_header(panel);
  return static_cast<const uint8_t*>(panel) + fp8_panel_header_bytes(K, h.block_k);
}

// The K values of scale block kb as K pairs [kk0, kk1) (a block never splits a pair).
struct Fp8PairRange {
  int64_t kk0, kk1;
};
inline Fp8PairRange fp8_block_pairs(int64_t kb, int64_t block_k, int64_t K) {
  const int64_t k0 = kb * block_k, k1 = k0 + block_k < K ? k0 + block_k : K;
  return {k0 / 2, (k1 + 1) / 2};
}

// A per-thread buffer of at least `bytes` bytes (64-byte aligned), grown on demand and reused;
// `slot` 0..3 selects independent buffers.
unsigned char* fp8_thread_buffer(int slot, size_t bytes);

// MoeMicrokernel::weight_tile of FP8 VNNI handles: the tile's first panel in the handle.
const void* fp8_vnni_weight_tile(const moekit_experts& w, int64_t e, ExpertMatrix which,
                                 int64_t n0, int64_t n, void* scratch);

// Fused-MoE microkernels over FP8 VNNI weights (each defined in its ISA's translation unit),
// and the checks they share: the pipeline's, plus the block sizes the layout holds.
const MoeMicrokernel& moe_microkernel_fp8_amx();
const MoeMicrokernel& moe_microkernel_fp8_avx512vbmi();  // amx level (implies VBMI)
const MoeMicrokernel& moe_microkernel_fp8_avx512bf16();
const MoeMicrokernel& moe_microkernel_fp8_avx2();
const MoeMicrokernel& moe_microkernel_fp8_scalar();
const char* fp8_fused_moe_supports(const MoeMicrokernel& uk, const FusedMoeArgs& a);
// The AMX kernel also needs block_k to be a multiple of 32 (whole B tiles per block).
const char* fp8_amx_fused_moe_supports(const MoeMicrokernel& uk, const FusedMoeArgs& a);

}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_FP8_VNNI_H_
