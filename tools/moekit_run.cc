// moekit-run: loads a MiniMax-M2 checkpoint folder and generates from a prompt of token ids.
// With no arguments it runs the tiny model shipped with the sources on the golden fixture's
// prompt. `--json` prints one JSON object with the tokens, the speeds, the peak RSS and the
// kernel each op used.
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/generate.h"
#include "model/model.h"
#include "moekit/moekit.h"

#ifndef MOEKIT_DEFAULT_MODEL_DIR
#define MOEKIT_DEFAULT_MODEL_DIR "model/testdata/tiny-m2-bf16"
#endif

namespace {

// The prompt of the tiny-m2 golden fixture (expected-*.safetensors: input_ids).
const std::vector<int32_t> kDefaultPrompt = {499, 328, 354, 229, 379, 454, 344, 241, 142, 508,
                                             360, 80,  304, 40,  407, 28,  321, 416, 222, 79};

void usage() {
  std::printf(
      "usage: moekit-run [options]\n"
      "  --model DIR            Hugging Face MiniMax-M2 folder (default: the tiny test model)\n"
      "  --prompt-ids 1,2,3     prompt token ids (default: the test fixture's 20 ids)\n"
      "  --max-new-tokens N     tokens to generate (default 8)\n"
      "  --temperature T        0 = greedy (default)\n"
      "  --top-k K --top-p P    sampling cuts (default: none)\n"
      "  --seed S               sampling seed (default 0)\n"
      "  --threads N            kernel threads (default: physical cores)\n"
      "  --gemm openblas|onednn backend of the dense projections (default openblas)\n"
      "  --f32-experts          widen expert weights to f32 before packing (f32 math, more "
      "memory)\n"
      "  --no-eos               do not stop at the config's EOS ids\n"
      "  --quiet                no progress or summary on stderr\n"
      "  --json                 one JSON object on stdout\n");
}

[[noreturn]] void bad(const std::string& what) {
  std::fprintf(stderr, "moekit-run: %s (try --help)\n", what.c_str());
  std::exit(2);
}

long long parse_int(const char* flag, const char* s) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || *end) bad(std::string(flag) + ": '" + s + "' is not an integer");
  if (errno == ERANGE) bad(std::string(flag) + ": '" + s + "' is out of range");
  return v;
}

uint64_t parse_uint64(const char* flag, const char* s) {
  const char* p = s;
  while (std::isspace(static_cast<unsigned char>(*p))) ++p;
  // strtoull would take "-1" as 2^64 - 1.
  if (*p == '-') bad(std::string(flag) + ": '" + s + "' is negative");
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (end == s || *end) bad(std::string(flag) + ": '" + s + "' is not an integer");
  if (errno == ERANGE) bad(std::string(flag) + ": '" + s + "' is out of range");
  return v;
}

double parse_double(const char* flag, const char* s) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s, &end);
  if (end == s || *end) bad(std::string(flag) + ": '" + s + "' is not a number");
  if (errno == ERANGE) bad(std::string(flag) + ": '" + s + "' is out of range");
  return v;
}

// Comma-separated ids; spaces are allowed around the commas only, so "1 2" is an error rather
// than the id 12.
std::vector<int32_t> parse_ids(const char* s) {
  std::vector<int32_t> ids;
  const std::string text(s);
  if (text.find_first_not_of(' ') == std::string::npos) bad("--prompt-ids: the prompt is empty");
  for (size_t begin = 0; begin <= text.size();) {
    const size_t end = std::min(text.find(',', begin), text.size());
    const size_t first = text.find_first_not_of(' ', begin);
    if (first >= end) bad(std::string("--prompt-ids: empty item in '") + s + "'");
    // first < end, so the item holds a character that is not a space at or after `first`.
    const std::string item = text.substr(first, text.find_last_not_of(' ', end - 1) + 1 - first);
    const long long v = parse_int("--prompt-ids", item.c_str());
    if (v < 0 || v > INT32_MAX) bad("--prompt-ids: " + item + " is out of range");
    ids.push_back(static_cast<int32_t>(v));
    begin = end + 1;
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir = MOEKIT_DEFAULT_MODEL_DIR;
  std::vector<int32_t> prompt = kDefaultPrompt;
  moekit::m2::GenerateOptions gen;
  gen.max_new_tokens = 8;
  moekit::m2::LoadOptions load;
  int threads = 0;
  bool quiet = false, json = false, top_k_given = false, top_p_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) bad(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else if (a == "--model") {
      model_dir = value();
    } else if (a == "--prompt-ids") {
      prompt = parse_ids(value());
    } else if (a == "--max-new-tokens") {
      gen.max_new_tokens = parse_int("--max-new-tokens", value());
      if (gen.max_new_tokens < 0) bad("--max-new-tokens must be >= 0");
    } else if (a == "--temperature") {
      gen.sampling.temperature = static_cast<float>(parse_double("--temperature", value()));
      // The sampler treats anything not > 0 as greedy: a typo must not silently mean that.
      if (!std::isfinite(gen.sampling.temperature) || gen.sampling.temperature < 0.0f)
        bad("--temperature must be a finite number >= 0");
    } else if (a == "--top-k") {
      gen.sampling.top_k = parse_int("--top-k", value());
      if (gen.sampling.top_k < 0) bad("--top-k must be >= 0");
      top_k_given = true;
    } else if (a == "--top-p") {
      gen.sampling.top_p = static_cast<float>(parse_double("--top-p", value()));
      if (!(gen.sampling.top_p > 0.0f && gen.sampling.top_p <= 1.0f))
        bad("--top-p must be in (0, 1]");
      top_p_given = true;
    } else if (a == "--seed") {
      gen.sampling.seed = parse_uint64("--seed", value());
    } else if (a == "--threads") {
      // The range check on the wide value: a cast first would wrap 2^32 + 1 to 1.
      const long long n = parse_int("--threads", value());
      if (n < 1 || n > 4096) bad("--threads must be in [1, 4096]");
      threads = static_cast<int>(n);
    } else if (a == "--gemm") {
      const std::string g = value();
      if (g == "openblas")
        load.gemm = moekit::m2::GemmBackend::kOpenBlas;
      else if (g == "onednn")
        load.gemm = moekit::m2::GemmBackend::kOneDnn;
      else
        bad("--gemm: '" + g + "' is not openblas or onednn");
    } else if (a == "--f32-experts") {
      load.expert_precision = moekit::m2::ExpertPrecision::kF32;
    } else if (a == "--no-eos") {
      gen.stop_at_eos = false;
    } else if (a == "--quiet") {
      quiet = true;
    } else if (a == "--json") {
      json = true;
    } else {
      bad("unknown argument '" + a + "'");
    }
  }
  if (prompt.empty()) bad("--prompt-ids: the prompt is empty");
  if (gen.sampling.temperature == 0.0f && (top_k_given || top_p_given))
    std::fprintf(stderr, "moekit-run: note: %s no effect with greedy decoding (--temperature 0)\n",
                 top_k_given && top_p_given ? "--top-k and --top-p have"
                 : top_k_given              ? "--top-k has"
                                            : "--top-p has");
  if (threads > 0) {
    if (moekit_set_num_threads(threads) != MOEKIT_OK) bad(moekit_last_error());
    moekit::m2::DenseGemm::set_threads(threads);
  } else {
    moekit::m2::DenseGemm::set_threads(moekit_num_threads());
  }
  load.progress = !quiet;

  std::unique_ptr<moekit::m2::Model> model;
  moekit::m2::GenerateResult result;
  try {
    model = moekit::m2::Model::load(model_dir, load);
    result = moekit::m2::generate(*model, prompt, gen);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moekit-run: %s\n", e.what());
    return 1;
  }

  if (result.stopped_at_position_limit)
    std::fprintf(stderr,
                 "moekit-run: note: stopped after %zu of %lld new tokens at the model's "
                 "max_position_embeddings (%lld)\n",
                 result.new_ids.size(), static_cast<long long>(gen.max_new_tokens),
                 static_cast<long long>(model->config().max_position_embeddings));

  const moekit::m2::LoadStats& ls = model->load_stats();
  const double prefill_tps =
      result.prefill_seconds > 0 ? result.prompt_tokens / result.prefill_seconds : 0;
  const double decode_tps =
      result.decode_seconds > 0 ? result.decode_steps / result.decode_seconds : 0;
  const moekit::m2::OpTimes& t = model->times();
  if (json) {
    nlohmann::ordered_json j;
    j["model"] = model_dir;
    j["prompt_ids"] = prompt;
    j["generated_ids"] = result.new_ids;
    j["stopped_at_eos"] = result.stopped_at_eos;
    j["stopped_at_position_limit"] = result.stopped_at_position_limit;
    j["prefill_tokens"] = result.prompt_tokens;
    j["decode_steps"] = result.decode_steps;
    j["prefill_tokens_per_s"] = prefill_tps;
    j["decode_tokens_per_s"] = decode_tps;
    j["load_seconds"] = ls.seconds;
    j["peak_rss_bytes"] = moekit::m2::peak_rss_bytes();
    j["checkpoint_bytes"] = ls.checkpoint_bytes;
    j["packed_expert_bytes"] = ls.packed_expert_bytes;
    j["dense_weight_bytes"] = ls.dense_bytes;
    j["expert_dtype"] = ls.expert_dtype;
    j["expert_layout"] = ls.expert_layout;
    j["threads"] = moekit_num_threads();
    j["isa"] = moekit_isa_name(moekit_effective_isa());
    j["kernels"] = model->kernels();
    j["time_split_s"] = {{"attention", t.attention},
                         {"routing", t.routing},
                         {"experts", t.experts},
                         {"rest", t.rest}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("generated:");
    for (int32_t id : result.new_ids) std::printf(" %d", id);
    std::printf("\n");
    if (!quiet) {
      std::fprintf(stderr,
                   "prefill %lld tokens: %.1f tokens/s; decode %lld steps: %.1f tokens/s; "
                   "peak RSS %.1f MB; experts %s (%s layout)\n",
                   static_cast<long long>(result.prompt_tokens), prefill_tps,
                   static_cast<long long>(result.decode_steps), decode_tps,
                   moekit::m2::peak_rss_bytes() / 1e6, ls.expert_dtype.c_str(),
                   ls.expert_layout.c_str());
      for (const auto& [op, impl] : model->kernels())
        std::fprintf(stderr, "  %-18s %s\n", op.c_str(), impl.c_str());
    }
  }
  return 0;
}
