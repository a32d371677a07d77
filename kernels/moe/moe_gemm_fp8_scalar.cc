// Fused-MoE microkernels for FP8 VNNI weights (fp8_vnni.h) in plain C++: f32 activations, each
// K block's partial dot product in f32, then times the block scale (the order the vector
// kernels use). The fallback below AVX2 and the plainest statement of the FP8 contract.
#include <cmath>
#include <vector>

#include "kernels/moe/fp8_convert.h"
#include "kernels/moe/fp8_vnni.h"

namespace moekit {
namespace {

constexpr int64_t kTileN = kMoeMaxTileN;

// sum over K of x[k] * W[c][k] for the n columns of the tile starting at `tile`, block by block.
void tile_dot(const float* x, int64_t K, const void* tile, int64_t n, float* dot) {
  const Fp8PanelHeader& h = fp8_panel_header(tile);
  const size_t header_bytes = fp8_panel_header_bytes(K, h.block_k);
  float w[2 * kMoePanelN];
  for (int64_t c = 0; c < n; ++c) dot[c] = 0.0f;
  for (int64_t p = 0; p * kMoePanelN < n; ++p) {
    const unsigned char* panel = static_cast<const unsigned char*>(tile) + p * h.panel_bytes;
    const uint8_t* data = panel + header_bytes;
    const float* scales = fp8_panel_scales(panel);
    const int64_t cols = std::min<int64_t>(kMoePanelN, n - p * kMoePanelN);
    for (int64_t kb = 0; kb < h.num_kb; ++kb) {
      const Fp8PairRange range = fp8_block_pairs(kb, h.block_k, K);
      float partial[kMoePanelN] = {};
      for (int64_t kk = range.kk0; kk < range.kk1; ++kk) {
        fp8_e4m3_to_f32_scalar(data + kk * 2 * kMoePanelN, w, 2 * kMoePanelN);
        const float x0 = x[2 * kk], x1 = 2 * kk + 1 < K ? x[2 * kk + 1] : 0.0f;
        for (int64_t c = 0; c < cols; ++c) partial[c] += x0 * w[2 * c] + x1 * w[2 * c + 1];
      }
      for (int64_t c = 0; c < cols; ++c) dot[p * kMoePanelN + c] += partial[c] * scales[kb];
    }
  }
}

void gate_up(const MoeGateUpCall& call) {
  float gate[kTileN], up[kTileN];
  for (int64_t r = 0; r < call.m; ++r) {
    const float* x = static_cast<const float*>(call.a) + call.a_rows[r] * call.lda;
    tile_dot(x, call.K, call.w1, call.n, gate);
    tile_dot(x, call.K, call.w3, call.n, up);
    float* out = static_cast<float*>(call.act) + r * call.ld_act;
    for (int64_t c = 0; c < call.n; ++c) out[c] = gate[c] / (1.0f + std::exp(-gate[c])) * up[c];
  }
}

void down(const MoeDownCall& call) {
  float dot[kTileN];
  for (int64_t r = 0; r < call.m; ++r) {
    tile_dot(static_cast<const float*>(call.act) + r * call.ld_act, call.K, call.w2, call.n, dot);
    float* out = call.out + call.out_rows[r] * call.ld_out;
    for (int64_t c = 0; c < call.n; ++c) out[c] += call.row_weight[r] * dot[c];
  }
}

}  // namespace

const MoeMicrokernel& moe_microkernel_fp8_scalar() {
  static const MoeMicrokernel uk = [] {
    MoeMicrokernel k{};
    k.name = "fused_moe_fp8_scalar_vnni";
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
