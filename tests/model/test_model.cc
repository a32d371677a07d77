// MiniMax-M2 model tests on the tiny-m2 fixture (model/testdata): every intermediate of the
// forward pass against the golden tensors (bf16 and fp8 checkpoints, both dense-GEMM backends),
// greedy generation, prefill-then-decode against one full forward, sampling, and loading of
// broken checkpoints, which must fail with a message naming the file and the tensor or field.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "model/generate.h"
#include "model/model.h"
#include "model/safetensors.h"

namespace {

namespace fs = std::filesystem;
using moekit::m2::ExpertPrecision;
using moekit::m2::GemmBackend;
using moekit::m2::KvCache;
using moekit::m2::Model;
using moekit::m2::ModelError;
using moekit::m2::SafetensorsFile;
using moekit::m2::TensorInfo;
using moekit::m2::Trace;

const std::string kTestdata = MOEKIT_MODEL_TESTDATA_DIR;
constexpr double kRelTolerance = 1e-3;  // max|diff| <= 1e-3 * max|expected| (fixture README)
constexpr double kRouteWeightTolerance = 1e-5;

std::string model_dir(const std::string& variant) { return kTestdata + "/tiny-m2-" + variant; }
std::string golden_path(const std::string& variant) {
  return kTestdata + "/golden/expected-" + variant + ".safetensors";
}

std::vector<float> read_f32(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo& t = f.tensors().at(name);
  EXPECT_EQ(t.dtype, "F32") << name;
  std::vector<float> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), t.data, v.size() * 4);
  return v;
}

std::vector<int64_t> read_ints(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo& t = f.tensors().at(name);
  std::vector<int64_t> v(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = t.dtype == "I64" ? reinterpret_cast<const int64_t*>(t.data)[i]
                            : reinterpret_cast<const int32_t*>(t.data)[i];
  return v;
}

// max|got - want| / max|want|; fails the test above the fixture's tolerance.
double expect_close(const std::vector<float>& got, const std::vector<float>& want,
                    const std::string& what, double rel = kRelTolerance) {
  EXPECT_EQ(got.size(), want.size()) << what;
  if (got.size() != want.size()) return INFINITY;
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    max_diff = std::isnan(d) ? INFINITY : std::max(max_diff, d);
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(want[i])));
  }
  EXPECT_LE(max_diff, rel * max_ref)
      << what << ": max|diff| " << max_diff << ", max|expected| " << max_ref;
  return max_diff / max_ref;
}

struct Golden {
  std::unique_ptr<SafetensorsFile> file;
  std::vector<int32_t> prompt;
};

Golden load_golden(const std::string& variant) {
  Golden g;
  g.file = SafetensorsFile::open(golden_path(variant));
  for (int64_t id : read_ints(*g.file, "input_ids")) g.prompt.push_back(static_cast<int32_t>(id));
  return g;
}

// kF32 experts: f32 math throughout, comparable with the f32 golden tensors at 1e-3.
std::unique_ptr<Model> load_model(const std::string& variant, GemmBackend backend,
                                  ExpertPrecision precision = ExpertPrecision::kF32) {
  moekit::m2::LoadOptions o;
  o.gemm = backend;
  o.expert_precision = precision;
  return Model::load(model_dir(variant), o);
}

// The fixture's gate for BF16 activations (README "Tolerances"): max abs <= 0.25, mean abs
// <= 0.03, per-position cosine >= 0.999, argmax agreeing at >= 18 of 20 positions.
void expect_bf16_gate(const std::vector<float>& got, const std::vector<float>& want, int64_t V,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  const int64_t rows = static_cast<int64_t>(want.size()) / V;
  double max_abs = 0, sum_abs = 0, min_cos = 1;
  int64_t argmax_agree = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = &got[r * V];
    const float* w = &want[r * V];
    double dot = 0, gg = 0, ww = 0;
    for (int64_t i = 0; i < V; ++i) {
      const double d = std::fabs(static_cast<double>(g[i]) - w[i]);
      max_abs = std::isnan(d) ? INFINITY : std::max(max_abs, d);
      sum_abs += d;
      dot += static_cast<double>(g[i]) * w[i];
      gg += static_cast<double>(g[i]) * g[i];
      ww += static_cast<double>(w[i]) * w[i];
    }
    min_cos = std::min(min_cos, dot / std::sqrt(gg * ww));
    argmax_agree += std::max_element(g, g + V) - g == std::max_element(w, w + V) - w;
  }
  const double mean_abs = sum_abs / static_cast<double>(want.size());
  EXPECT_LE(max_abs, 0.25) << what;
  EXPECT_LE(mean_abs, 0.03) << what;
  EXPECT_GE(min_cos, 0.999) << what;
  EXPECT_GE(argmax_agree * 20, 18 * rows) << what;
  std::printf("%s: max|diff| %.3g, mean|diff| %.3g, min cosine %.6f, argmax %lld/%lld\n",
              what.c_str(), max_abs, mean_abs, min_cos, static_cast<long long>(argmax_agree),
              static_cast<long long>(rows));
}

// ---- golden comparisons ----------------------------------------------------------------------

struct GoldenCase {
  std::string variant;
  GemmBackend backend;
};

class GoldenTest : public testing::TestWithParam<GoldenCase> {};

TEST_P(GoldenTest, EveryIntermediateOfThePromptForward) {
  const GoldenCase& p = GetParam();
  Golden g = load_golden(p.variant);
  auto model = load_model(p.variant, p.backend);
  const int64_t T = static_cast<int64_t>(g.prompt.size()), V = model->config().vocab_size;
  const int64_t k = model->config().num_experts_per_tok;
  KvCache cache(*model);
  std::vector<float> logits(static_cast<size_t>(T * V), NAN);
  Trace trace;
  model->forward(g.prompt.data(), T, &cache, logits.data(), true, &trace);
  EXPECT_EQ(cache.length(), T);

  double worst = expect_close(logits, read_f32(*g.file, "logits"), "logits");
  std::printf("[%s/%s] logits max|diff|/max|expected| = %.3g\n", p.variant.c_str(),
              moekit::m2::gemm_backend_name(p.backend), worst);
  std::vector<std::string> names = {"hidden.embed", "hidden.final_norm", "rope.cos", "rope.sin",
                                    "rope.inv_freq"};
  for (int L = 0; L < model->config().num_hidden_layers; ++L)
    for (const char* n : {"attn.in", "attn.q_normed", "attn.k_normed", "attn.v", "attn.out",
                          "moe.in", "router.logits", "moe.out", "hidden"})
      names.push_back(std::string(n) + ".layer." + std::to_string(L));
  double worst_intermediate = 0;
  for (const std::string& n : names) {
    ASSERT_TRUE(trace.f32.count(n)) << n << " was not traced";
    worst_intermediate =
        std::max(worst_intermediate, expect_close(trace.f32[n], read_f32(*g.file, n), n));
  }
  std::printf("[%s/%s] worst intermediate max|diff|/max|expected| = %.3g\n", p.variant.c_str(),
              moekit::m2::gemm_backend_name(p.backend), worst_intermediate);

  // Router: the chosen experts as sets, and each chosen expert's weight.
  double worst_weight = 0;
  for (int L = 0; L < model->config().num_hidden_layers; ++L) {
    const std::string s = ".layer." + std::to_string(L);
    const std::vector<int64_t> want_ids = read_ints(*g.file, "router.topk_ids" + s);
    const std::vector<float> want_w = read_f32(*g.file, "router.topk_weights" + s);
    const std::vector<int32_t>& got_ids = trace.i32.at("router.topk_ids" + s);
    const std::vector<float>& got_w = trace.f32.at("router.topk_weights" + s);
    for (int64_t t = 0; t < T; ++t) {
      std::map<int64_t, float> want, got;
      for (int64_t j = 0; j < k; ++j) {
        want[want_ids[t * k + j]] = want_w[t * k + j];
        got[got_ids[t * k + j]] = got_w[t * k + j];
      }
      std::set<int64_t> want_set, got_set;
      for (auto& [id, w] : want) want_set.insert(id);
      for (auto& [id, w] : got) got_set.insert(id);
      ASSERT_EQ(got_set, want_set) << "experts of token " << t << " layer " << L;
      for (auto& [id, w] : want) {
        const double d = std::fabs(got[id] - w);
        worst_weight = std::max(worst_weight, d);
        EXPECT_LE(d, kRouteWeightTolerance) << "weight of expert " << id << ", token " << t;
      }
    }
  }
  std::printf("[%s/%s] router weights max|diff| = %.3g\n", p.variant.c_str(),
              moekit::m2::gemm_backend_name(p.backend), worst_weight);
}

TEST_P(GoldenTest, GreedyGenerationMatches) {
  const GoldenCase& p = GetParam();
  Golden g = load_golden(p.variant);
  auto model = load_model(p.variant, p.backend);
  const std::vector<int64_t> want_ids = read_ints(*g.file, "gen.new_ids");
  moekit::m2::GenerateOptions o;
  o.max_new_tokens = static_cast<int64_t>(want_ids.size());
  o.keep_step_logits = true;
  const moekit::m2::GenerateResult r = moekit::m2::generate(*model, g.prompt, o);
  ASSERT_EQ(r.new_ids.size(), want_ids.size());
  for (size_t i = 0; i < want_ids.size(); ++i)
    EXPECT_EQ(r.new_ids[i], want_ids[i]) << "token " << i;
  EXPECT_EQ(r.decode_steps, static_cast<int64_t>(want_ids.size()) - 1);
  const double d =
      expect_close(r.step_logits, read_f32(*g.file, "gen.step_logits"), "gen.step_logits");
  std::printf("[%s/%s] step logits max|diff|/max|expected| = %.3g\n", p.variant.c_str(),
              moekit::m2::gemm_backend_name(p.backend), d);
}

// Prefill, then one token at a time, equals one forward over the whole sequence, and both
// equal the fixture's no-cache logits of the 28-token sequence.
TEST_P(GoldenTest, PrefillThenDecodeEqualsFullForward) {
  const GoldenCase& p = GetParam();
  Golden g = load_golden(p.variant);
  auto model = load_model(p.variant, p.backend);
  std::vector<int32_t> seq;
  for (int64_t id : read_ints(*g.file, "gen.sequence")) seq.push_back(static_cast<int32_t>(id));
  const int64_t S = static_cast<int64_t>(seq.size()), V = model->config().vocab_size;

  std::vector<float> full(static_cast<size_t>(S * V), NAN);
  KvCache c1(*model);
  model->forward(seq.data(), S, &c1, full.data(), true);
  expect_close(full, read_f32(*g.file, "gen.full_logits"), "gen.full_logits");

  // Chunked prefill (7 + 13 tokens), then single-token steps.
  std::vector<float> incremental(static_cast<size_t>(S * V), NAN);
  KvCache c2(*model, 4);  // small capacity: forces the cache to grow
  model->forward(seq.data(), 7, &c2, incremental.data(), true);
  model->forward(seq.data() + 7, 13, &c2, incremental.data() + 7 * V, true);
  for (int64_t t = 20; t < S; ++t)
    model->forward(&seq[t], 1, &c2, incremental.data() + t * V, false);
  EXPECT_EQ(c2.length(), S);
  const double d = expect_close(incremental, full, "incremental vs full", 1e-5);
  std::printf("[%s/%s] cached decode vs full forward: max|diff|/max = %.3g\n", p.variant.c_str(),
              moekit::m2::gemm_backend_name(p.backend), d);
}

INSTANTIATE_TEST_SUITE_P(TinyM2, GoldenTest,
                         testing::Values(GoldenCase{"bf16", GemmBackend::kOpenBlas},
                                         GoldenCase{"fp8", GemmBackend::kOpenBlas},
                                         GoldenCase{"bf16", GemmBackend::kOneDnn},
                                         GoldenCase{"fp8", GemmBackend::kOneDnn}),
                         [](const testing::TestParamInfo<GoldenCase>& info) {
                           return info.param.variant + "_" +
                                  moekit::m2::gemm_backend_name(info.param.backend);
                         });

// Experts packed as stored (bf16 / FP8) run on whatever kernels dispatch picks on this machine.
// Those may compute with bf16 activations, so the f32 gate applies only when the reference ran;
// otherwise the fixture's BF16-activation gate does.
class NativeExpertsTest : public testing::TestWithParam<std::string> {};

TEST_P(NativeExpertsTest, LogitsWithinTheGateOfTheKernelsPrecision) {
  const std::string variant = GetParam();
  Golden g = load_golden(variant);
  auto model = load_model(variant, GemmBackend::kOpenBlas, ExpertPrecision::kCheckpoint);
  EXPECT_EQ(model->load_stats().expert_dtype, variant == "fp8" ? "fp8_e4m3" : "bf16");
  const int64_t T = static_cast<int64_t>(g.prompt.size()), V = model->config().vocab_size;
  KvCache cache(*model);
  std::vector<float> logits(static_cast<size_t>(T * V), NAN);
  model->forward(g.prompt.data(), T, &cache, logits.data(), true);
  const std::string impl = model->kernels().at("fused_moe");
  std::printf("[%s native] fused_moe: %s, layout %s\n", variant.c_str(), impl.c_str(),
              model->load_stats().expert_layout.c_str());
  const std::vector<float> want = read_f32(*g.file, "logits");
  if (impl.rfind("ref", 0) == 0)
    expect_close(logits, want, "logits (reference experts)");
  else
    expect_bf16_gate(logits, want, V, "[" + variant + " native] logits vs f32 golden");

  // Cached decode stays close to the full forward (kernels may differ with the batch size).
  std::vector<int32_t> seq;
  for (int64_t id : read_ints(*g.file, "gen.sequence")) seq.push_back(static_cast<int32_t>(id));
  const int64_t S = static_cast<int64_t>(seq.size());
  std::vector<float> full(static_cast<size_t>(S * V)), step(static_cast<size_t>(S * V));
  KvCache c1(*model), c2(*model);
  model->forward(seq.data(), S, &c1, full.data(), true);
  model->forward(seq.data(), T, &c2, step.data(), true);
  for (int64_t t = T; t < S; ++t) model->forward(&seq[t], 1, &c2, step.data() + t * V, false);
  expect_bf16_gate(step, full, V, "[" + variant + " native] cached decode vs full forward");
}

INSTANTIATE_TEST_SUITE_P(TinyM2, NativeExpertsTest, testing::Values("bf16", "fp8"));

TEST(Model, LoadStatsAndKernels) {
  auto model = load_model("fp8", GemmBackend::kOpenBlas, ExpertPrecision::kCheckpoint);
  const moekit::m2::LoadStats& s = model->load_stats();
  EXPECT_EQ(s.expert_dtype, "fp8_e4m3");
  EXPECT_GT(s.packed_expert_bytes,
            size_t{2} * 16 * 3 * 128 * 256);  // 2 layers x 16 experts x 3 fp8
  EXPECT_GT(s.peak_rss_bytes, 0u);
  EXPECT_EQ(model->config().block_n, 128);
  EXPECT_EQ(model->config().rotary_dim, 16);
  KvCache cache(*model);
  std::vector<float> logits(static_cast<size_t>(model->config().vocab_size));
  const int32_t id = 5;
  model->forward(&id, 1, &cache, logits.data(), false);
  const auto kernels = model->kernels();
  for (const char* op :
       {"fused_moe", "router_topk", "qk_norm", "fused_add_rmsnorm", "dense_gemm"}) {
    ASSERT_TRUE(kernels.count(op)) << op;
    EXPECT_FALSE(kernels.at(op).empty()) << op;
  }
  EXPECT_GT(model->times().experts, 0.0);
}

TEST(Model, RejectsBadTokenIds) {
  auto model = load_model("bf16", GemmBackend::kOpenBlas);
  KvCache cache(*model);
  std::vector<float> logits(static_cast<size_t>(model->config().vocab_size));
  const int32_t bad = 512;
  try {
    model->forward(&bad, 1, &cache, logits.data(), false);
    FAIL() << "no error";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("512"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.length(), 0);
}

// ---- sampling ------------------------------------------------------------------------------

TEST(Sampler, GreedyIsArgmaxWithTiesToLowerId) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  moekit::m2::Sampler s({});
  EXPECT_EQ(s.next(logits.data(), 4), 1);
}

TEST(Sampler, SeededSamplingIsReproducibleAndRespectsCuts) {
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(static_cast<float>(i)) * 3.0f;
  std::vector<int> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });

  moekit::m2::SamplingParams p;
  p.temperature = 1.5f;
  p.top_k = 5;
  p.seed = 42;
  moekit::m2::Sampler a(p), b(p);
  const std::set<int> top5(order.begin(), order.begin() + 5);
  std::set<int> seen;
  for (int i = 0; i < 2000; ++i) {
    const int32_t x = a.next(logits.data(), 50);
    EXPECT_EQ(x, b.next(logits.data(), 50));
    EXPECT_TRUE(top5.count(x)) << x;
    seen.insert(x);
  }
  EXPECT_EQ(seen.size(), 5u);  // every kept token is drawn at temperature 1.5

  p.top_k = 0;
  p.top_p = 1e-6f;  // the nucleus keeps only the top token
  moekit::m2::Sampler c(p);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(c.next(logits.data(), 50), order[0]);

  p.top_p = 1.0f;
  p.seed = 43;
  moekit::m2::Sampler d(p), e(moekit::m2::SamplingParams{1.5f, 0, 1.0f, 44});
  int differ = 0;
  for (int i = 0; i < 100; ++i) differ += d.next(logits.data(), 50) != e.next(logits.data(), 50);
  EXPECT_GT(differ, 0);  // the seed matters
}

// A copy of the tiny bf16 model in a temporary folder `name`, its config.json edited by `edit`.
fs::path edited_copy_of_tiny_model(const std::string& name,
                                   const std::function<void(nlohmann::json&)>& edit) {
  const fs::path dir = fs::path(testing::TempDir()) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(model_dir("bf16") + "/model.safetensors", dir / "model.safetensors");
  std::ifstream in(model_dir("bf16") + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  edit(cfg);
  std::ofstream(dir / "config.json") << cfg.dump();
  return dir;
}

TEST(Generate, StopsAtEos) {
  // A copy of the tiny model whose config names the first greedy token as EOS.
  const fs::path dir = edited_copy_of_tiny_model("moekit_eos_model", [](nlohmann::json& c) {
    c["eos_token_id"] = {7, 405};
  });
  moekit::m2::LoadOptions lo;
  lo.expert_precision = ExpertPrecision::kF32;
  auto model = Model::load(dir.string(), lo);
  Golden g = load_golden("bf16");
  moekit::m2::GenerateOptions o;
  o.max_new_tokens = 8;
  moekit::m2::GenerateResult r = moekit::m2::generate(*model, g.prompt, o);
  EXPECT_TRUE(r.stopped_at_eos);
  EXPECT_EQ(r.new_ids, (std::vector<int32_t>{462, 405}));
  o.stop_at_eos = false;
  r = moekit::m2::generate(*model, g.prompt, o);
  EXPECT_EQ(r.new_ids.size(), 8u);
  fs::remove_all(dir);
}

// max_new_tokens 0 runs no forward (so no prefill is reported) but still refuses a bad prompt.
TEST(Generate, NoNewTokensRunsNoPrefillButChecksTheIds) {
  auto model = load_model("bf16", GemmBackend::kOpenBlas);
  moekit::m2::GenerateOptions o;
  o.max_new_tokens = 0;
  const moekit::m2::GenerateResult r = moekit::m2::generate(*model, {1, 2, 3}, o);
  EXPECT_TRUE(r.new_ids.empty());
  EXPECT_EQ(r.prompt_tokens, 0);
  EXPECT_EQ(r.decode_steps, 0);
  EXPECT_FALSE(r.stopped_at_position_limit);
  try {
    moekit::m2::generate(*model, {1, 99999}, o);
    FAIL() << "no error";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("token id 99999 at 1 is out of range [0, 512)"),
              std::string::npos)
        << e.what();
  }
}

// Prompt and new tokens together stay within the config's max_position_embeddings.
TEST(Generate, StopsAtMaxPositionEmbeddings) {
  const fs::path dir = edited_copy_of_tiny_model(
      "moekit_max_positions_model", [](nlohmann::json& c) { c["max_position_embeddings"] = 24; });
  auto model = Model::load(dir.string());
  EXPECT_EQ(model->config().max_position_embeddings, 24);
  const std::vector<int32_t> prompt = load_golden("bf16").prompt;  // 20 tokens
  ASSERT_EQ(prompt.size(), 20u);
  moekit::m2::GenerateOptions o;
  o.stop_at_eos = false;
  o.max_new_tokens = 4;  // exactly fills the 24 positions
  const moekit::m2::GenerateResult fits = moekit::m2::generate(*model, prompt, o);
  EXPECT_EQ(fits.new_ids.size(), 4u);
  EXPECT_FALSE(fits.stopped_at_position_limit);
  o.max_new_tokens = 8;
  const moekit::m2::GenerateResult capped = moekit::m2::generate(*model, prompt, o);
  EXPECT_EQ(capped.new_ids, fits.new_ids);
  EXPECT_TRUE(capped.stopped_at_position_limit);
  EXPECT_EQ(capped.decode_steps, 3);

  // A prompt that fills every position leaves no room; a longer one is an error.
  std::vector<int32_t> full = prompt;
  full.insert(full.end(), {1, 2, 3, 4});
  const moekit::m2::GenerateResult none = moekit::m2::generate(*model, full, o);
  EXPECT_TRUE(none.new_ids.empty());
  EXPECT_TRUE(none.stopped_at_position_limit);
  EXPECT_EQ(none.prompt_tokens, 0);
  full.push_back(5);
  try {
    moekit::m2::generate(*model, full, o);
    FAIL() << "no error";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("25 tokens exceed max_position_embeddings (24)"),
              std::string::npos)
        << e.what();
  }
  fs::remove_all(dir);
}

// ---- broken checkpoints ----------------------------------------------------------------------

// A safetensors file as header JSON + data bytes, to be edited and written back.
struct RawSafetensors {
  nlohmann::json header;
  std::string data;

  static RawSafetensors read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(bytes[i]);
    RawSafetensors r;
    r.header = nlohmann::json::parse(bytes.substr(8, n));
    r.data = bytes.substr(8 + n);
    return r;
  }
  std::string serialize() const {
    const std::string h = header.dump();
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
    return out + h + data;
  }
};

class BrokenCheckpoint : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(testing::TempDir()) /
           ("moekit_broken_" +
            std::string(testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes the variant's config (edited by `edit_config`) and the given model bytes.
  void write(const std::string& variant, const std::string& model_bytes,
             const std::function<void(nlohmann::json&)>& edit_config = nullptr) {
    std::ifstream in(model_dir(variant) + "/config.json");
    nlohmann::json cfg = nlohmann::json::parse(in);
    if (edit_config) edit_config(cfg);
    std::ofstream(dir_ / "config.json") << cfg.dump(2);
    std::ofstream(dir_ / "model.safetensors", std::ios::binary) << model_bytes;
  }
  void write_edited(const std::string& variant, const std::function<void(RawSafetensors&)>& edit) {
    RawSafetensors r = RawSafetensors::read(model_dir(variant) + "/model.safetensors");
    edit(r);
    write(variant, r.serialize());
  }
  // Loading must fail with a message containing every one of `parts`.
  void expect_failure(std::initializer_list<std::string> parts) {
    try {
      Model::load(dir_.string());
      FAIL() << "loaded a broken checkpoint";
    } catch (const ModelError& e) {
      for (const std::string& part : parts)
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
            << "message lacks '" << part << "': " << e.what();
    }
  }
  std::string file() const { return (dir_ / "model.safetensors").string(); }
  std::string config_file() const { return (dir_ / "config.json").string(); }

  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST_F(BrokenCheckpoint, CopyOfTheGoodOneLoads) {
  write("fp8", read_bytes(model_dir("fp8") + "/model.safetensors"));
  EXPECT_NO_THROW(Model::load(dir_.string()));
}

TEST_F(BrokenCheckpoint, MissingTensor) {
  write_edited("bf16",
               [](RawSafetensors& r) { r.header.erase("model.layers.1.self_attn.k_proj.weight"); });
  expect_failure({file(), "missing tensor", "model.layers.1.self_attn.k_proj.weight"});
}

TEST_F(BrokenCheckpoint, MissingExpert) {
  write_edited("bf16", [](RawSafetensors& r) {
    r.header.erase("model.layers.0.block_sparse_moe.experts.15.w2.weight");
  });
  expect_failure({"missing tensor", "model.layers.0.block_sparse_moe.experts.15.w2.weight"});
}

TEST_F(BrokenCheckpoint, MissingFp8Scale) {
  write_edited("fp8", [](RawSafetensors& r) {
    r.header.erase("model.layers.0.block_sparse_moe.experts.3.w1.weight_scale_inv");
  });
  expect_failure({file(), "experts.3.w1.weight", "weight_scale_inv", "missing"});
}

TEST_F(BrokenCheckpoint, WrongShape) {
  // Same byte count, transposed shape.
  write_edited("bf16", [](RawSafetensors& r) {
    r.header["model.layers.0.self_attn.k_proj.weight"]["shape"] = {256, 64};
  });
  expect_failure(
      {file(), "model.layers.0.self_attn.k_proj.weight", "[256, 64]", "expected [64, 256]"});
}

TEST_F(BrokenCheckpoint, WrongScaleShape) {
  write_edited("fp8", [](RawSafetensors& r) {
    auto& e = r.header["model.layers.1.self_attn.q_proj.weight_scale_inv"];
    e["shape"] = {4, 1};  // 4 floats, as many bytes as [2, 2]
  });
  expect_failure({"q_proj.weight_scale_inv", "[4, 1]", "expected [2, 2]"});
}

TEST_F(BrokenCheckpoint, WrongDtype) {
  write_edited("bf16", [](RawSafetensors& r) {
    r.header["model.layers.1.input_layernorm.weight"]["dtype"] = "I16";
  });
  expect_failure({file(), "model.layers.1.input_layernorm.weight", "dtype I16"});
}

TEST_F(BrokenCheckpoint, WrongExpertDtype) {
  write_edited("bf16", [](RawSafetensors& r) {
    r.header["model.layers.0.block_sparse_moe.experts.2.w3.weight"]["dtype"] = "F16";
  });
  expect_failure({"experts.2.w3.weight", "dtype F16"});
}

TEST_F(BrokenCheckpoint, SizeDisagreesWithShape) {
  write_edited("bf16", [](RawSafetensors& r) {
    r.header["model.norm.weight"]["dtype"] = "F32";  // 256 x 4 bytes, but 512 stored
  });
  expect_failure({file(), "model.norm.weight", "bytes"});
}

TEST_F(BrokenCheckpoint, TruncatedFile) {
  const std::string bytes = read_bytes(model_dir("bf16") + "/model.safetensors");
  write("bf16", bytes.substr(0, bytes.size() / 2));
  expect_failure({file(), "past the end", "truncated"});
}

TEST_F(BrokenCheckpoint, TruncatedHeader) {
  const std::string bytes = read_bytes(model_dir("bf16") + "/model.safetensors");
  write("bf16", bytes.substr(0, 100));
  expect_failure({file(), "header length"});
  write("bf16", bytes.substr(0, 5));
  expect_failure({file(), "truncated"});
}

TEST_F(BrokenCheckpoint, CorruptHeaderJson) {
  std::string bytes = read_bytes(model_dir("bf16") + "/model.safetensors");
  bytes[8] = '[';
  bytes[20] = '}';
  write("bf16", bytes);
  expect_failure({file(), "corrupt header"});
}

TEST_F(BrokenCheckpoint, HugeHeaderLength) {
  std::string bytes = read_bytes(model_dir("bf16") + "/model.safetensors");
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(0xff);
  write("bf16", bytes);
  expect_failure({file(), "corrupt header"});
}

TEST_F(BrokenCheckpoint, OffsetsOutOfRange) {
  write_edited("bf16", [](RawSafetensors& r) {
    auto& e = r.header["model.layers.1.self_attn.o_proj.weight"]["data_offsets"];
    const uint64_t shift = r.data.size();
    e = {e[0].get<uint64_t>() + shift, e[1].get<uint64_t>() + shift};
  });
  expect_failure({file(), "model.layers.1.self_attn.o_proj.weight", "data_offsets"});
}

TEST_F(BrokenCheckpoint, ReversedOffsets) {
  write_edited("bf16", [](RawSafetensors& r) {
    auto& e = r.header["lm_head.weight"]["data_offsets"];
    e = {e[1], e[0]};
  });
  expect_failure({file(), "lm_head.weight", "reversed"});
}

TEST_F(BrokenCheckpoint, MalformedHeaderEntries) {
  write_edited("bf16", [](RawSafetensors& r) { r.header["model.norm.weight"]["shape"] = {"256"}; });
  expect_failure({file(), "model.norm.weight", "shape"});
  write_edited("bf16", [](RawSafetensors& r) { r.header["model.norm.weight"].erase("dtype"); });
  expect_failure({file(), "model.norm.weight", "dtype"});
  write_edited("bf16", [](RawSafetensors& r) {
    r.header["model.norm.weight"]["data_offsets"] = {-1, 4};
  });
  expect_failure({file(), "model.norm.weight", "data_offsets"});
  write_edited("bf16", [](RawSafetensors& r) { r.header["model.norm.weight"] = 3; });
  expect_failure({file(), "model.norm.weight", "not an object"});
}

TEST_F(BrokenCheckpoint, NoWeightsFile) {
  write("bf16", "");
  fs::remove(dir_ / "model.safetensors");
  expect_failure({dir_.string(), "no .safetensors"});
}

TEST_F(BrokenCheckpoint, ConfigFieldOfWrongType) {
  const std::string good = read_bytes(model_dir("bf16") + "/model.safetensors");
  write("bf16", good, [](nlohmann::json& c) { c["hidden_size"] = "256"; });
  expect_failure({config_file(), "hidden_size", "integer"});
  write("bf16", good, [](nlohmann::json& c) { c["rope_theta"] = "big"; });
  expect_failure({config_file(), "rope_theta", "number"});
  write("bf16", good, [](nlohmann::json& c) { c["use_qk_norm"] = 1; });
  expect_failure({config_file(), "use_qk_norm", "true or false"});
  write("bf16", good, [](nlohmann::json& c) { c.erase("num_local_experts"); });
  expect_failure({config_file(), "num_local_experts", "missing"});
  write("bf16", good, [](nlohmann::json& c) { c["num_key_value_heads"] = 3; });
  expect_failure({config_file(), "num_key_value_heads", "divide"});
  write("bf16", good, [](nlohmann::json& c) { c["rms_norm_eps"] = 1e300; });  // inf in f32
  expect_failure({config_file(), "rms_norm_eps", "finite"});
}

TEST_F(BrokenCheckpoint, ConfigMismatchesTheWeights) {
  write("bf16", read_bytes(model_dir("bf16") + "/model.safetensors"),
        [](nlohmann::json& c) { c["intermediate_size"] = 64; });
  expect_failure({file(), "experts.0.w1.weight", "expected [64, 256]"});
}

// A config that asks for far more than its checkpoint holds fails on the first tensor's shape,
// before the loader allocates what the config asks for (here 4 GiB of f32 embeddings).
TEST_F(BrokenCheckpoint, OversizedConfigFailsBeforeAllocating) {
  const int64_t hidden = int64_t{1} << 21;
  write("bf16", read_bytes(model_dir("bf16") + "/model.safetensors"),
        [&](nlohmann::json& c) { c["hidden_size"] = hidden; });
  rusage before{}, after{};
  getrusage(RUSAGE_SELF, &before);
  expect_failure({file(), "model.embed_tokens.weight", "expected [512, 2097152]"});
  getrusage(RUSAGE_SELF, &after);
  EXPECT_LT(after.ru_maxrss - before.ru_maxrss, 256 * 1024) << "peak RSS grew (KiB)";
}

TEST_F(BrokenCheckpoint, UnsupportedSettingsAreRefused) {
  const std::string good = read_bytes(model_dir("bf16") + "/model.safetensors");
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> cases = {
      {[](nlohmann::json& c) { c["qk_norm_type"] = "per_head"; }, "qk_norm_type"},
      {[](nlohmann::json& c) { c["scoring_func"] = "softmax"; }, "scoring_func"},
      {[](nlohmann::json& c) { c["shared_intermediate_size"] = 128; }, "shared_intermediate_size"},
      {[](nlohmann::json& c) {
         c["attn_type_list"] = {0, 1};
       },
       "attn_type_list"},
      {[](nlohmann::json& c) { c["hidden_act"] = "gelu"; }, "hidden_act"},
      {[](nlohmann::json& c) { c["model_type"] = "llama"; }, "model_type"},
      {[](nlohmann::json& c) {
         c["quantization_config"] = {{"quant_method", "awq"}};
       },
       "quant_method"},
      {[](nlohmann::json& c) {
         c["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128}}};
       },
       "weight_block_size"},
  };
  for (const auto& [edit, field] : cases) {
    write("bf16", good, edit);
    expect_failure({config_file(), field});
  }
}

TEST_F(BrokenCheckpoint, Fp8WeightsWithoutQuantizationConfig) {
  write("fp8", read_bytes(model_dir("fp8") + "/model.safetensors"),
        [](nlohmann::json& c) { c.erase("quantization_config"); });
  expect_failure({file(), "F8_E4M3", "quantization_config"});
}

TEST_F(BrokenCheckpoint, BadConfigJson) {
  write("bf16", read_bytes(model_dir("bf16") + "/model.safetensors"));
  std::ofstream(dir_ / "config.json") << "{\"hidden_size\": 256,";
  expect_failure({config_file(), "not valid JSON"});
  fs::remove(dir_ / "config.json");
  expect_failure({config_file(), "cannot open"});
}

// ---- sharded checkpoints, defaults -----------------------------------------------------------

// Splits the fp8 checkpoint into two shards with an index (plus a shard-2 tensor the index does
// not list, which must be ignored), and drops head_dim / num_key_value_heads defaults.
TEST_F(BrokenCheckpoint, ShardedCheckpointGivesTheSameLogits) {
  RawSafetensors r = RawSafetensors::read(model_dir("fp8") + "/model.safetensors");
  RawSafetensors shard[2];
  nlohmann::json weight_map = nlohmann::json::object();
  int i = 0;
  for (auto it = r.header.begin(); it != r.header.end(); ++it, ++i) {
    if (it.key() == "__metadata__") continue;
    RawSafetensors& s = shard[i % 2];
    const uint64_t b = it.value()["data_offsets"][0], e = it.value()["data_offsets"][1];
    nlohmann::json entry = it.value();
    entry["data_offsets"] = {s.data.size(), s.data.size() + (e - b)};
    s.data += r.data.substr(b, e - b);
    s.header[it.key()] = entry;
    weight_map[it.key()] =
        i % 2 ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
  }
  // An MTP-style tensor beyond num_hidden_layers, present in the shard and the index: ignored.
  shard[1].header["model.layers.2.input_layernorm.weight"] = {
      {"dtype", "BF16"},
      {"shape", {256}},
      {"data_offsets", {shard[1].data.size(), shard[1].data.size() + 512}}};
  shard[1].data += std::string(512, '\0');
  weight_map["model.layers.2.input_layernorm.weight"] = "model-00002-of-00002.safetensors";
  std::ofstream(dir_ / "model-00001-of-00002.safetensors", std::ios::binary)
      << shard[0].serialize();
  std::ofstream(dir_ / "model-00002-of-00002.safetensors", std::ios::binary)
      << shard[1].serialize();
  std::ofstream(dir_ / "model.safetensors.index.json")
      << nlohmann::json{{"weight_map", weight_map}}.dump();
  std::ifstream in(model_dir("fp8") + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  cfg.erase("head_dim");  // default hidden / heads = 32, the same
  std::ofstream(dir_ / "config.json") << cfg.dump();

  moekit::m2::LoadOptions lo;
  lo.expert_precision = ExpertPrecision::kF32;
  auto model = Model::load(dir_.string(), lo);
  Golden g = load_golden("fp8");
  const int64_t T = static_cast<int64_t>(g.prompt.size()), V = model->config().vocab_size;
  std::vector<float> logits(static_cast<size_t>(T * V));
  KvCache cache(*model);
  model->forward(g.prompt.data(), T, &cache, logits.data(), true);
  expect_close(logits, read_f32(*g.file, "logits"), "sharded logits");

  // The index names a tensor its shard lacks.
  weight_map["model.extra.weight"] = "model-00002-of-00002.safetensors";
  std::ofstream(dir_ / "model.safetensors.index.json")
      << nlohmann::json{{"weight_map", weight_map}}.dump();
  expect_failure({"model-0000", "missing tensor", "model."});
}

}  // namespace
