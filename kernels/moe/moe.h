// Blockwise expert matmul (fused MoE): the packed-weights handle, the workspace, the arguments
// shared by every implementation, and the dispatch tables.
#ifndef MOEKIT_KERNELS_MOE_MOE_H_
#define MOEKIT_KERNELS_MOE_MOE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "dispatch/registry.h"
#include "moekit/moekit.h"

namespace moekit {

// 64-byte aligned heap memory.
struct AlignedFree {
  void operator()(void* p) const;
};
using AlignedBytes = std::unique_ptr<unsigned char, AlignedFree>;
AlignedBytes aligned_alloc_bytes(size_t bytes);  // null on failure

enum class ExpertMatrix { kW1 = 0, kW3 = 1, kW2 = 2 };

}  // namespace moekit

// The opaque C handle. Each layout stores the weights its kernels want; decode_row() turns any
// layout back into the dequantized f32 row of the checkpoint, which is all the reference needs.
struct moekit_experts {
  int64_t num_experts = 0, hidden = 0, inter = 0;
  moekit_dtype dtype = MOEKIT_BF16;  // F32, BF16 or FP8_E4M3 as stored
  moekit_pack_layout layout = MOEKIT_LAYOUT_PLAIN;
  int64_t block_n = 0, block_k = 0;  // FP8 block size
  moekit::AlignedBytes storage;
  size_t storage_bytes = 0;
  // Byte offsets into storage of each expert's matrices [expert][matrix], and of FP8 scales.
  std::vector<size_t> offsets;        // num_experts * 3
  std::vector<size_t> scale_offsets;  // num_experts * 3 (FP8 only)

  int64_t rows(moekit::ExpertMatrix m) const {
    return m == moekit::ExpertMatrix::kW2 ? hidden : inter;
  }
  int64_t cols(moekit::ExpertMatrix m) const {
    return m == moekit::ExpertMatrix::kW2 ? inter : hidden;
  }
  const unsigned char* matrix(int64_t e, moekit::ExpertMatrix m) const {
    return storage.get() + offsets[e * 3 + static_cast<int>(m)];
  }
  const float* scales(int64_t e, moekit::ExpertMatrix m) const {
    return reinterpret_cast<const float*>(storage.get() +
                                          scale_offsets[e * 3 + static_cast<int>(m)]);
  }
  // Row n of matrix m of expert e, dequantized to f32 (cols(m) values).
  void decode_row(int64_t e, moekit::ExpertMatrix m, int64_t n, float* out) const;
};

// Caller-owned scratch memory, reused across calls.
struct moekit_workspace {
  moekit::AlignedBytes data;
  size_t bytes = 0;
  std::atomic<bool> busy{false};  // a call is using it (the API refuses a second at once)
};

namespace moekit {

// Packs `desc` into `layout` (never AUTO here: the API resolves it first).
moekit_status pack_experts(const moekit_experts_desc& desc, moekit_pack_layout layout,
                           moekit_experts** out);

// The layout the best kernel for this machine wants.
moekit_pack_layout preferred_layout(moekit_dtype dtype);

struct MoeAlignArgs {
  int64_t M = 0, k = 0;
  const void* ids = nullptr;
  int64_t ids_stride = 0;
  moekit_dtype ids_dtype = MOEKIT_I32;
  int64_t num_experts = 0;
  const int32_t* expert_map = nullptr;  // [num_experts] or nullptr
  int64_t num_local_experts = 0;        // num_experts, or max(expert_map) + 1
  int64_t block_m = 0;
  int32_t* sorted_pairs = nullptr;  // [capacity]
  int64_t capacity = 0;
  int32_t* block_expert = nullptr;  // [capacity / block_m]
  int32_t* num_rows = nullptr;      // [1]
};

int64_t moe_align_capacity(int64_t M, int64_t k, int64_t num_local_experts, int64_t block_m);

struct FusedMoeArgs {
  const moekit_experts* experts = nullptr;
  int64_t M = 0, k = 0;
  const void* hidden = nullptr;
  int64_t hidden_stride = 0;
  moekit_dtype hidden_dtype = MOEKIT_F32;
  const float* topk_weights = nullptr;
  int64_t topk_weights_stride = 0;
  const void* topk_ids = nullptr;
  int64_t topk_ids_stride = 0;
  moekit_dtype topk_ids_dtype = MOEKIT_I32;
  const int32_t* expert_map = nullptr;  // [num_experts] or nullptr
  // Shared experts (nullptr: none): every token also goes through each of the
  // shared->num_experts experts, weighted by shared_scale[m] ([M] f32, nullptr means 1). Same
  // hidden as `experts`, own inter; never mapped through expert_map.
  const moekit_experts* shared = nullptr;
  const float* shared_scale = nullptr;
  // At least moe_workspace_size(...) bytes. The API entry always passes one (the caller's, or
  // thread_workspace() when the caller gave none), so that running never allocates and cannot
  // fail; nullptr (internal callers, tests) makes the pipeline take thread_workspace() itself.
  moekit_workspace* ws = nullptr;
  void* out = nullptr;
  int64_t out_stride = 0;
  moekit_dtype out_dtype = MOEKIT_F32;
  int threads = 1;
};

size_t moe_workspace_size(int64_t M, int64_t k, int64_t H, int64_t I, int threads);
// With S shared experts of intermediate size I_s (S = 0: the routed-only size above).
size_t moe_workspace_size(int64_t M, int64_t k, int64_t H, int64_t I, int64_t S, int64_t I_s,
                          int threads);

// Scratch for fused-MoE calls without a workspace: one per calling thread, grown to at least
// `bytes` and then reused, so steady-state calls do not allocate. nullptr when it cannot grow.
moekit_workspace* thread_workspace(size_t bytes);

const ImplList<MoeAlignArgs>& moe_align_impls();
const ImplList<FusedMoeArgs>& fused_moe_impls();

}  // namespace moekit

#endif  // MOEKIT_KERNELS_MOE_MOE_H_
