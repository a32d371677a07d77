// Packing expert weights into the moekit_experts handle, and decoding them back for the
// reference. The PLAIN layout keeps the checkpoint's row-major matrices (and FP8 block scales);
// the VNNI layout (see the NOTE in moe_microkernel.h) holds F32 and BF16 weights as the fused-MoE
// microkernels of every ISA read them.
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "kernels/moe/fp8_vnni.h"
#include "kernels/moe/moe_microkernel.h"
#include "reference/numeric.h"

namespace moekit {

void AlignedFree::operator()(void* p) const { std::free(p); }

AlignedBytes aligned_alloc_bytes(size_t bytes) {
  // Large buffers (packed weights, workspaces) are 2 MiB aligned and asked to be backed by
  // huge pages: an AMX tile's 16 rows of activations span up to 16 pages and the weights
  // stream through many, so 4 KiB pages cost TLB misses (a few percent on a one-thread AMX
  // fused-MoE run). Where transparent huge pages are off this changes nothing.
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t align = bytes >= 2 * kHugePage ? kHugePage : 64;
  if (bytes > SIZE_MAX - align) return AlignedBytes();  // the round-up would wrap
  const size_t rounded = std::max((bytes + align - 1) / align * align, align);
  void* p = std::aligned_alloc(align, rounded);
  if (p != nullptr && align == kHugePage) madvise(p, rounded, MADV_HUGEPAGE);
  return AlignedBytes(static_cast<unsigned char*>(p));
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
  // The AMX layout (bf16 only) has the VNNI layout's bytes: each panel is a column of AMX B tiles.
  if (layout == MOEKIT_LAYOUT_AMX && d.dtype != MOEKIT_BF16)
    return set_error(MOEKIT_ERR_UNSUPPORTED,
                     std::string("moekit_experts_pack: layout amx holds bf16 weights only, not ") +
                         moekit_dtype_name(d.dtype));
  const bool vnni = layout == MOEKIT_LAYOUT_VNNI || layout == MOEKIT_LAYOUT_AMX;
  if (vnni && d.dtype == MOEKIT_FP8_E4M3) return fp8_pack_experts_vnni(d, out);  // fp8_vnni.cc
  if (layout != MOEKIT_LAYOUT_PLAIN && !vnni)
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
      total += vnni ? vnni_matrix_bytes(rows, cols, d.dtype)
                    : align64(static_cast<size_t>(rows * cols) * dtype_size(d.dtype));
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
  // Each matrix is packed by one thread: packing 256 MiniMax experts moves several GB.
#pragma omp parallel for schedule(dynamic) num_threads(num_threads())
  for (int64_t t = 0; t < d.num_experts * 3; ++t) {
    const int64_t e = t / 3;
    const int i = static_cast<int>(t % 3);
    const int64_t rows = h->rows(kMatrices[i]), cols = h->cols(kMatrices[i]);
    unsigned char* dst = h->storage.get() + h->offsets[e * 3 + i];
    if (vnni) {
      vnni_pack_matrix(sources[i][e], d.dtype, rows, cols, dst);
      continue;
    }
    std::memcpy(dst, sources[i][e], static_cast<size_t>(rows * cols) * dtype_size(d.dtype));
    if (fp8)
      std::memcpy(h->storage.get() + h->scale_offsets[e * 3 + i], scale_sources[i][e],
                  static_cast<size_t>(ceil_div(rows, d.block_n) * ceil_div(cols, d.block_k)) * 4);
  }
  *out = h;
  return MOEKIT_OK;
}

// Every ISA level has VNNI microkernels for F32 and BF16 weights (scalar included).
moekit_pack_layout preferred_layout(moekit_dtype dtype) {
  // bf16 on an AMX machine: the AMX layout (moe_amx.h), which the VNNI kernels read too.
  if (dtype == MOEKIT_BF16 && effective_isa() >= MOEKIT_ISA_AMX) return MOEKIT_LAYOUT_AMX;
  (void)dtype;  // FP8 too: its VNNI form keeps one byte per weight (fp8_vnni.h)
  return MOEKIT_LAYOUT_VNNI;
}

void vnni_pack_matrix(const void* src, moekit_dtype dtype, int64_t N, int64_t K, void* dst) {
  const int64_t padded_k = vnni_padded_k(K), panels = vnni_padded_n(N) / kMoePanelN;
  if (dtype == MOEKIT_F32) {
    const auto* in = static_cast<const float*>(src);
    auto* out = static_cast<float*>(dst);
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t kk = 0; kk < padded_k; ++kk)
        for (int64_t c = 0; c < kMoePanelN; ++c) {
          const int64_t n = p * kMoePanelN + c;
          *out++ = n < N && kk < K ? in[n * K + kk] : 0.0f;
        }
    return;
  }
  const auto* in = static_cast<const uint16_t*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t kk = 0; kk < padded_k / 2; ++kk)
      for (int64_t c = 0; c < kMoePanelN; ++c)
        for (int64_t i = 0; i < 2; ++i) {
          const int64_t n = p * kMoePanelN + c, kx = 2 * kk + i;
          *out++ = n < N && kx < K ? in[n * K + kx] : uint16_t{0};
        }
}

void vnni_decode_row(const void* packed, moekit_dtype dtype, int64_t K, int64_t n, float* out) {
  const int64_t p = n / kMoePanelN, c = n % kMoePanelN;
  const unsigned char* panel = static_cast<const unsigned char*>(packed) + p * vnni_panel_bytes(K, dtype);
  if (dtype == MOEKIT_F32) {
    const auto* w = reinterpret_cast<const float*>(panel);
    for (int64_t kx = 0; kx < K; ++kx) out[kx] = w[kx * kMoePanelN + c];
    return;
  }
  const auto* w = reinterpret_cast<const uint16_t*>(panel);
  for (int64_t kx = 0; kx < K; ++kx) out[kx] = bf16_to_f32(w[(kx / 2) * 2 * kMoePanelN + c * 2 + kx % 2]);
}

const void* vnni_weight_tile(const moekit_experts& w, int64_t e, ExpertMatrix which, int64_t n0,
                             int64_t n, void* scratch) {
  (void)n, (void)scratch;
  return w.matrix(e, which) + (n0 / kMoePanelN) * vnni_panel_bytes(w.cols(which), w.dtype);
}

size_t moe_tile_scratch_bytes(int64_t K) {
  return std::max(static_cast<size_t>(kMoeMaxTileN * vnni_padded_k(K)) * 4, kMoeFmaScratchBytes);
}

// NOTE: the pieces, each 64-byte aligned (R = M * (k + S) rows: the routed pairs and one row
// per token and shared expert; T threads; I_max = max(I, I_s)):
//   row tables       R * 24 bytes (token, row weight per sorted row; segments; chunks)
//   converted A      M * vnni_padded_k(H) * 4   (hidden in the kernel's operand dtype)
//   intermediate     (min(R, kMoeChunkRows) + 16) * moe_row_stride(I_max, 4) * 4
//   f32 accumulator  M * H * 4                   (for bf16 output)
//   sorted A         (min(R, kMoeChunkRows) + 32) * (moe_row_stride(H, 2) * 2 + 4)  (bf16 rows in
//                    sorted order, and their row indices, for uk.sorted_a kernels)
//   per thread       3 * moe_tile_scratch_bytes(max(H, I_max))
// MiniMax-M2 (H 3072, I 1536, k 8) at M = 4096: about 157 MB with 2 threads, 190 MB with 16.
size_t moe_sorted_a_bytes(int64_t rows, int64_t H) {
  const int64_t n = std::min<int64_t>(rows, kMoeChunkRows) + 2 * kMoePanelN;
  return align64(static_cast<size_t>(n * moe_row_stride(H, 2) * 2)) +
         align64(static_cast<size_t>(n * 4));
}

size_t moe_workspace_size(int64_t M, int64_t k, int64_t H, int64_t I, int64_t S, int64_t I_s,
                          int threads) {
  const auto a64 = [](int64_t n) { return align64(static_cast<size_t>(n)); };
  const int64_t rows = M * (k + S), inter = S > 0 ? std::max(I, I_s) : I;
  const int64_t chunk_rows = std::min<int64_t>(rows, kMoeChunkRows) + kMoePanelN;
  return a64(rows * 4) * 2 + a64(rows * 12) + a64((rows + 1) * 4) +
         a64(M * vnni_padded_k(H) * 4) + a64(chunk_rows * moe_row_stride(inter, 4) * 4) +
         a64(M * H * 4) + moe_sorted_a_bytes(rows, H) +
         static_cast<size_t>(std::max(threads, 1)) * 3 *
             moe_tile_scratch_bytes(std::max(H, inter));
}

size_t moe_workspace_size(int64_t M, int64_t k, int64_t H, int64_t I, int threads) {
  return moe_workspace_size(M, k, H, I, 0, 0, threads);
}

}  // namespace moekit

void moekit_experts::decode_row(int64_t e, moekit::ExpertMatrix m, int64_t n, float* out) const {
  using namespace moekit;
  const int64_t K = cols(m);
  const unsigned char* base = matrix(e, m);
  switch (layout) {
    case MOEKIT_LAYOUT_AMX:  // bf16 only, the VNNI layout's bytes
    case MOEKIT_LAYOUT_VNNI:
      if (dtype == MOEKIT_FP8_E4M3) {
        fp8_vnni_decode_row(base, K, block_k, n, out);
        break;
      }
      vnni_decode_row(base, dtype, K, n, out);
      break;
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
