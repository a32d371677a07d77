// The MiniMax-M2 config.json fields the model uses, read with the Hugging Face defaults.
#ifndef MOEKIT_MODEL_CONFIG_H_
#define MOEKIT_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

namespace moekit::m2 {

struct ModelConfig {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // expert width
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // default: num_attention_heads
  int64_t head_dim = 0;             // default: hidden_size / num_attention_heads
  int64_t num_local_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t rotary_dim = 0;  // default: head_dim (or head_dim * partial_rotary_factor)
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool use_routing_bias = true;
  bool use_qk_norm = true;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;  // 0: not in the config (no limit)
  bool tie_word_embeddings = false;
  double routed_scaling_factor = 1.0;  // read, not applied (nor is it by transformers)
  std::vector<int64_t> eos_token_ids;  // config.json / generation_config.json; may be empty

  // FP8 block quantization (quantization_config.quant_method == "fp8").
  bool fp8 = false;
  int64_t block_n = 0, block_k = 0;

  int64_t q_width() const { return num_attention_heads * head_dim; }
  int64_t kv_width() const { return num_key_value_heads * head_dim; }
};

// Reads <dir>/config.json (and eos ids from generation_config.json when present). Throws
// ModelError naming the file and field for a missing or mistyped field, and refuses, with the
// reason, settings this implementation does not compute (per-head QK-norm, softmax scoring,
// shared experts, linear attention layers, non-FP8 quantization).
ModelConfig read_config(const std::string& dir);

}  // namespace moekit::m2

#endif  // MOEKIT_MODEL_CONFIG_H_
