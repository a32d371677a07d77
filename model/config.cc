#include "model/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"

namespace moekit::m2 {
namespace {

using nlohmann::json;

class Fields {
 public:
  Fields(const json& j, std::string file) : j_(j), file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw ModelError(file_ + ": field '" + field + "' " + what);
  }
  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  int64_t integer(const char* key, bool required, int64_t fallback = 0) const {
    if (!has(key)) {
      if (required) fail(key, "is missing");
      return fallback;
    }
    const json& v = j_[key];
    if (!v.is_number_integer()) fail(key, "must be an integer, got " + v.dump());
    return v.get<int64_t>();
  }
  int64_t positive(const char* key, bool required, int64_t fallback = 0) const {
    const int64_t v = integer(key, required, fallback);
    if (has(key) && (v < 1 || v > (int64_t{1} << 24)))
      fail(key, "must be in [1, 2^24], got " + std::to_string(v));
    return v;
  }
  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_number()) fail(key, "must be a number, got " + v.dump());
    return v.get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_boolean()) fail(key, "must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_string()) fail(key, "must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  const json& raw(const char* key) const { return j_[key]; }

 private:
  const json& j_;
  std::string file_;
};

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw ModelError(path.string() + ": cannot open");
  json j = json::parse(in, nullptr, false);
  if (j.is_discarded()) throw ModelError(path.string() + ": not valid JSON");
  if (!j.is_object()) throw ModelError(path.string() + ": not a JSON object");
  return j;
}

void read_eos(const Fields& f, const json& j, const std::string& file, std::vector<int64_t>* out) {
  if (!j.contains("eos_token_id") || j["eos_token_id"].is_null()) return;
  const json& v = j["eos_token_id"];
  out->clear();
  if (v.is_number_integer()) {
    out->push_back(v.get<int64_t>());
  } else if (v.is_array()) {
    for (const json& e : v) {
      if (!e.is_number_integer()) f.fail("eos_token_id", "must hold integers, got " + v.dump());
      out->push_back(e.get<int64_t>());
    }
  } else {
    f.fail("eos_token_id", "must be an integer or a list of integers, got " + v.dump());
  }
}

}  // namespace

ModelConfig read_config(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw ModelError(dir + ": not a directory");
  const fs::path path = fs::path(dir) / "config.json";
  const std::string file = path.string();
  const json j = read_json(path);
  const Fields f(j, file);
  ModelConfig c;

  const std::string model_type = f.string("model_type", "minimax_m2");
  if (model_type != "minimax_m2" && model_type != "minimax")
    f.fail("model_type", "is '" + model_type + "', not a MiniMax-M2 model ('minimax_m2')");
  const std::string act = f.string("hidden_act", "silu");
  if (act != "silu") f.fail("hidden_act", "'" + act + "' is not supported (only silu)");

  c.hidden_size = f.positive("hidden_size", true);
  c.intermediate_size = f.positive("intermediate_size", true);
  c.num_hidden_layers = f.positive("num_hidden_layers", true);
  c.num_attention_heads = f.positive("num_attention_heads", true);
  c.num_key_value_heads = f.positive("num_key_value_heads", false, c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    f.fail("num_key_value_heads", "(" + std::to_string(c.num_key_value_heads) +
                                      ") must divide num_attention_heads (" +
                                      std::to_string(c.num_attention_heads) + ")");
  c.head_dim = f.positive("head_dim", false, c.hidden_size / c.num_attention_heads);
  if (c.head_dim < 1) f.fail("head_dim", "is missing and hidden_size / num_attention_heads is 0");
  c.num_local_experts = f.positive("num_local_experts", true);
  c.num_experts_per_tok = f.positive("num_experts_per_tok", true);
  if (c.num_experts_per_tok > c.num_local_experts)
    f.fail("num_experts_per_tok", "exceeds num_local_experts");
  c.vocab_size = f.positive("vocab_size", true);
  c.max_position_embeddings = f.positive("max_position_embeddings", false, 0);

  // rotary_dim (hub field), else partial_rotary_factor * head_dim, else the whole head.
  if (f.has("rotary_dim")) {
    c.rotary_dim = f.positive("rotary_dim", true);
  } else {
    const double factor = f.number("partial_rotary_factor", 1.0);
    c.rotary_dim = static_cast<int64_t>(std::llround(factor * static_cast<double>(c.head_dim)));
  }
  if (c.rotary_dim < 2 || c.rotary_dim > c.head_dim || c.rotary_dim % 2 != 0)
    f.fail("rotary_dim", "must be even and in [2, head_dim], got " + std::to_string(c.rotary_dim));

  c.rope_theta = f.number("rope_theta", 0.0);
  if (c.rope_theta == 0.0 && f.has("rope_parameters")) {
    const json& rp = f.raw("rope_parameters");
    if (!rp.is_object()) f.fail("rope_parameters", "must be an object");
    const Fields rpf(rp, file + " rope_parameters");
    const std::string type = rpf.string("rope_type", "default");
    if (type != "default") rpf.fail("rope_type", "'" + type + "' is not supported (only default)");
    c.rope_theta = rpf.number("rope_theta", 10000.0);
  }
  if (c.rope_theta == 0.0) c.rope_theta = 10000.0;
  if (!(c.rope_theta > 0.0)) f.fail("rope_theta", "must be positive");
  if (f.has("rope_scaling")) f.fail("rope_scaling", "is not supported");
  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  // The norms add it in f32.
  if (!(c.rms_norm_eps > 0.0 && c.rms_norm_eps <= std::numeric_limits<float>::max()))
    f.fail("rms_norm_eps", "must be positive and finite in f32");

  const std::string scoring = f.string("scoring_func", "sigmoid");
  if (scoring != "sigmoid")
    f.fail("scoring_func", "'" + scoring + "' is not supported (only sigmoid)");
  c.use_routing_bias = f.boolean("use_routing_bias", true);
  c.use_qk_norm = f.boolean("use_qk_norm", true);
  const std::string qk_type = f.string("qk_norm_type", "per_layer");
  if (c.use_qk_norm && qk_type != "per_layer")
    f.fail("qk_norm_type", "'" + qk_type + "' is not supported (only per_layer)");
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  // Read for callers that want it; transformers' MiniMax-M2 does not apply it to the routing
  // weights, and neither does this model.
  c.routed_scaling_factor = f.number("routed_scaling_factor", 1.0);
  if (f.integer("shared_intermediate_size", false, 0) != 0)
    f.fail("shared_intermediate_size", "is non-zero: shared experts are not supported");
  if (f.has("attn_type_list")) {
    const json& types = f.raw("attn_type_list");
    if (!types.is_array()) f.fail("attn_type_list", "must be a list");
    for (const json& t : types)
      if (!t.is_number_integer() || t.get<int64_t>() != 1)
        f.fail("attn_type_list", "holds " + t.dump() + ": only full attention (1) is supported");
  }

  if (f.has("quantization_config")) {
    const json& q = f.raw("quantization_config");
    if (!q.is_object()) f.fail("quantization_config", "must be an object");
    const Fields qf(q, file + " quantization_config");
    const std::string method = qf.string("quant_method", "");
    if (method != "fp8")
      qf.fail("quant_method", "'" + method + "' is not supported (only fp8 block quantization)");
    const std::string fmt = qf.string("fmt", "float8_e4m3fn");
    if (fmt != "float8_e4m3fn" && fmt != "e4m3")
      qf.fail("fmt", "'" + fmt + "' is not supported (only float8_e4m3fn)");
    c.fp8 = true;
    c.block_n = c.block_k = 128;  // the FP8 format's default block
    if (qf.has("weight_block_size")) {
      const json& b = q["weight_block_size"];
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() ||
          !b[1].is_number_integer() || b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1)
        qf.fail("weight_block_size", "must be two positive integers, got " + b.dump());
      c.block_n = b[0].get<int64_t>();
      c.block_k = b[1].get<int64_t>();
    }
  }

  read_eos(f, j, file, &c.eos_token_ids);
  const fs::path gen_path = fs::path(dir) / "generation_config.json";
  if (fs::exists(gen_path, ec)) {
    const json g = read_json(gen_path);
    read_eos(Fields(g, gen_path.string()), g, gen_path.string(), &c.eos_token_ids);
  }
  return c;
}

}  // namespace moekit::m2
