// C API entry points of the blockwise expert matmul: token alignment, packing, workspace and
// the fused MoE call. Validate, fill the arguments, dispatch.
#include <algorithm>
#include <cstdint>
#include <new>

#include "dispatch/validate.h"
#include "kernels/moe/fp8_vnni.h"
#include "kernels/moe/moe.h"

using namespace moekit;

namespace {

constexpr int64_t kMaxExperts = int64_t{1} << 20;
constexpr int64_t kMaxBlockM = 1024;
constexpr int64_t kMaxBlock = int64_t{1} << 20;  // FP8 scale block sides

int64_t id_at(const moekit_tensor* ids, int64_t m, int64_t j) {
  const int64_t i = m * stride_of(ids, 0) + j;
  return ids->dtype == MOEKIT_I64 ? static_cast<const int64_t*>(ids->data)[i]
                                  : static_cast<const int32_t*>(ids->data)[i];
}

// Every id in [0, num_experts).
moekit_status check_ids(const Checker& c, const char* arg, const moekit_tensor* ids,
                        int64_t num_experts) {
  for (int64_t m = 0; m < ids->shape[0]; ++m)
    for (int64_t j = 0; j < ids->shape[1]; ++j) {
      const int64_t id = id_at(ids, m, j);
      if (id < 0 || id >= num_experts)
        return c.invalid(arg, "id " + std::to_string(id) + " at [" + std::to_string(m) + ", " +
                                  std::to_string(j) + "] is out of range [0, " +
                                  std::to_string(num_experts) + ")");
    }
  return MOEKIT_OK;
}

// expert_map: [num_experts] i32 with values in [-1, local_limit); returns the local count
// (max + 1) through *num_local.
moekit_status check_expert_map(const Checker& c, const moekit_tensor* map, int64_t num_experts,
                               int64_t local_limit, int64_t* num_local) {
  if (moekit_status s = c.tensor("expert_map", map, 1, {MOEKIT_I32})) return s;
  if (num_experts >= 0)
    if (moekit_status s = c.dims("expert_map", map, {num_experts})) return s;
  int64_t top = -1;
  const auto* v = static_cast<const int32_t*>(map->data);
  for (int64_t e = 0; e < map->shape[0]; ++e) {
    if (v[e] < -1 || v[e] >= local_limit)
      return c.invalid("expert_map", "entry " + std::to_string(e) + " = " + std::to_string(v[e]) +
                                         " is out of range [-1, " + std::to_string(local_limit) + ")");
    top = std::max<int64_t>(top, v[e]);
  }
  *num_local = top + 1;
  return MOEKIT_OK;
}

moekit_status fused_moe_entry(const Checker& c, const moekit_experts* experts,
                              const moekit_experts* shared, const moekit_tensor* shared_scale,
                              const moekit_tensor* hidden, const moekit_tensor* topk_weights,
                              const moekit_tensor* topk_ids, const moekit_tensor* expert_map,
                              moekit_workspace* ws, moekit_tensor* out);

}  // namespace

extern "C" {

int64_t moekit_moe_align_capacity(int64_t M, int64_t k, int64_t num_local_experts,
                                  int64_t block_m) {
  if (M < 0 || k < 0 || num_local_experts < 0 || block_m < 1 || block_m > kMaxBlockM) return -1;
  if (M > kMaxElements || k > kMaxElements) return -1;
  if (M > 0 && k > kMaxElements / kMaxBlockM / M) return -1;  // M * k would overflow below
  return moe_align_capacity(M, k, num_local_experts, block_m);
}

moekit_status moekit_moe_align(const moekit_tensor* ids, int64_t num_experts,
                               const moekit_tensor* expert_map, int64_t block_m,
                               moekit_tensor* sorted_pairs, moekit_tensor* block_expert,
                               moekit_tensor* num_rows) {
  Checker c("moekit_moe_align");
  if (moekit_status s = c.tensor("ids", ids, 2, {MOEKIT_I32, MOEKIT_I64})) return s;
  // sorted_pairs holds token * k + slot and num_rows the padded row count, both as i32.
  if (ids->shape[0] * ids->shape[1] > INT32_MAX / 2)
    return c.invalid("ids", std::to_string(ids->shape[0] * ids->shape[1]) +
                                " pairs are too many for the i32 outputs (at most 2^30)");
  if (num_experts < 1 || num_experts > kMaxExperts)
    return c.invalid("num_experts", std::to_string(num_experts) + " is out of range [1, 2^20]");
  if (block_m < 1 || block_m > kMaxBlockM)
    return c.invalid("block_m", std::to_string(block_m) + " is out of range [1, 1024]");
  if (moekit_status s = check_ids(c, "ids", ids, num_experts)) return s;
  int64_t num_local = num_experts;
  if (expert_map != nullptr)
    if (moekit_status s = check_expert_map(c, expert_map, num_experts, num_experts, &num_local)) return s;
  const int64_t M = ids->shape[0], k = ids->shape[1];
  if (M * k > kMaxElements / kMaxBlockM) return c.invalid("ids", "has too many pairs");
  const int64_t capacity = moe_align_capacity(M, k, num_local, block_m);
  if (moekit_status s = c.tensor("sorted_pairs", sorted_pairs, 1, {MOEKIT_I32})) return s;
  if (sorted_pairs->shape[0] < capacity)
    return c.invalid("sorted_pairs", "holds " + std::to_string(sorted_pairs->shape[0]) +
                                         " rows, needs " + std::to_string(capacity));
  if (moekit_status s = c.tensor("block_expert", block_expert, 1, {MOEKIT_I32})) return s;
  if (block_expert->shape[0] < capacity / block_m)
    return c.invalid("block_expert", "holds " + std::to_string(block_expert->shape[0]) +
                                         " blocks, needs " + std::to_string(capacity / block_m));
  if (moekit_status s = c.tensor("num_rows", num_rows, 1, {MOEKIT_I32})) return s;
  if (num_rows->shape[0] < 1) return c.invalid("num_rows", "must hold one element");
  if (overlaps(sorted_pairs, block_expert) || overlaps(sorted_pairs, num_rows) ||
      overlaps(block_expert, num_rows))
    return c.invalid("sorted_pairs/block_expert/num_rows", "overlap in memory");
  // The sort reads ids and expert_map again after it has written block_expert and the padding
  // of sorted_pairs: an output over them would be read back as expert ids.
  const char* output_names[3] = {"sorted_pairs", "block_expert", "num_rows"};
  const moekit_tensor* outputs[3] = {sorted_pairs, block_expert, num_rows};
  for (int i = 0; i < 3; ++i) {
    if (moekit_status s = c.input_apart("ids", ids, output_names[i], outputs[i])) return s;
    if (moekit_status s = c.input_apart("expert_map", expert_map, output_names[i], outputs[i]))
      return s;
  }
  MoeAlignArgs a;
  a.M = M;
  a.k = k;
  a.ids = ids->data;
  a.ids_stride = stride_of(ids, 0);
  a.ids_dtype = ids->dtype;
  a.num_experts = num_experts;
  a.expert_map = expert_map ? static_cast<const int32_t*>(expert_map->data) : nullptr;
  a.num_local_experts = num_local;
  a.block_m = block_m;
  a.sorted_pairs = static_cast<int32_t*>(sorted_pairs->data);
  a.capacity = capacity;
  a.block_expert = static_cast<int32_t*>(block_expert->data);
  a.num_rows = static_cast<int32_t*>(num_rows->data);
  return dispatch("moe_align", moe_align_impls(), a);
}

const char* moekit_pack_layout_name(moekit_pack_layout layout) {
  switch (layout) {
    case MOEKIT_LAYOUT_AUTO: return "auto";
    case MOEKIT_LAYOUT_PLAIN: return "plain";
    case MOEKIT_LAYOUT_VNNI: return "vnni";
    case MOEKIT_LAYOUT_AMX: return "amx";
    default: break;  // not a value of the enum
  }
  return "unknown";
}

moekit_status moekit_experts_pack(const moekit_experts_desc* d, moekit_pack_layout layout,
                                  moekit_experts** out) {
  Checker c("moekit_experts_pack");
  if (d == nullptr) return c.invalid("desc", "is NULL");
  if (out == nullptr) return c.invalid("out", "is NULL");
  if (d->num_experts < 1 || d->num_experts > kMaxExperts)
    return c.invalid("desc.num_experts", std::to_string(d->num_experts) + " is out of range [1, 2^20]");
  if (d->hidden < 1 || d->hidden > (int64_t{1} << 20))
    return c.invalid("desc.hidden", std::to_string(d->hidden) + " is out of range [1, 2^20]");
  if (d->inter < 1 || d->inter > (int64_t{1} << 20))
    return c.invalid("desc.inter", std::to_string(d->inter) + " is out of range [1, 2^20]");
  if (d->num_experts * d->hidden * d->inter * 3 > kMaxElements)
    return c.invalid("desc", "the expert weights are too large");
  if (d->dtype != MOEKIT_F32 && d->dtype != MOEKIT_BF16 && d->dtype != MOEKIT_FP8_E4M3)
    return c.fail(MOEKIT_ERR_UNSUPPORTED, "desc.dtype",
                  std::string(moekit_dtype_name(d->dtype)) + " weights are not supported (f32, bf16, fp8)");
  if (layout < MOEKIT_LAYOUT_AUTO || layout > MOEKIT_LAYOUT_AMX)
    return c.invalid("layout", std::to_string(static_cast<int>(layout)) + " is not a layout");
  const void* const* mats[3] = {d->w1, d->w3, d->w2};
  const char* names[3] = {"desc.w1", "desc.w3", "desc.w2"};
  for (int i = 0; i < 3; ++i) {
    if (mats[i] == nullptr) return c.invalid(names[i], "is NULL");
    for (int64_t e = 0; e < d->num_experts; ++e)
      if (mats[i][e] == nullptr)
        return c.invalid(names[i], "pointer of expert " + std::to_string(e) + " is NULL");
  }
  if (d->dtype == MOEKIT_FP8_E4M3) {
    if (d->block_n < 1 || d->block_k < 1)
      return c.invalid("desc.block_n/block_k", "FP8 weights need positive block sizes");
    if (d->block_n > kMaxBlock || d->block_k > kMaxBlock)  // keeps ceil divisions from overflowing
      return c.invalid("desc.block_n/block_k", "block sizes " + std::to_string(d->block_n) + " x " +
                                                   std::to_string(d->block_k) +
                                                   " exceed 2^20");
    const float* const* scales[3] = {d->w1_scale, d->w3_scale, d->w2_scale};
    const char* snames[3] = {"desc.w1_scale", "desc.w3_scale", "desc.w2_scale"};
    for (int i = 0; i < 3; ++i) {
      if (scales[i] == nullptr) return c.invalid(snames[i], "is NULL (FP8 weights need block scales)");
      for (int64_t e = 0; e < d->num_experts; ++e)
        if (scales[i][e] == nullptr)
          return c.invalid(snames[i], "pointer of expert " + std::to_string(e) + " is NULL");
    }
  }
  moekit_pack_layout resolved = layout == MOEKIT_LAYOUT_AUTO ? preferred_layout(d->dtype) : layout;
  // FP8 blocks that the VNNI form cannot hold stay plain (the reference reads every block size).
  if (layout == MOEKIT_LAYOUT_AUTO && d->dtype == MOEKIT_FP8_E4M3 && resolved == MOEKIT_LAYOUT_VNNI &&
      fp8_vnni_unsupported(d->block_n, d->block_k) != nullptr)
    resolved = MOEKIT_LAYOUT_PLAIN;
  moekit_experts* packed = nullptr;
  if (moekit_status s = pack_experts(*d, resolved, &packed)) return s;
  *out = packed;
  return MOEKIT_OK;
}

void moekit_experts_free(moekit_experts* experts) { delete experts; }

moekit_pack_layout moekit_experts_layout(const moekit_experts* experts) {
  return experts ? experts->layout : MOEKIT_LAYOUT_AUTO;
}

size_t moekit_experts_bytes(const moekit_experts* experts) {
  return experts ? experts->storage_bytes : 0;
}

size_t moekit_moe_workspace_size(int64_t M, int64_t k, int64_t H, int64_t I, int threads) {
  if (M < 0 || k < 0 || H < 0 || I < 0 || M > kMaxElements || k > 1024 || H > (1 << 20) ||
      I > (1 << 20))
    return 0;
  // Beyond what a call can pass (hidden [M, H] and the pairs are tensors of at most 2^48
  // elements); the size arithmetic would overflow.
  if (M > 0 && (k > kMaxElements / M || std::max(H, I) > kMaxElements / M)) return 0;
  return moe_workspace_size(M, k, H, I, threads > 0 ? threads : num_threads());
}

moekit_status moekit_workspace_create(size_t bytes, moekit_workspace** out) {
  Checker c("moekit_workspace_create");
  if (out == nullptr) return c.invalid("out", "is NULL");
  // No machine has this much; refusing here also keeps the 64-byte round-up of the
  // allocation from wrapping around to a tiny buffer.
  if (bytes > static_cast<uint64_t>(kMaxElements))
    return c.fail(MOEKIT_ERR_OUT_OF_MEMORY, "bytes", std::to_string(bytes) + " exceeds 2^48");
  auto* ws = new (std::nothrow) moekit_workspace;
  if (ws == nullptr) return c.fail(MOEKIT_ERR_OUT_OF_MEMORY, "bytes", "out of memory");
  if (bytes > 0) {
    ws->data = aligned_alloc_bytes(bytes);
    if (!ws->data) {
      delete ws;
      return c.fail(MOEKIT_ERR_OUT_OF_MEMORY, "bytes", "cannot allocate " + std::to_string(bytes));
    }
  }
  ws->bytes = bytes;
  *out = ws;
  return MOEKIT_OK;
}

void moekit_workspace_free(moekit_workspace* ws) { delete ws; }

moekit_status moekit_fused_moe(const moekit_experts* experts, const moekit_tensor* hidden,
                               const moekit_tensor* topk_weights, const moekit_tensor* topk_ids,
                               const moekit_tensor* expert_map, moekit_workspace* ws,
                               moekit_tensor* out) {
  return fused_moe_entry(Checker("moekit_fused_moe"), experts, nullptr, nullptr, hidden,
                         topk_weights, topk_ids, expert_map, ws, out);
}

moekit_status moekit_fused_moe_shared(
    const moekit_experts* experts, const moekit_experts* shared, const moekit_tensor* shared_scale,
    const moekit_tensor* hidden, const moekit_tensor* topk_weights, const moekit_tensor* topk_ids,
    const moekit_tensor* expert_map, moekit_workspace* ws, moekit_tensor* out) {
  return fused_moe_entry(Checker("moekit_fused_moe_shared"), experts, shared, shared_scale, hidden,
                         topk_weights, topk_ids, expert_map, ws, out);
}

size_t moekit_moe_workspace_size_shared(int64_t M, int64_t k, int64_t H, int64_t I, int64_t S,
                                        int64_t I_s, int threads) {
  if (S == 0) return moekit_moe_workspace_size(M, k, H, I, threads);
  if (S < 0 || S > kMaxExperts || I_s < 1 || I_s > (1 << 20)) return 0;
  if (moekit_moe_workspace_size(M, k, H, I, threads) == 0) return 0;  // M, k, H, I out of range
  if (M > 0 && (k + S > kMaxElements / M || I_s > kMaxElements / M)) return 0;
  return moe_workspace_size(M, k, H, I, S, I_s, threads > 0 ? threads : num_threads());
}

}  // extern "C"

namespace {

// The checks and the dispatch of moekit_fused_moe and moekit_fused_moe_shared (shared and
// shared_scale null for the former).
moekit_status fused_moe_entry(const Checker& c, const moekit_experts* experts,
                              const moekit_experts* shared, const moekit_tensor* shared_scale,
                              const moekit_tensor* hidden, const moekit_tensor* topk_weights,
                              const moekit_tensor* topk_ids, const moekit_tensor* expert_map,
                              moekit_workspace* ws, moekit_tensor* out) {
  if (experts == nullptr) return c.invalid("experts", "is NULL");
  if (moekit_status s = c.tensor("hidden", hidden, 2, {MOEKIT_F32, MOEKIT_BF16})) return s;
  if (moekit_status s = c.dims("hidden", hidden, {-1, experts->hidden})) return s;
  const int64_t M = hidden->shape[0];
  if (moekit_status s = c.tensor("topk_weights", topk_weights, 2, {MOEKIT_F32})) return s;
  if (moekit_status s = c.dims("topk_weights", topk_weights, {M, -1})) return s;
  const int64_t k = topk_weights->shape[1];
  if (k < 1 || k > 1024) return c.invalid("topk_weights", "k = " + std::to_string(k) + " is out of range [1, 1024]");
  if (moekit_status s = c.tensor("topk_ids", topk_ids, 2, {MOEKIT_I32, MOEKIT_I64})) return s;
  if (moekit_status s = c.dims("topk_ids", topk_ids, {M, k})) return s;
  int64_t global_experts = experts->num_experts;
  if (expert_map != nullptr) {
    int64_t num_local;
    if (moekit_status s = check_expert_map(c, expert_map, -1, experts->num_experts, &num_local)) return s;
    global_experts = expert_map->shape[0];
  }
  if (k > global_experts)
    return c.invalid("topk_ids", "k = " + std::to_string(k) + " exceeds the " +
                                     std::to_string(global_experts) + " experts");
  if (moekit_status s = check_ids(c, "topk_ids", topk_ids, global_experts)) return s;
  if (moekit_status s = c.tensor("out", out, 2, {MOEKIT_F32, MOEKIT_BF16})) return s;
  if (moekit_status s = c.dims("out", out, {M, experts->hidden})) return s;
  if (overlaps(out, hidden) || overlaps(out, topk_weights) || overlaps(out, topk_ids))
    return c.invalid("out", "overlaps an input in memory");
  if (moekit_status s = c.input_apart("expert_map", expert_map, "out", out)) return s;
  if (shared == nullptr) shared_scale = nullptr;  // documented: ignored without shared experts
  if (shared != nullptr) {
    if (shared->hidden != experts->hidden)
      return c.invalid("shared", "hidden = " + std::to_string(shared->hidden) +
                                     " differs from the routed experts' hidden = " +
                                     std::to_string(experts->hidden));
    if (M > 0 && shared->num_experts > (int64_t{1} << 30) / M)
      return c.invalid("shared", std::to_string(shared->num_experts) +
                                     " shared experts are too many for " + std::to_string(M) +
                                     " tokens");
  }
  if (shared_scale != nullptr) {
    if (moekit_status s = c.tensor("shared_scale", shared_scale, 1, {MOEKIT_F32})) return s;
    if (moekit_status s = c.dims("shared_scale", shared_scale, {M})) return s;
    if (overlaps(out, shared_scale)) return c.invalid("out", "overlaps shared_scale in memory");
  }
  // The size depends on the thread count too, which is process-wide. A workspace's bytes do
  // not say whether it was sized for fewer threads or for a smaller shape, so one too small
  // for either is refused rather than run on fewer threads.
  const int threads = num_threads();
  const size_t need =  // S = 0: the routed-only size
      moe_workspace_size(M, k, experts->hidden, experts->inter, shared ? shared->num_experts : 0,
                         shared ? shared->inter : 0, threads);
  if (ws != nullptr && ws->bytes < need)
    return c.invalid(
        "ws",
        "holds " + std::to_string(ws->bytes) + " bytes, the call needs " + std::to_string(need) +
            " on " + std::to_string(threads) + " threads" +
            (shared ? " (moekit_moe_workspace_size_shared)" : " (moekit_moe_workspace_size)"));
  // Without a workspace the call's own scratch is obtained here, where a failure can still be
  // reported: the implementations return nothing. Query mode runs nothing and needs none.
  if (ws == nullptr && !query_only()) {
    ws = thread_workspace(need);
    if (ws == nullptr)
      return c.fail(MOEKIT_ERR_OUT_OF_MEMORY, "ws",
                    "is NULL and the call's own scratch of " + std::to_string(need) +
                        " bytes cannot be allocated");
  }
  FusedMoeArgs a;
  a.experts = experts;
  a.M = M;
  a.k = k;
  a.hidden = hidden->data;
  a.hidden_stride = stride_of(hidden, 0);
  a.hidden_dtype = hidden->dtype;
  a.topk_weights = static_cast<const float*>(topk_weights->data);
  a.topk_weights_stride = stride_of(topk_weights, 0);
  a.topk_ids = topk_ids->data;
  a.topk_ids_stride = stride_of(topk_ids, 0);
  a.topk_ids_dtype = topk_ids->dtype;
  a.expert_map = expert_map ? static_cast<const int32_t*>(expert_map->data) : nullptr;
  a.shared = shared;
  a.shared_scale = shared_scale ? static_cast<const float*>(shared_scale->data) : nullptr;
  a.ws = ws;
  a.out = out->data;
  a.out_stride = stride_of(out, 0);
  a.out_dtype = out->dtype;
  a.threads = threads;
  if (query_only()) return dispatch("fused_moe", fused_moe_impls(), a);
  // Two calls carving one workspace at once would overwrite each other's scratch.
  if (ws->busy.exchange(true, std::memory_order_acquire))
    return c.invalid("ws", "is in use by another call (a workspace serves one call at a time)");
  struct Release {
    moekit_workspace* ws;
    ~Release() { ws->busy.store(false, std::memory_order_release); }
  } release{ws};
  return dispatch("fused_moe", fused_moe_impls(), a);
}

}  // namespace
