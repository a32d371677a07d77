// The MOEKIT_LAYOUT_AMX weight layout (see the NOTE in moe_amx.h): packing and decoding. Plain
// C++ compiled without ISA flags, so the reference can read the layout on any CPU.
#include "kernels/moe/moe_amx.h"
#include "reference/numeric.h"

namespace moekit {
namespace {

// Index of W[n][k] in the packed buffer of a matrix whose padded K is `padded_k`.
inline size_t packed_index(int64_t padded_k, int64_t n, int64_t k) {
  const int64_t k_blocks = padded_k / kAmxTileK;
  const int64_t tile = (n / kAmxTileN) * k_blocks + k / kAmxTileK;
  const int64_t within = ((k % kAmxTileK) / 2) * (kAmxTileN * 2) + (n % kAmxTileN) * 2 + (k % 2);
  return static_cast<size_t>(tile * kAmxTileElems + within);
}

}  // namespace

void amx_pack_matrix(const void* src, moekit_dtype dtype, int64_t n, int64_t k, uint16_t* dst) {
  const int64_t n_blocks = amx_padded_n(n) / kAmxTileN, k_blocks = amx_padded_k(k) / kAmxTileK;
  const bool is_bf16 = dtype == MOEKIT_BF16;
  // Writes each tile sequentially; the zero padding is written in the same pass.
#pragma omp parallel for schedule(static)
  for (int64_t nb = 0; nb < n_blocks; ++nb) {
    uint16_t* out = dst + nb * k_blocks * kAmxTileElems;
    for (int64_t kb = 0; kb < k_blocks; ++kb)
      for (int64_t pair = 0; pair < kAmxTileK / 2; ++pair)
        for (int64_t col = 0; col < kAmxTileN; ++col)
          for (int64_t i = 0; i < 2; ++i) {
            const int64_t row = nb * kAmxTileN + col, depth = kb * kAmxTileK + pair * 2 + i;
            uint16_t v = 0;
            if (row < n && depth < k) {
              const int64_t at = row * k + depth;
              v = is_bf16 ? static_cast<const uint16_t*>(src)[at]
                          : f32_to_bf16(static_cast<const float*>(src)[at]);
            }
            *out++ = v;
          }
  }
}

void amx_decode_row(const uint16_t* packed, int64_t k, int64_t row, float* out) {
  const int64_t padded_k = amx_padded_k(k);
  for (int64_t col = 0; col < k; ++col) out[col] = bf16_to_f32(packed[packed_index(padded_k, row, col)]);
}

}  // namespace moekit
