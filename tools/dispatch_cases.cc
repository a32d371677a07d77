// Builds argument descriptions of MiniMax-M2 shapes (no data) and asks each dispatch table.
#include "tools/dispatch_cases.h"

#include <algorithm>

#include "dispatch/registry.h"
#include "kernels/moe/moe.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"
#include "kernels/rmsnorm/rmsnorm.h"
#include "kernels/topk/topk.h"

namespace moekit_tools {
namespace {

using namespace moekit;

// MiniMax-M2 dimensions.
constexpr int64_t kHidden = 3072, kInter = 1536, kExperts = 256, kTopK = 8;
constexpr int64_t kQWidth = 48 * 128, kKWidth = 8 * 128;
constexpr int64_t kDecodeM = 1, kPrefillM = 4096;

struct Shape {
  const char* name;
  int64_t M;
};
constexpr Shape kShapes[] = {{"minimax_m2 decode M=1", kDecodeM},
                             {"minimax_m2 prefill M=4096", kPrefillM}};

}  // namespace

std::vector<ChosenImpl> choose_for_minimax_cases() {
  std::vector<ChosenImpl> out;
  const moekit_dtype float_types[] = {MOEKIT_BF16, MOEKIT_F32};

  for (const Shape& s : kShapes)
    for (moekit_dtype dt : float_types) {
      RmsnormArgs a;
      a.rows = s.M;
      a.width = kHidden;
      a.x_stride = a.y_stride = a.residual_stride = kHidden;
      a.x_dtype = a.y_dtype = dt;
      a.w_dtype = MOEKIT_BF16;
      out.push_back({"rmsnorm", s.name, moekit_dtype_name(dt), choose("rmsnorm", rmsnorm_impls(), a).name});
      out.push_back({"fused_add_rmsnorm", s.name, moekit_dtype_name(dt),
                     choose("fused_add_rmsnorm", fused_add_rmsnorm_impls(), a).name});
      QkNormArgs q;
      q.tokens = s.M;
      q.q_width = q.q_stride = kQWidth;
      q.k_width = q.k_stride = kKWidth;
      q.q_dtype = q.k_dtype = dt;
      q.q_w_dtype = q.k_w_dtype = MOEKIT_BF16;
      out.push_back({"qk_norm", s.name, moekit_dtype_name(dt), choose("qk_norm", qk_norm_impls(), q).name});
    }

  for (const Shape& s : kShapes) {
    TopkArgs minimax;
    minimax.M = s.M;
    minimax.E = kExperts;
    minimax.logits_stride = kExperts;
    minimax.k = kTopK;
    minimax.scoring = MOEKIT_SCORING_SIGMOID;
    minimax.renormalize = true;
    static const float kBiasPlaceholder[1] = {0.0f};  // only its presence matters here
    minimax.bias = kBiasPlaceholder;
    minimax.weights_stride = minimax.ids_stride = kTopK;
    out.push_back({"topk_route", std::string(s.name) + " sigmoid+bias E=256 k=8 renorm", "f32",
                   choose("topk_route", topk_route_impls(), minimax).name});
    TopkArgs deepseek = minimax;
    deepseek.num_expert_group = 8;
    deepseek.topk_group = 4;
    deepseek.scaling = 2.5f;
    out.push_back({"topk_route",
                   std::string(s.name).replace(0, 10, "deepseek_v3") + " grouped 8/4 scale 2.5", "f32",
                   choose("topk_route", topk_route_impls(), deepseek).name});
    for (moekit_dtype dt : float_types) {
      RouterTopkArgs r;
      r.H = kHidden;
      r.hidden_stride = kHidden;
      r.hidden_dtype = dt;
      r.gate_stride = kHidden;
      r.route = minimax;
      out.push_back({"router_topk", std::string(s.name) + " gate [256, 3072]", moekit_dtype_name(dt),
                     choose("router_topk", router_topk_impls(), r).name});
    }
    MoeAlignArgs al;
    al.M = s.M;
    al.k = kTopK;
    al.ids_stride = kTopK;
    al.num_experts = al.num_local_experts = kExperts;
    al.block_m = 16;
    out.push_back({"moe_align", s.name, "i32", choose("moe_align", moe_align_impls(), al).name});
  }

  const moekit_dtype weight_types[] = {MOEKIT_BF16, MOEKIT_F32, MOEKIT_FP8_E4M3};
  for (moekit_dtype wt : weight_types) {
    moekit_experts handle;  // metadata only: supports() never reads weights
    handle.num_experts = kExperts;
    handle.hidden = kHidden;
    handle.inter = kInter;
    handle.dtype = wt;
    handle.layout = preferred_layout(wt);
    handle.block_n = handle.block_k = wt == MOEKIT_FP8_E4M3 ? 128 : 0;
    for (const Shape& s : kShapes) {
      FusedMoeArgs m;
      m.experts = &handle;
      m.M = s.M;
      m.k = kTopK;
      m.hidden_stride = m.out_stride = kHidden;
      m.hidden_dtype = m.out_dtype = MOEKIT_BF16;
      m.topk_weights_stride = m.topk_ids_stride = kTopK;
      m.threads = num_threads();
      const char* impl = choose("fused_moe", fused_moe_impls(), m).name;
      std::string note;
      if (std::string(impl).find("_amx") != std::string::npos) {
        // The AMX entries send each expert segment below a row threshold to an AVX-512
        // microkernel; with uniform routing a segment has about M * k / E rows.
        const int64_t rows = std::max<int64_t>(1, (s.M * kTopK + kExperts - 1) / kExperts);
        const int64_t min_rows = amx_min_rows_for(wt);
        note = "expert segments of about " + std::to_string(rows) + " row(s) run on " +
               (rows >= min_rows ? std::string("AMX tiles")
                                 : std::string(wt == MOEKIT_FP8_E4M3 ? "avx512vbmi" : "avx512bf16") +
                                       " (AMX from " + std::to_string(min_rows) +
                                       " rows, MOEKIT_AMX_MIN_ROWS)");
      } else if (std::string(impl).find("bf16_avx512bf16") != std::string::npos) {
        const int64_t rows = std::max<int64_t>(1, (s.M * kTopK + kExperts - 1) / kExperts);
        const int64_t min_rows = bf16_fma_min_rows();
        note = "expert segments of about " + std::to_string(rows) + " row(s) run on " +
               (rows >= min_rows ? "f32 FMA" : "VDPBF16PS") +
               (min_rows == kBf16FmaNever
                    ? std::string(" (FMA off here: not an Intel CPU, or MOEKIT_BF16_FMA_MIN_ROWS)")
                    : " (FMA from " + std::to_string(min_rows) +
                          " rows, MOEKIT_BF16_FMA_MIN_ROWS)");
      }
      out.push_back({"fused_moe", s.name, moekit_dtype_name(wt), impl, note});
    }
  }
  return out;
}

}  // namespace moekit_tools
