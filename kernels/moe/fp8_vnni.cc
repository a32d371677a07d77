// Packing and decoding of the FP8 VNNI layout (see fp8_vnni.h). Plain C++.
#include "kernels/moe/fp8_vnni.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "dispatch/runtime.h"

#include "kernels/moe/moe_microkernel.h"
#include "reference/numeric.h"

namespace moekit {

size_t fp8_vnni_panel_bytes(int64_t K, int64_t block_k) {
  return fp8_panel_header_bytes(K, block_k) + static_cast<size_t>(vnni_padded_k(K) * kMoePanelN) +
         kFp8PanelSlackBytes;
}

size_t fp8_vnni_matrix_bytes(int64_t N, int64_t K, int64_t block_k) {
  return static_cast<size_t>(vnni_padded_n(N) / kMoePanelN) * fp8_vnni_panel_bytes(K, block_k);
}

const char* fp8_vnni_unsupported(int64_t block_n, int64_t block_k) {
  if (block_n <= 0 || block_n % kMoePanelN != 0) return "fp8 block_n is not a multiple of 16";
  if (block_k <= 0 || block_k % 2 != 0) return "fp8 block_k is odd";
  return nullptr;
}

void fp8_vnni_pack_matrix(const uint8_t* q, const float* scales, int64_t N, int64_t K,
                          int64_t block_n, int64_t block_k, unsigned char* dst) {
  const int64_t panels = vnni_padded_n(N) / kMoePanelN, padded_k = vnni_padded_k(K);
  const int64_t num_kb = fp8_num_k_blocks(K, block_k);
  const size_t header_bytes = fp8_panel_header_bytes(K, block_k);
  const size_t panel_bytes = fp8_vnni_panel_bytes(K, block_k);
  for (int64_t p = 0; p < panels; ++p) {
    unsigned char* panel = dst + p * panel_bytes;
    std::memset(panel, 0, header_bytes);
    const Fp8PanelHeader header{static_cast<int32_t>(block_k), static_cast<int32_t>(num_kb),
                                static_cast<int64_t>(panel_bytes)};
    std::memcpy(panel, &header, sizeof header);
    // Padding panels past N take the last block row's scales (their weights are zero).
    const int64_t block_row = std::min<int64_t>(p * kMoePanelN, N - 1) / block_n;
    std::memcpy(panel + 16, scales + block_row * num_kb, static_cast<size_t>(num_kb) * 4);
    uint8_t* data = panel + header_bytes;
    for (int64_t kk = 0; kk < padded_k / 2; ++kk)
      for (int64_t c = 0; c < kMoePanelN; ++c)
        for (int64_t i = 0; i < 2; ++i) {
          const int64_t n = p * kMoePanelN + c, kx = 2 * kk + i;
          *data++ = n < N && kx < K ? q[n * K + kx] : uint8_t{0};
        }
    std::memset(data, 0, kFp8PanelSlackBytes);
  }
}

moekit_status fp8_pack_experts_vnni(const moekit_experts_desc& d, moekit_experts** out) {
  if (const char* why = fp8_vnni_unsupported(d.block_n, d.block_k))
    return set_error(MOEKIT_ERR_UNSUPPORTED,
                     std::string("moekit_experts_pack: the vnni layout cannot hold these fp8 "
                                 "blocks: ") + why + " (the plain layout can)");
  auto* h = new (std::nothrow) moekit_experts;
  if (!h) return set_error(MOEKIT_ERR_OUT_OF_MEMORY, "moekit_experts_pack: out of memory");
  h->num_experts = d.num_experts;
  h->hidden = d.hidden;
  h->inter = d.inter;
  h->dtype = MOEKIT_FP8_E4M3;
  h->layout = MOEKIT_LAYOUT_VNNI;
  h->block_n = d.block_n;
  h->block_k = d.block_k;
  const ExpertMatrix kMatrices[3] = {ExpertMatrix::kW1, ExpertMatrix::kW3, ExpertMatrix::kW2};
  const void* const* sources[3] = {d.w1, d.w3, d.w2};
  const float* const* scale_sources[3] = {d.w1_scale, d.w3_scale, d.w2_scale};
  // Scales live inside the panels; scale_offsets stays empty.
  size_t total = 0;
  h->offsets.resize(static_cast<size_t>(d.num_experts) * 3);
  for (int64_t e = 0; e < d.num_experts; ++e)
    for (int i = 0; i < 3; ++i) {
      h->offsets[e * 3 + i] = total;
      total += fp8_vnni_matrix_bytes(h->rows(kMatrices[i]), h->cols(kMatrices[i]), d.block_k);
    }
  h->storage = aligned_alloc_bytes(total);
  if (!h->storage) {
    delete h;
    return set_error(MOEKIT_ERR_OUT_OF_MEMORY,
                     "moekit_experts_pack: cannot allocate " + std::to_string(total) + " bytes");
  }
  h->storage_bytes = total;
#pragma omp parallel for schedule(dynamic) num_threads(num_threads())
  for (int64_t t = 0; t < d.num_experts * 3; ++t) {
    const int64_t e = t / 3;
    const int i = static_cast<int>(t % 3);
    fp8_vnni_pack_matrix(static_cast<const uint8_t*>(sources[i][e]), scale_sources[i][e],
                         h->rows(kMatrices[i]), h->cols(kMatrices[i]), d.block_n, d.block_k,
                         h->storage.get() + h->offsets[t]);
  }
  *out = h;
  return MOEKIT_OK;
}

void fp8_vnni_decode_row(const unsigned char* packed, int64_t K, int64_t block_k, int64_t n,
                         float* out) {
  const unsigned char* panel = packed + (n / kMoePanelN) * fp8_vnni_panel_bytes(K, block_k);
  const float* scales = fp8_panel_scales(panel);
  const uint8_t* data = fp8_panel_data(panel, K);
  const int64_t c = n % kMoePanelN;
  for (int64_t kx = 0; kx < K; ++kx)
    out[kx] = fp8_e4m3_to_f32(data[(kx / 2) * 2 * kMoePanelN + c * 2 + kx % 2]) *
              scales[kx / block_k];
}

const void* fp8_vnni_weight_tile(const moekit_experts& w, int64_t e, ExpertMatrix which,
                                 int64_t n0, int64_t n, void* scratch) {
  (void)n, (void)scratch;
  return w.matrix(e, which) + (n0 / kMoePanelN) * fp8_vnni_panel_bytes(w.cols(which), w.block_k);
}

unsigned char* fp8_thread_buffer(int slot, size_t bytes) {
  thread_local AlignedBytes buffers[4];
  thread_local size_t capacity[4] = {0, 0, 0, 0};
  if (capacity[slot] < bytes) {
    buffers[slot] = aligned_alloc_bytes(bytes);
    capacity[slot] = buffers[slot] ? bytes : 0;
  }
  return buffers[slot].get();
}

const char* fp8_fused_moe_supports(const MoeMicrokernel& uk, const FusedMoeArgs& a) {
  if (const char* why = fused_moe_pipeline_supports(uk, a)) return why;
  return fp8_vnni_unsupported(a.experts->block_n, a.experts->block_k);
}

const char* fp8_amx_fused_moe_supports(const MoeMicrokernel& uk, const FusedMoeArgs& a) {
  if (const char* why = fp8_fused_moe_supports(uk, a)) return why;
  return a.experts->block_k % kMoePanelK != 0 ? "fp8 block_k is not a multiple of 32 (AMX tiles)"
                                              : nullptr;
}

}  // namespace moekit
