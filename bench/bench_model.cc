// MiniMax-M2 model benchmarks.
//   BM_TinyPrefill / BM_TinyDecode: the tiny-m2 model shipped in model/testdata (bf16 and fp8
//     experts as stored), tokens/s and the time split between attention, routing, experts and
//     the rest, at 1 and 2 threads.
//   BM_DenseProjection: the dense f32 projections through OpenBLAS sgemm and oneDNN matmul on the
//     full model's q_proj shape (6144 x 3072) and the tiny model's (256 x 256).
//   BM_FullLayerDecode: one full-size MiniMax-M2 layer (hidden 3072, 48 q / 8 kv heads of 128,
//     256 experts of 1536, top-8) from random weights, written as a bf16 or fp8 checkpoint and
//     loaded by the real loader; a decode step at a 64-token context. Counters project the
//     62-layer model's decode tokens/s (62 layers + the 200064 x 3072 lm_head) next to the bound
//     the streaming-read bandwidth measured by this binary sets for the bytes a token reads.
#include <benchmark/benchmark.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "model/generate.h"
#include "model/model.h"
#include "moekit/moekit.h"
#include "reference/numeric.h"

namespace {

namespace fs = std::filesystem;
using moekit::m2::ExpertPrecision;
using moekit::m2::GemmBackend;
using moekit::m2::KvCache;
using moekit::m2::Model;

const std::vector<int32_t> kTinyPrompt = {499, 328, 354, 229, 379, 454, 344, 241, 142, 508,
                                          360, 80,  304, 40,  407, 28,  321, 416, 222, 79};

// The real MiniMax-M2's shapes.
constexpr int64_t kHidden = 3072, kInter = 1536, kHeads = 48, kKvHeads = 8, kHeadDim = 128;
constexpr int64_t kExperts = 256, kTopK = 8, kRotaryDim = 64, kLayers = 62, kVocab = 200064;
constexpr int64_t kContext = 64;  // tokens in the KV cache during the full-layer decode step

void set_threads(int threads) {
  moekit_set_num_threads(threads);
  moekit::m2::DenseGemm::set_threads(threads);
}

void add_time_split(benchmark::State& state, const moekit::m2::OpTimes& t) {
  const double total = t.total() > 0 ? t.total() : 1;
  state.counters["attention_frac"] = t.attention / total;
  state.counters["routing_frac"] = t.routing / total;
  state.counters["experts_frac"] = t.experts / total;
  state.counters["rest_frac"] = t.rest / total;
}

// ---- tiny model ------------------------------------------------------------------------------

Model& tiny_model(const std::string& variant) {
  static std::map<std::string, std::unique_ptr<Model>> models;
  auto& m = models[variant];
  if (!m) m = Model::load(std::string(MOEKIT_MODEL_TESTDATA_DIR) + "/tiny-m2-" + variant);
  return *m;
}

void BM_TinyPrefill(benchmark::State& state, std::string variant) {
  const int threads = static_cast<int>(state.range(0));
  set_threads(threads);
  Model& model = tiny_model(variant);
  std::vector<float> logits(static_cast<size_t>(model.config().vocab_size));
  KvCache cache(model, 64);
  model.reset_times();
  for (auto _ : state) {
    cache.clear();
    model.forward(kTinyPrompt.data(), static_cast<int64_t>(kTinyPrompt.size()), &cache,
                  logits.data(), false);
  }
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * kTinyPrompt.size()), benchmark::Counter::kIsRate);
  add_time_split(state, model.times());
  state.SetLabel("fused_moe=" + model.kernels()["fused_moe"]);
}

void BM_TinyDecode(benchmark::State& state, std::string variant) {
  const int threads = static_cast<int>(state.range(0));
  set_threads(threads);
  Model& model = tiny_model(variant);
  std::vector<float> logits(static_cast<size_t>(model.config().vocab_size));
  KvCache cache(model, 64);
  const int64_t T = static_cast<int64_t>(kTinyPrompt.size());
  model.forward(kTinyPrompt.data(), T, &cache, logits.data(), false);
  model.reset_times();
  const int32_t next = 462;
  for (auto _ : state) {
    cache.truncate(T);  // every step decodes at the same context length
    model.forward(&next, 1, &cache, logits.data(), false);
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  add_time_split(state, model.times());
  state.SetLabel("fused_moe=" + model.kernels()["fused_moe"]);
}

BENCHMARK_CAPTURE(BM_TinyPrefill, bf16, std::string("bf16"))
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_TinyPrefill, fp8, std::string("fp8"))
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_TinyDecode, bf16, std::string("bf16"))
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_TinyDecode, fp8, std::string("fp8"))
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// ---- dense projections: OpenBLAS vs oneDNN ---------------------------------------------------

// Args: backend (0 OpenBLAS, 1 oneDNN), M, N, K, threads.
void BM_DenseProjection(benchmark::State& state) {
  const auto backend = state.range(0) ? GemmBackend::kOneDnn : GemmBackend::kOpenBlas;
  const int64_t M = state.range(1), N = state.range(2), K = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  set_threads(threads);
  // Several weight copies, rotated, so that the large shape streams its weights from memory.
  const size_t weight_bytes = static_cast<size_t>(N * K) * 4;
  const size_t copies = std::max<size_t>(1, moekit_bench::streaming_buffer_bytes() / weight_bytes);
  std::vector<std::vector<float>> w(copies,
                                    moekit_bench::random_floats(static_cast<size_t>(N * K), 7));
  const std::vector<float> x = moekit_bench::random_floats(static_cast<size_t>(M * K), 3);
  std::vector<float> y(static_cast<size_t>(M * N));
  moekit::m2::DenseGemm gemm(backend);
  size_t i = 0;
  for (auto _ : state) {
    gemm.run(x.data(), M, K, K, w[i].data(), N, y.data(), N);
    i = (i + 1) % copies;
  }
  const double calls = static_cast<double>(state.iterations());
  state.counters["weight_bytes_per_s"] =
      benchmark::Counter(calls * static_cast<double>(weight_bytes), benchmark::Counter::kIsRate);
  state.counters["flops"] =
      benchmark::Counter(calls * 2.0 * static_cast<double>(M * N * K), benchmark::Counter::kIsRate);
  state.counters["bw_frac"] = benchmark::Counter(
      calls * static_cast<double>(weight_bytes) / moekit_bench::streaming_read_bandwidth(threads),
      benchmark::Counter::kIsRate);
  state.SetLabel(moekit::m2::gemm_backend_name(backend));
}

void dense_args(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2})
    for (int backend : {0, 1}) {
      for (int64_t M : {1, 20, 128}) b->Args({backend, M, kHeads * kHeadDim, kHidden, threads});
      for (int64_t M : {1, 20}) b->Args({backend, M, 256, 256, threads});
    }
}
BENCHMARK(BM_DenseProjection)->Apply(dense_args)->UseRealTime()->Unit(benchmark::kMicrosecond);

// ---- one full-size layer from random weights -------------------------------------------------

uint64_t mix(uint64_t x) {  // splitmix64 finalizer: a counter-based random stream
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-a, a) for element i of the stream `seed`.
float uniform(uint64_t seed, uint64_t i, float a) {
  return (static_cast<float>(mix(seed * 0x100000001b3ull + i) >> 40) * 0x1.0p-23f - 1.0f) * a;
}

struct TensorSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;
  float scale;  // values uniform in [-scale, scale); norms use 1
  size_t bytes() const {
    size_t n = dtype == "F32" ? 4 : dtype == "BF16" ? 2 : 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
  }
};

void fill(const TensorSpec& t, uint64_t seed, unsigned char* out, size_t first, size_t count) {
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < static_cast<int64_t>(count); ++j) {
    const uint64_t i = first + static_cast<uint64_t>(j);
    if (t.dtype == "F32") {
      const float v = t.scale == 1.0f ? 1.0f : uniform(seed, i, t.scale);
      std::memcpy(out + j * 4, &v, 4);
    } else if (t.dtype == "BF16") {
      const uint16_t v = moekit::f32_to_bf16(t.scale == 1.0f ? 1.0f : uniform(seed, i, t.scale));
      std::memcpy(out + j * 2, &v, 2);
    } else {  // F8_E4M3: magnitudes in [1/8, 2) (exponents 4..7), never NaN
      const uint64_t r = mix(seed * 0x100000001b3ull + i);
      out[j] = static_cast<unsigned char>((r & 0x80) | (4 + ((r >> 8) & 3)) << 3 | ((r >> 16) & 7));
    }
  }
}

// Streams a safetensors file of random tensors (only `chunk` bytes in memory at once).
void write_random_safetensors(const std::string& path, const std::vector<TensorSpec>& specs) {
  nlohmann::ordered_json header;
  size_t offset = 0;
  for (const TensorSpec& t : specs) {
    header[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes()}}};
    offset += t.bytes();
  }
  const std::string h = header.dump();
  std::ofstream out(path, std::ios::binary);
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
  out.write(len, 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  constexpr size_t kChunk = size_t{64} << 20;
  std::vector<unsigned char> buf(kChunk);
  uint64_t seed = 1;
  for (const TensorSpec& t : specs) {
    const size_t elem = t.dtype == "F32" ? 4 : t.dtype == "BF16" ? 2 : 1;
    const size_t total = t.bytes() / elem;
    for (size_t first = 0; first < total; first += kChunk / elem) {
      const size_t count = std::min(kChunk / elem, total - first);
      fill(t, seed, buf.data(), first, count);
      out.write(reinterpret_cast<const char*>(buf.data()),
                static_cast<std::streamsize>(count * elem));
    }
    ++seed;
  }
  if (!out) throw std::runtime_error("cannot write " + path);
}

// A one-layer full-size checkpoint folder (vocab cut to 1024: the lm_head is measured apart).
std::string write_full_layer_checkpoint(bool fp8, int64_t experts) {
  const fs::path dir =
      fs::temp_directory_path() /
      ("moekit_bench_m2_layer_" + std::string(fp8 ? "fp8_" : "bf16_") + std::to_string(getpid()));
  fs::create_directories(dir);
  constexpr int64_t kSmallVocab = 1024;
  nlohmann::json cfg = {{"model_type", "minimax_m2"},    {"hidden_size", kHidden},
                        {"intermediate_size", kInter},   {"num_hidden_layers", 1},
                        {"num_attention_heads", kHeads}, {"num_key_value_heads", kKvHeads},
                        {"head_dim", kHeadDim},          {"num_local_experts", experts},
                        {"num_experts_per_tok", kTopK},  {"rotary_dim", kRotaryDim},
                        {"rope_theta", 5000000},         {"rms_norm_eps", 1e-6},
                        {"scoring_func", "sigmoid"},     {"use_routing_bias", true},
                        {"use_qk_norm", true},           {"qk_norm_type", "per_layer"},
                        {"vocab_size", kSmallVocab},     {"tie_word_embeddings", false}};
  if (fp8)
    cfg["quantization_config"] = {{"quant_method", "fp8"},
                                  {"fmt", "float8_e4m3fn"},
                                  {"activation_scheme", "dynamic"},
                                  {"weight_block_size", {128, 128}}};
  std::ofstream(dir / "config.json") << cfg.dump(2);

  const std::string wdt = fp8 ? "F8_E4M3" : "BF16";
  std::vector<TensorSpec> specs = {
      {"model.embed_tokens.weight", "BF16", {kSmallVocab, kHidden}, 0.5f},
      {"model.norm.weight", "BF16", {kHidden}, 1.0f},
      {"lm_head.weight", "BF16", {kSmallVocab, kHidden}, 0.05f}};
  const std::string p = "model.layers.0.";
  auto matrix = [&](const std::string& name, int64_t N, int64_t K, float scale) {
    // FP8 values have magnitudes ~1; their block scale brings them to `scale`.
    specs.push_back({name, wdt, {N, K}, scale});
    if (fp8)
      specs.push_back({name.substr(0, name.size() - 6) + "weight_scale_inv",
                       "F32",
                       {(N + 127) / 128, (K + 127) / 128},
                       scale});
  };
  specs.push_back({p + "input_layernorm.weight", "BF16", {kHidden}, 1.0f});
  specs.push_back({p + "post_attention_layernorm.weight", "BF16", {kHidden}, 1.0f});
  specs.push_back({p + "self_attn.q_norm.weight", "BF16", {kHeads * kHeadDim}, 1.0f});
  specs.push_back({p + "self_attn.k_norm.weight", "BF16", {kKvHeads * kHeadDim}, 1.0f});
  matrix(p + "self_attn.q_proj.weight", kHeads * kHeadDim, kHidden, 0.03f);
  matrix(p + "self_attn.k_proj.weight", kKvHeads * kHeadDim, kHidden, 0.03f);
  matrix(p + "self_attn.v_proj.weight", kKvHeads * kHeadDim, kHidden, 0.03f);
  matrix(p + "self_attn.o_proj.weight", kHidden, kHeads * kHeadDim, 0.02f);
  specs.push_back({p + "block_sparse_moe.gate.weight", "F32", {experts, kHidden}, 0.03f});
  specs.push_back({p + "block_sparse_moe.e_score_correction_bias", "F32", {experts}, 0.05f});
  for (int64_t e = 0; e < experts; ++e) {
    const std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
    matrix(x + "w1.weight", kInter, kHidden, 0.03f);
    matrix(x + "w2.weight", kHidden, kInter, 0.03f);
    matrix(x + "w3.weight", kInter, kHidden, 0.03f);
  }
  write_random_safetensors((dir / "model.safetensors").string(), specs);
  return dir.string();
}

// VmHWM (peak RSS) of this process, after clear_refs may have reset it.
size_t vm_hwm_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

struct FullLayer {
  std::unique_ptr<Model> model;
  bool fp8 = false;
  int64_t experts = 0;
  double write_seconds = 0;
  size_t load_peak_rss = 0;
};

FullLayer& full_layer(bool fp8, int64_t experts) {
  static FullLayer layer;
  if (layer.model && layer.fp8 == fp8 && layer.experts == experts) return layer;
  layer.model.reset();  // one full-size layer in memory at a time
  layer.fp8 = fp8;
  layer.experts = experts;
  const auto t0 = std::chrono::steady_clock::now();
  const std::string dir = write_full_layer_checkpoint(fp8, experts);
  layer.write_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  reset_peak_rss();
  const size_t before = vm_hwm_bytes();
  moekit::m2::LoadOptions o;
  o.progress = true;
  layer.model = Model::load(dir, o);
  layer.load_peak_rss = vm_hwm_bytes() - std::min(before, vm_hwm_bytes());
  fs::remove_all(dir);
  return layer;
}

// Seconds of one f32 lm_head projection [1, 3072] x [200064, 3072]^T (2.4 GB of weights).
double lm_head_seconds(int threads) {
  static std::map<int, double> cache;
  if (cache.count(threads)) return cache[threads];
  std::vector<float> w(static_cast<size_t>(kVocab * kHidden), 0.01f);
  std::vector<float> x(kHidden, 1.0f), y(kVocab);
  moekit::m2::DenseGemm gemm(GemmBackend::kOpenBlas);
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    gemm.run(x.data(), 1, kHidden, kHidden, w.data(), kVocab, y.data(), kVocab);
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return cache[threads] = best;
}

// Args: fp8 (0/1), threads, experts in the layer (256 is the real model; fewer keep a bf16
// layer within a small machine's memory: a decode step reads only the top-8 anyway).
void BM_FullLayerDecode(benchmark::State& state) {
  const bool fp8 = state.range(0) != 0;
  const int threads = static_cast<int>(state.range(1));
  const int64_t experts = state.range(2);
  set_threads(threads);
  FullLayer& layer = full_layer(fp8, experts);
  Model& model = *layer.model;
  const int64_t V = model.config().vocab_size;
  std::vector<int32_t> prompt(kContext);
  for (int64_t i = 0; i < kContext; ++i) prompt[i] = static_cast<int32_t>((i * 37) % V);
  std::vector<float> logits(static_cast<size_t>(V));
  KvCache cache(model, kContext + 1);
  model.forward(prompt.data(), kContext, &cache, logits.data(), false);
  model.reset_times();
  const int32_t next = 5;
  for (auto _ : state) {
    cache.truncate(kContext);
    model.forward(&next, 1, &cache, logits.data(), false);
  }
  const moekit::m2::OpTimes t = model.times();
  const double step = t.total() / static_cast<double>(state.iterations());
  // The experts' part of one step minus the small-vocab lm_head: the layer's time.
  const double layer_s =
      (t.attention + t.routing + t.experts) / static_cast<double>(state.iterations());
  const double lm_s = lm_head_seconds(threads);
  const double bw = moekit_bench::streaming_read_bandwidth(threads);

  // Bytes one decode token must read per layer: f32 dense attention weights, the f32 router,
  // the 8 active experts as packed, and this layer's KV cache.
  const double dense = static_cast<double>((kHeads * kHeadDim + 2 * kKvHeads * kHeadDim) * kHidden +
                                           kHidden * kHeads * kHeadDim) *
                       4.0;
  const double router = static_cast<double>(kExperts * kHidden) * 4.0;
  const double expert = static_cast<double>(model.load_stats().packed_expert_bytes) / experts;
  const double kv = 2.0 * kContext * kKvHeads * kHeadDim * 4.0;
  const double layer_bytes = dense + router + kTopK * expert + kv;
  const double lm_bytes = static_cast<double>(kVocab * kHidden) * 4.0;
  const double model_bytes = kLayers * layer_bytes + lm_bytes;

  state.counters["layer_ms"] = layer_s * 1e3;
  state.counters["layer_bw_frac"] = layer_bytes / layer_s / bw;
  state.counters["lm_head_ms"] = lm_s * 1e3;
  state.counters["proj_model_tok_s"] = 1.0 / (kLayers * layer_s + lm_s + (step - layer_s));
  state.counters["bound_tok_s"] = bw / model_bytes;
  state.counters["bound_frac"] = state.counters["proj_model_tok_s"] / state.counters["bound_tok_s"];
  state.counters["expert_GB_per_tok"] = kLayers * kTopK * expert / 1e9;
  state.counters["dense_GB_per_tok"] = (kLayers * (dense + router) + lm_bytes) / 1e9;
  state.counters["packed_GB"] = static_cast<double>(model.load_stats().packed_expert_bytes) / 1e9;
  state.counters["load_peak_rss_GB"] = static_cast<double>(layer.load_peak_rss) / 1e9;
  state.counters["load_s"] = model.load_stats().seconds;
  add_time_split(state, t);
  state.SetLabel(std::string(fp8 ? "fp8" : "bf16") + " fused_moe=" + model.kernels()["fused_moe"] +
                 " layout=" + model.load_stats().expert_layout);
}
BENCHMARK(BM_FullLayerDecode)
    ->Args({1, 1, 256})
    ->Args({1, 2, 256})
    ->Args({0, 1, 64})
    ->Args({0, 2, 64})
    ->Iterations(5)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
