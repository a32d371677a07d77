// Fused-MoE microkernels in plain C++ over the VNNI layout, for f32 and bf16 weights (bf16 is
// widened to f32; activations and intermediate are f32). The fallback of CPUs below AVX2, and
// the simplest statement of the microkernel contract (moe_microkernel.h).
#include <cmath>

#include "kernels/moe/moe_microkernel.h"
#include "reference/numeric.h"

namespace moekit {
namespace {

// W[c][kx] of a packed tile whose first panel is `tile`.
template <moekit_dtype kDtype>
inline float tile_at(const void* tile, int64_t K, int64_t c, int64_t kx) {
  const int64_t panel = c / kMoePanelN, col = c % kMoePanelN;
  if (kDtype == MOEKIT_F32) {
    const float* w = static_cast<const float*>(tile) + panel * vnni_padded_k(K) * kMoePanelN;
    return w[kx * kMoePanelN + col];
  }
  const uint16_t* w = static_cast<const uint16_t*>(tile) + panel * vnni_padded_k(K) * kMoePanelN;
  return bf16_to_f32(w[(kx / 2) * 2 * kMoePanelN + col * 2 + kx % 2]);
}

template <moekit_dtype kDtype>
void gate_up_scalar(const MoeGateUpCall& call) {
  float gate[kMoeMaxTileN], up[kMoeMaxTileN];
  for (int64_t r = 0; r < call.m; ++r) {
    const float* x = static_cast<const float*>(call.a) + call.a_rows[r] * call.lda;
    for (int64_t c = 0; c < call.n; ++c) gate[c] = up[c] = 0.0f;
    for (int64_t kx = 0; kx < call.K; ++kx)
      for (int64_t c = 0; c < call.n; ++c) {
        gate[c] += x[kx] * tile_at<kDtype>(call.w1, call.K, c, kx);
        up[c] += x[kx] * tile_at<kDtype>(call.w3, call.K, c, kx);
      }
    float* out = static_cast<float*>(call.act) + r * call.ld_act;
    for (int64_t c = 0; c < call.n; ++c) out[c] = gate[c] / (1.0f + std::exp(-gate[c])) * up[c];
  }
}

template <moekit_dtype kDtype>
void down_scalar(const MoeDownCall& call) {
  float dot[kMoeMaxTileN];
  for (int64_t r = 0; r < call.m; ++r) {
    const float* x = static_cast<const float*>(call.act) + r * call.ld_act;
    for (int64_t c = 0; c < call.n; ++c) dot[c] = 0.0f;
    for (int64_t kx = 0; kx < call.K; ++kx)
      for (int64_t c = 0; c < call.n; ++c)
        dot[c] += x[kx] * tile_at<kDtype>(call.w2, call.K, c, kx);
    float* out = call.out + call.out_rows[r] * call.ld_out;
    for (int64_t c = 0; c < call.n; ++c) out[c] += call.row_weight[r] * dot[c];
  }
}

template <moekit_dtype kDtype>
MoeMicrokernel scalar_kernel(const char* name) {
  MoeMicrokernel uk{};
  uk.name = name;
  uk.weight_dtype = kDtype;
  uk.layout = MOEKIT_LAYOUT_VNNI;
  uk.a_dtype = MOEKIT_F32;
  uk.pad_a = false;
  uk.block_m = 32;
  uk.gate_up_n = 32;
  uk.down_n = 32;
  uk.weight_tile = vnni_weight_tile;
  uk.gate_up = gate_up_scalar<kDtype>;
  uk.down = down_scalar<kDtype>;
  return uk;
}

}  // namespace

const MoeMicrokernel& moe_microkernel_bf16_scalar() {
  static const MoeMicrokernel uk = scalar_kernel<MOEKIT_BF16>("fused_moe_bf16_scalar_vnni");
  return uk;
}

const MoeMicrokernel& moe_microkernel_f32_scalar() {
  static const MoeMicrokernel uk = scalar_kernel<MOEKIT_F32>("fused_moe_f32_scalar_vnni");
  return uk;
}

}  // namespace moekit
