// MiniMax-M2 on the CPU: loading a Hugging Face checkpoint folder, and the forward pass over a
// KV cache. Dense projections run in f32 (OpenBLAS or oneDNN); norms, routing and the experts go
// through the public moekit C API, so dispatch picks the fast kernels this machine has.
#ifndef MOEKIT_MODEL_MODEL_H_
#define MOEKIT_MODEL_MODEL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/dense_gemm.h"
#include "model/safetensors.h"
#include "moekit/moekit.h"

namespace moekit::m2 {

// How expert weights are handed to moekit_experts_pack.
enum class ExpertPrecision {
  // As stored (bf16, or FP8 with block scales): the fast path. Kernels may then round
  // activations to bf16 (avx512_bf16 / AMX), which moves logits by ~1e-2.
  kCheckpoint,
  // Widened / dequantized to f32 before packing: f32 math throughout, for checking against
  // f32 references. Twice (bf16) or four times (FP8) the expert memory.
  kF32,
};

struct LoadOptions {
  bool progress = false;  // a progress line on stderr while loading
  GemmBackend gemm = GemmBackend::kOpenBlas;
  ExpertPrecision expert_precision = ExpertPrecision::kCheckpoint;
  moekit_pack_layout expert_layout = MOEKIT_LAYOUT_AUTO;
};

struct LoadStats {
  double seconds = 0;
  size_t checkpoint_bytes = 0;     // sum of the safetensors files
  size_t packed_expert_bytes = 0;  // held by the moekit_experts handles
  size_t dense_bytes = 0;          // f32 dense weights (attention, router, embeddings, lm_head)
  size_t peak_rss_bytes = 0;       // ru_maxrss after loading
  std::string expert_dtype;        // "bf16", "fp8_e4m3", "f32"
  std::string expert_layout;
};

// Seconds spent per part of the forward pass, summed over calls.
struct OpTimes {
  double attention = 0;  // q/k/v/o projections, QK-norm, RoPE, softmax(qk)v
  double routing = 0;    // router GEMM + top-k
  double experts = 0;    // fused MoE
  double rest = 0;       // embedding, norms, lm_head
  double total() const { return attention + routing + experts + rest; }
};

// Intermediate tensors of a forward pass, named as in the golden fixture
// ("attn.q_normed.layer.0", "router.topk_ids.layer.1", ...), row-major.
struct Trace {
  std::map<std::string, std::vector<float>> f32;
  std::map<std::string, std::vector<int32_t>> i32;
};

class Model;

// Keys (after RoPE) and values of every layer for the tokens seen so far.
class KvCache {
 public:
  explicit KvCache(const Model& model, int64_t capacity = 0);
  int64_t length() const { return length_; }
  void clear() { length_ = 0; }
  // Forgets every token after the first n (n <= length()).
  void truncate(int64_t n) { length_ = n < length_ ? (n > 0 ? n : 0) : length_; }

 private:
  friend class Model;
  void reserve(int64_t tokens);
  int64_t kv_width_ = 0, capacity_ = 0, length_ = 0;
  std::vector<std::vector<float>> k_, v_;  // per layer [capacity, kv_width]
};

class Model {
 public:
  // Loads <dir> (config.json + safetensors). Throws ModelError naming the file, tensor or field.
  static std::unique_ptr<Model> load(const std::string& dir, const LoadOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  const LoadStats& load_stats() const { return stats_; }

  // Runs the T tokens `ids` at positions cache->length() .. +T-1 and appends their keys and
  // values to the cache. logits: [T, vocab] when all_logits, else [1, vocab] for the last
  // token. trace, when given, receives the intermediates. Throws ModelError on a bad id or a
  // failing kernel call.
  void forward(const int32_t* ids, int64_t T, KvCache* cache, float* logits, bool all_logits,
               Trace* trace = nullptr);

  const OpTimes& times() const { return times_; }
  void reset_times() { times_ = OpTimes{}; }
  // The implementation each op used in the last forward (op -> name), incl. "dense_gemm".
  std::map<std::string, std::string> kernels() const;

 private:
  struct Layer {
    std::vector<float> input_norm, post_norm, q_norm, k_norm;
    std::vector<float> wqkv;  // [q_width + 2 kv_width, hidden]: q, k, v rows stacked
    std::vector<float> wo;    // [hidden, q_width]
    std::vector<float> gate;  // [experts, hidden]
    std::vector<float> bias;  // [experts], empty without routing bias
    moekit_experts* experts = nullptr;
  };

  explicit Model(GemmBackend backend) : gemm_(backend) {}
  void load_weights(const std::string& dir, const LoadOptions& options);
  void attention(int64_t layer, int64_t T, KvCache* cache, float* q, float* kv, float* out);
  void ensure_workspace(int64_t T);

  ModelConfig config_;
  LoadStats stats_;
  DenseGemm gemm_;
  std::vector<float> embed_;    // [vocab, hidden]
  std::vector<float> lm_head_;  // [vocab, hidden] (a copy of embed_ when tied)
  std::vector<float> final_norm_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [rotary_dim / 2]
  moekit_workspace* ws_ = nullptr;
  size_t ws_bytes_ = 0;
  OpTimes times_;
  std::map<std::string, std::string> kernels_;
  // Scratch reused across calls.
  std::vector<float> x_, a_, b_, q_, kv_, attn_, scores_, router_logits_, topk_w_;
  std::vector<int32_t> topk_ids_;
};

// Peak resident set of this process (getrusage ru_maxrss), in bytes.
size_t peak_rss_bytes();

}  // namespace moekit::m2

#endif  // MOEKIT_MODEL_MODEL_H_
