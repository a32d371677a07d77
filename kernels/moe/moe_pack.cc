// Packing expert weights into the moekit_experts handle, and decoding them back for the
// reference. The PLAIN layout keeps the checkpoint's row-major matrices (and FP8 block scales);
// kernel-specific layouts are added beside it.
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels/moe/moe.h"
#include "reference/numeric.h"

namespace moekit {

void AlignedFree::operator()(void* p) const { std::free(p); }

AlignedBytes aligned_alloc_bytes(size_t bytes) {
  constexpr size_t kAlign = 64;
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  return AlignedBytes(static_cast<unsigned char*>(std::aligned_alloc(kAlign, rounded ? rounded : kAlign)));
}

namespace {

size_t dtype_size(moekit_dtype d) {
  switch (d) {
    case MOEKIT_F32: return 4;
    case MOEKIT_BF16: return 2;
    case MOEKIT_FP8_E4M3: return 1;
    default: return 0;
  }
}

size_t align64(size_t n) { return (n + 63) / 64 * 64; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

moekit_status pack_experts(const moekit_experts_desc& d, moekit_pack_layout layout,
                           moekit_experts** out) {
  if (layout != MOEKIT_LAYOUT_PLAIN)
    return set_error(MOEKIT_ERR_UNSUPPORTED,
                     std::string("moekit_experts_pack: layout ") + moekit_pack_layout_name(layout) +
                         " is not available in this build");
  auto* h = new (std::nothrow) moekit_experts;
  if (!h) return set_error(MOEKIT_ERR_OUT_OF_MEMORY, "moekit_experts_pack: out of memory");
  h->num_experts = d.num_experts;
  h->hidden = d.hidden;
  h->inter = d.inter;
  h->dtype = d.dtype;
  h->layout = layout;
  const bool fp8 = d.dtype == MOEKIT_FP8_E4M3;
  h->block_n = fp8 ? d.block_n : 0;
  h->block_k = fp8 ? d.block_k : 0;

  const ExpertMatrix kMatrices[3] = {ExpertMatrix::kW1, ExpertMatrix::kW3, ExpertMatrix::kW2};
  const void* const* sources[3] = {d.w1, d.w3, d.w2};
  const float* const* scale_sources[3] = {d.w1_scale, d.w3_scale, d.w2_scale};
  size_t total = 0;
  h->offsets.resize(d.num_experts * 3);
  if (fp8) h->scale_offsets.resize(d.num_experts * 3);
  for (int64_t e = 0; e < d.num_experts; ++e)
    for (int i = 0; i < 3; ++i) {
      const int64_t rows = h->rows(kMatrices[i]), cols = h->cols(kMatrices[i]);
      h->offsets[e * 3 + i] = total;
      total += align64(static_cast<size_t>(rows * cols) * dtype_size(d.dtype));
      if (fp8) {
        h->scale_offsets[e * 3 + i] = total;
        total += align64(static_cast<size_t>(ceil_div(rows, d.block_n) * ceil_div(cols, d.block_k)) * 4);
      }
    }
  h->storage = aligned_alloc_bytes(total);
  if (!h->storage) {
    delete h;
    return set_error(MOEKIT_ERR_OUT_OF_MEMORY, "moekit_experts_pack: cannot allocate " +
                                                   std::to_string(total) + " bytes");
  }
  h->storage_bytes = total;
  for (int64_t e = 0; e < d.num_experts; ++e)
    for (int i = 0; i < 3; ++i) {
      const int64_t rows = h->rows(kMatrices[i]), cols = h->cols(kMatrices[i]);
      std::memcpy(h->storage.get() + h->offsets[e * 3 + i], sources[i][e],
                  static_cast<size_t>(rows * cols) * dtype_size(d.dtype));
      if (fp8)
        std::memcpy(h->storage.get() + h->scale_offsets[e * 3 + i], scale_sources[i][e],
                    static_cast<size_t>(ceil_div(rows, d.block_n) * ceil_div(cols, d.block_k)) * 4);
    }
  *out = h;
  return MOEKIT_OK;
}

moekit_pack_layout preferred_layout(moekit_dtype) { return MOEKIT_LAYOUT_PLAIN; }

size_t moe_workspace_size(int64_t M, int64_t k, int64_t H, int64_t I, int threads) {
  (void)M, (void)k, (void)H, (void)I, (void)threads;
  return 0;  // the reference allocates its own scratch
}

}  // namespace moekit

void moekit_experts::decode_row(int64_t e, moekit::ExpertMatrix m, int64_t n, float* out) const {
  using namespace moekit;
  const int64_t K = cols(m);
  const unsigned char* base = matrix(e, m);
  switch (layout) {
    case MOEKIT_LAYOUT_PLAIN:
    default:
      if (dtype == MOEKIT_F32) {
        std::memcpy(out, base + static_cast<size_t>(n * K) * 4, static_cast<size_t>(K) * 4);
      } else if (dtype == MOEKIT_BF16) {
        const auto* row = reinterpret_cast<const uint16_t*>(base) + n * K;
        for (int64_t i = 0; i < K; ++i) out[i] = bf16_to_f32(row[i]);
      } else {
        const uint8_t* row = base + n * K;
        const float* s = scales(e, m) + (n / block_n) * ((K + block_k - 1) / block_k);
        for (int64_t i = 0; i < K; ++i) out[i] = fp8_e4m3_to_f32(row[i]) * s[i / block_k];
      }
      break;
  }
}
