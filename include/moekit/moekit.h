/* moekit: CPU kernels for Mixture-of-Experts LLM inference — the C API.
 *
 * Conventions
 * - Every function returns a moekit_status; on failure moekit_last_error() (per thread) names the
 *   argument and what was wrong, and no output has been written.
 * - Tensors are described by moekit_tensor: pointer, dtype, shape and strides counted in elements.
 *   Rows may be strided; the innermost dimension must be contiguous (stride 1).
 * - bf16 values are raw uint16_t bit patterns; conversions to bf16 round to nearest even.
 * - Implementations are chosen per call from a registry (fast kernels first, the reference last);
 *   MOEKIT_ISA=<level> caps the level, MOEKIT_LOG=debug logs each choice.
 */
#ifndef MOEKIT_MOEKIT_H_
#define MOEKIT_MOEKIT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MOEKIT_API
#else
#define MOEKIT_API __attribute__((visibility("default")))
#endif

#define MOEKIT_VERSION_MAJOR 0
#define MOEKIT_VERSION_MINOR 1
#define MOEKIT_VERSION_PATCH 0

typedef enum moekit_status {
  MOEKIT_OK = 0,
  MOEKIT_ERR_INVALID_ARGUMENT = 1, /* null pointer, shape/dtype mismatch, out-of-range value */
  MOEKIT_ERR_UNSUPPORTED = 2,      /* valid request that this build or CPU cannot serve */
  MOEKIT_ERR_OUT_OF_MEMORY = 3,
  MOEKIT_ERR_IO = 4,       /* file missing, truncated or corrupt */
  MOEKIT_ERR_INTERNAL = 5, /* a bug: please report */
  MOEKIT_STATUS_MAX_ENUM = 0x7FFFFFFF, /* not a value: makes every int a valid representation */
} moekit_status;

typedef enum moekit_dtype {
  MOEKIT_F32 = 0,
  MOEKIT_BF16 = 1,
  MOEKIT_FP8_E4M3 = 2, /* float8_e4m3fn: bias 7, no infinities, 0x7F/0xFF are NaN */
  MOEKIT_I32 = 3,
  MOEKIT_I64 = 4,
  MOEKIT_DTYPE_MAX_ENUM = 0x7FFFFFFF, /* not a value: makes every int a valid representation */
} moekit_dtype;

/* Instruction-set levels; each includes the ones below it. */
typedef enum moekit_isa {
  MOEKIT_ISA_SCALAR = 0,
  MOEKIT_ISA_AVX2 = 1,        /* AVX2 + FMA + F16C (+ BMI1, BMI2, LZCNT) */
  MOEKIT_ISA_AVX512 = 2,      /* AVX-512 F, BW, VL, DQ */
  MOEKIT_ISA_AVX512_BF16 = 3, /* + AVX512-BF16, AVX512-VNNI */
  MOEKIT_ISA_AMX = 4,         /* + AVX512-VBMI, AMX-TILE, AMX-BF16, AMX-INT8, tile state granted */
  MOEKIT_ISA_MAX_ENUM = 0x7FFFFFFF, /* not a value: makes every int a valid representation */
} moekit_isa;

#define MOEKIT_MAX_DIMS 4

typedef struct moekit_tensor {
  void* data;
  moekit_dtype dtype;
  int32_t ndim;
  int64_t shape[MOEKIT_MAX_DIMS];
  int64_t strides[MOEKIT_MAX_DIMS]; /* in elements; 0 in every slot means "contiguous" */
} moekit_tensor;

/* ---- library, errors, capabilities ------------------------------------------------------ */

MOEKIT_API const char* moekit_version(void); /* "0.1.0" */
/* The message of the last failed call on this thread ("" if none). A successful call leaves it
 * as it is. The pointer stays valid until the next failing call on the same thread (or the
 * thread's exit); copy the text to keep it longer. */
MOEKIT_API const char* moekit_last_error(void);
MOEKIT_API const char* moekit_status_name(moekit_status status);
MOEKIT_API const char* moekit_dtype_name(moekit_dtype dtype);

MOEKIT_API const char* moekit_isa_name(moekit_isa isa); /* "scalar", "avx2", ..., "amx" */
/* Parses a level name as MOEKIT_ISA accepts it. */
MOEKIT_API moekit_status moekit_isa_from_name(const char* name, moekit_isa* out);
/* The best level this CPU and OS support. */
MOEKIT_API moekit_isa moekit_detected_isa(void);
/* The level kernels may use: detected, capped by MOEKIT_ISA and moekit_set_max_isa. */
MOEKIT_API moekit_isa moekit_effective_isa(void);
/* Caps the level for the whole process; asking for a level the CPU lacks is an error. */
MOEKIT_API moekit_status moekit_set_max_isa(moekit_isa isa);

/* Threads used by kernels: default the physical cores this process may run on;
 * MOEKIT_NUM_THREADS overrides; n <= 0 restores the default. */
MOEKIT_API int moekit_num_threads(void);
MOEKIT_API moekit_status moekit_set_num_threads(int n);

/* ---- RMSNorm family ----------------------------------------------------------------------
 * x, y: [rows, width] (2-D; rows may be strided), f32 or bf16; w: [width] f32 or bf16.
 * y = x / sqrt(mean(x^2) + eps) * w. y may alias x exactly (in place). */
MOEKIT_API moekit_status moekit_rmsnorm(const moekit_tensor* x, const moekit_tensor* weight,
                                        float eps, moekit_tensor* y);

/* residual += x; x = rmsnorm(residual) * w, both in place. x and residual have the same dtype. */
MOEKIT_API moekit_status moekit_fused_add_rmsnorm(moekit_tensor* x, moekit_tensor* residual,
                                                  const moekit_tensor* weight, float eps);

/* MiniMax-M2 QK-norm, in place: each row of q ([tokens, num_heads*head_dim]) is normalised
 * over its whole width with q_weight, each row of k ([tokens, num_kv_heads*head_dim]) over its
 * whole width with k_weight. */
MOEKIT_API moekit_status moekit_qk_norm(moekit_tensor* q, moekit_tensor* k,
                                        const moekit_tensor* q_weight,
                                        const moekit_tensor* k_weight, float eps);

/* Tensor-parallel QK-norm, step 1: per row, the sum of squares (f32) of this rank's slice of q
 * and k. q_sumsq/k_sumsq: [tokens] f32. The caller all-reduces them across ranks. Where kv heads
 * are replicated (fewer kv heads than ranks), each distinct head must be counted once: reduce k
 * over one rank per head, or divide the all-reduced k sum by the replication factor. */
MOEKIT_API moekit_status moekit_qk_norm_partial_sumsq(const moekit_tensor* q,
                                                      const moekit_tensor* k,
                                                      moekit_tensor* q_sumsq,
                                                      moekit_tensor* k_sumsq);

/* Step 2: apply the norm in place from the global sums, the true global widths (the
 * un-padded num_heads*head_dim, not local width x ranks) and this rank's weight slices
 * (same widths as the local q and k). */
MOEKIT_API moekit_status moekit_qk_norm_apply(moekit_tensor* q, moekit_tensor* k,
                                              const moekit_tensor* q_sumsq,
                                              const moekit_tensor* k_sumsq,
                                              int64_t q_global_width, int64_t k_global_width,
                                              const moekit_tensor* q_weight_slice,
                                              const moekit_tensor* k_weight_slice, float eps);

/* The slice [begin, begin+len) of the k-norm weight that tensor-parallel rank `rank` of
 * `world` holds, given num_kv_heads heads of head_dim. When kv heads are fewer than ranks each
 * head is replicated and ranks holding the same head get the same slice. */
MOEKIT_API moekit_status moekit_qk_norm_kv_weight_slice(int64_t num_kv_heads, int64_t head_dim,
                                                        int64_t rank, int64_t world,
                                                        int64_t* begin, int64_t* len);

/* ---- top-k routing ------------------------------------------------------------------------ */

typedef enum moekit_scoring {
  MOEKIT_SCORING_SOFTMAX = 0,
  MOEKIT_SCORING_SIGMOID = 1,
  MOEKIT_SCORING_MAX_ENUM = 0x7FFFFFFF, /* not a value: makes every int a valid representation */
} moekit_scoring;

typedef struct moekit_route_params {
  int32_t top_k;
  moekit_scoring scoring;
  int32_t renormalize;       /* weights /= sum of the chosen weights */
  int32_t num_expert_group;  /* 0 or 1: no grouping */
  int32_t topk_group;        /* groups kept when grouping */
  float routed_scaling_factor; /* multiplies the final weights; 1 = none */
} moekit_route_params;

/* Default: top_k 1, softmax, no renormalize, no groups, scaling 1. */
MOEKIT_API moekit_route_params moekit_route_params_default(void);

/* logits [M, E] f32/bf16; bias [E] f32 or NULL (added for selection only);
 * weights [M, k] f32; ids [M, k] i32 or i64. Ids are ordered by descending selection score,
 * ties to the lower index. NaN scores rank below every number; a row of all NaN gives the
 * lowest ids with weight NaN. -inf logits are ordinary (lowest) numbers, except that a softmax
 * row of only -inf has no finite maximum and gives weight NaN (as torch.softmax does). */
MOEKIT_API moekit_status moekit_topk_route(const moekit_tensor* logits, const moekit_tensor* bias,
                                           const moekit_route_params* params,
                                           moekit_tensor* weights, moekit_tensor* ids);

/* Router GEMM fused with routing: logits = hidden [M, H] (f32/bf16, upcast to f32) x gate^T
 * (gate [E, H] f32), then as moekit_topk_route. logits_out [M, E] f32 is written only if
 * non-NULL. */
MOEKIT_API moekit_status moekit_router_topk(const moekit_tensor* hidden,
                                            const moekit_tensor* gate_weight,
                                            const moekit_tensor* bias,
                                            const moekit_route_params* params,
                                            moekit_tensor* weights, moekit_tensor* ids,
                                            moekit_tensor* logits_out);

/* ---- blockwise expert matmul (fused MoE) -------------------------------------------------- */

/* Sorts the (token, slot) pairs of ids [M, k] (i32/i64) by expert into blocks of block_m rows.
 * expert_map [num_experts] i32 (global -> local expert, -1 = not on this rank) or NULL.
 * Outputs (i32):
 *   sorted_pairs  [capacity]  token*k + slot of each row, -1 for padding rows
 *   block_expert  [capacity / block_m]  the local expert of each block
 *   num_rows      [1]  rows used (a multiple of block_m)
 * capacity must be at least moekit_moe_align_capacity(M, k, num_local_experts, block_m).
 * Order: experts ascending, within an expert pairs in (token, slot) order. */
MOEKIT_API int64_t moekit_moe_align_capacity(int64_t M, int64_t k, int64_t num_local_experts,
                                             int64_t block_m);
MOEKIT_API moekit_status moekit_moe_align(const moekit_tensor* ids, int64_t num_experts,
                                          const moekit_tensor* expert_map, int64_t block_m,
                                          moekit_tensor* sorted_pairs, moekit_tensor* block_expert,
                                          moekit_tensor* num_rows);

/* Expert weights in the Hugging Face layout, one pointer per expert (row-major, contiguous):
 * w1 (gate) [I, H], w3 (up) [I, H], w2 (down) [H, I]. For FP8, the *_scale pointers give the
 * f32 block scales [ceil(N/block_n), ceil(K/block_k)] of each matrix (N rows, K columns);
 * dequantized W[n][k] = q[n][k] * scale[n / block_n][k / block_k]. */
typedef struct moekit_experts_desc {
  int64_t num_experts;
  int64_t hidden; /* H */
  int64_t inter;  /* I */
  moekit_dtype dtype; /* F32, BF16 or FP8_E4M3 */
  const void* const* w1;
  const void* const* w3;
  const void* const* w2;
  const float* const* w1_scale; /* FP8 only */
  const float* const* w3_scale;
  const float* const* w2_scale;
  int64_t block_n; /* FP8 only, e.g. 128 */
  int64_t block_k;
} moekit_experts_desc;

typedef struct moekit_experts moekit_experts; /* opaque packed weights */

typedef enum moekit_pack_layout {
  MOEKIT_LAYOUT_AUTO = 0,  /* the layout the best kernel of this machine wants */
  MOEKIT_LAYOUT_PLAIN = 1, /* the checkpoint's row-major layout */
  MOEKIT_LAYOUT_VNNI = 2,  /* bf16 pairs interleaved along K (avx512_bf16 / amx style) */
  MOEKIT_LAYOUT_AMX = 3,   /* tiles for AMX */
  MOEKIT_LAYOUT_MAX_ENUM = 0x7FFFFFFF, /* not a value: makes every int a valid representation */
} moekit_pack_layout;

/* Packs once; the source may be freed afterwards. *out must be freed with
 * moekit_experts_free. */
MOEKIT_API moekit_status moekit_experts_pack(const moekit_experts_desc* desc,
                                             moekit_pack_layout layout, moekit_experts** out);
MOEKIT_API void moekit_experts_free(moekit_experts* experts);
MOEKIT_API moekit_pack_layout moekit_experts_layout(const moekit_experts* experts);
MOEKIT_API const char* moekit_pack_layout_name(moekit_pack_layout layout);
/* Bytes of packed weights the handle holds. */
MOEKIT_API size_t moekit_experts_bytes(const moekit_experts* experts);

/* Reusable scratch memory for moekit_fused_moe; create once, reuse for every call. A workspace
 * serves one call at a time: a call that finds it in use by another thread's call fails with
 * MOEKIT_ERR_INVALID_ARGUMENT (give each calling thread its own). Its size for (M, k, H, I,
 * threads) is moekit_moe_workspace_size(), 0 for arguments out of range (no message is set);
 * threads <= 0 means moekit_num_threads() now. The thread count is process-wide: a call runs
 * on moekit_num_threads() threads, and a workspace sized for fewer is refused with the size
 * it needs. */
typedef struct moekit_workspace moekit_workspace;
MOEKIT_API size_t moekit_moe_workspace_size(int64_t M, int64_t k, int64_t H, int64_t I,
                                            int threads);
MOEKIT_API moekit_status moekit_workspace_create(size_t bytes, moekit_workspace** out);
MOEKIT_API void moekit_workspace_free(moekit_workspace* ws);

/* out [M, H] (f32/bf16) = sum over slots j of topk_weights[m, j] *
 *   w2_e . (silu(w1_e . x_m) * (w3_e . x_m)),  e = topk_ids[m, j].
 * hidden [M, H] f32/bf16; topk_weights [M, k] f32; topk_ids [M, k] i32/i64 in [0, E).
 * expert_map [E] i32 or NULL (global -> local expert, -1: slot skipped on this rank).
 * ws may be NULL: the call then uses scratch of its own, one per calling thread, grown when a
 * call needs more and kept for reuse; MOEKIT_ERR_OUT_OF_MEMORY (nothing written) if it cannot
 * be allocated. */
MOEKIT_API moekit_status moekit_fused_moe(const moekit_experts* experts,
                                          const moekit_tensor* hidden,
                                          const moekit_tensor* topk_weights,
                                          const moekit_tensor* topk_ids,
                                          const moekit_tensor* expert_map,
                                          moekit_workspace* ws, moekit_tensor* out);

/* moekit_fused_moe plus S shared experts (DeepSeek, Qwen-MoE) in the same call:
 *   out[m] += shared_scale[m] * sum over s < S of w2_s . (silu(w1_s . x_m) * (w3_s . x_m)).
 * shared: S = shared->num_experts experts packed with moekit_experts_pack (the routed hidden
 *   H, their own inter I_s), or NULL: then this is moekit_fused_moe and shared_scale is
 *   ignored. Fast kernels serve shared experts packed with the routed handle's dtype and layout
 *   (and FP8 block sizes); other handles are computed by the reference.
 * shared_scale: [M] f32 (e.g. Qwen's sigmoid(shared_expert_gate . x_m)) or NULL for 1.
 * The shared experts are not mapped through expert_map: they are computed on every rank that
 * passes them. With expert parallelism, pass them on one rank only (NULL on the others).
 * ws: at least moekit_moe_workspace_size_shared(M, k, H, I, S, I_s, threads) bytes, or NULL. */
MOEKIT_API moekit_status moekit_fused_moe_shared(
    const moekit_experts* experts, const moekit_experts* shared, const moekit_tensor* shared_scale,
    const moekit_tensor* hidden, const moekit_tensor* topk_weights, const moekit_tensor* topk_ids,
    const moekit_tensor* expert_map, moekit_workspace* ws, moekit_tensor* out);
/* Workspace bytes for moekit_fused_moe_shared with S shared experts of inter I_s (S = 0: the
 * same as moekit_moe_workspace_size); 0 for arguments out of range. */
MOEKIT_API size_t moekit_moe_workspace_size_shared(int64_t M, int64_t k, int64_t H, int64_t I,
                                                   int64_t S, int64_t I_s, int threads);

/* ---- dispatch introspection -------------------------------------------------------------- */

/* Ops known to the registry: "rmsnorm", "fused_add_rmsnorm", "qk_norm", "topk_route",
 * "router_topk", "moe_align", "fused_moe". */
MOEKIT_API int moekit_op_count(void);
MOEKIT_API const char* moekit_op_name(int op_index);
/* Registered implementations of an op, best first; the reference is last. */
MOEKIT_API int moekit_impl_count(const char* op);
MOEKIT_API moekit_status moekit_impl_info(const char* op, int impl_index, const char** name,
                                          moekit_isa* level);

/* Which implementation a call uses: the name the last call of `op` on this thread chose ("" if
 * none). The string is static: it stays valid after later calls and after the thread ends. */
MOEKIT_API const char* moekit_last_impl(const char* op);
/* Query mode for this thread: while on, op calls validate their arguments and choose an
 * implementation (see moekit_last_impl) but compute and write nothing. */
MOEKIT_API void moekit_set_query_only(int on);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOEKIT_MOEKIT_H_ */
