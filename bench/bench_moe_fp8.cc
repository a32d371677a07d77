// FP8 experts at MiniMax-M2 shapes (H 3072, I 1536, top-8; block scales 128 x 128): the fused
// MoE on FP8 weights against the same call on bf16 weights, side by side in one binary, with
// the bytes of weights each call touches per second against BM_StreamingRead.
//
// Counters: weight_GBps (bytes of the experts the call touches, in their stored dtype, per
// second), frac_stream (that over the streaming-read bandwidth of the same thread count),
// GFLOPs (2 * 3 * H * I per routed pair), and for FP8 x_vs_bf16 (bf16 time / FP8 time at the
// same M, from the bf16 benchmark of this run).
// Experts: MOEKIT_BENCH_FP8_EXPERTS (default 64: 906 MB of FP8 and 1.8 GB of bf16 weights, both
// larger than the last-level cache; the model has 256). Each iteration uses the next of several
// routings so that small-M calls read cold experts.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "dispatch/runtime.h"
#include "moekit/moekit.h"
#include "reference/numeric.h"

namespace {

constexpr int64_t kHidden = 3072, kInter = 1536, kTopK = 8, kBlock = 128;
constexpr int kRoutings = 8;

int64_t num_experts() {
  const char* env = std::getenv("MOEKIT_BENCH_FP8_EXPERTS");
  const int64_t e = env ? std::atoll(env) : 64;
  return std::max<int64_t>(e, kTopK);
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Experts {
  moekit_experts* fp8 = nullptr;
  moekit_experts* bf16 = nullptr;
};

// Packs E random experts in FP8 (with block scales) and in bf16 (AUTO layouts). The sources
// are freed once packed.
Experts& experts() {
  static Experts ex = [] {
    Experts out;
    const int64_t E = num_experts();
    const int64_t rows[3] = {kInter, kInter, kHidden}, cols[3] = {kHidden, kHidden, kInter};
    {
      std::vector<std::vector<uint8_t>> q(3 * E);
      std::vector<std::vector<float>> s(3 * E);
#pragma omp parallel for schedule(dynamic)
      for (int64_t t = 0; t < 3 * E; ++t) {
        const int i = static_cast<int>(t % 3);
        uint64_t seed = 1000 + t;
        q[t].resize(rows[i] * cols[i]);
        for (uint8_t& b : q[t]) {  // normals of magnitude 2^-4 .. 2^2
          const uint64_t r = splitmix(seed);
          b = static_cast<uint8_t>((r & 0x80) | (3 + (r >> 8) % 7) << 3 | (r >> 16 & 7));
        }
        s[t].resize(((rows[i] + kBlock - 1) / kBlock) * ((cols[i] + kBlock - 1) / kBlock));
        for (float& v : s[t]) v = 1e-3f * (1 + (splitmix(seed) % 100) / 50.0f);
      }
      std::vector<const void*> w[3];
      std::vector<const float*> sc[3];
      for (int64_t e = 0; e < E; ++e)
        for (int i = 0; i < 3; ++i) {
          w[i].push_back(q[e * 3 + i].data());
          sc[i].push_back(s[e * 3 + i].data());
        }
      moekit_experts_desc d{};
      d.num_experts = E;
      d.hidden = kHidden;
      d.inter = kInter;
      d.dtype = MOEKIT_FP8_E4M3;
      d.w1 = w[0].data();
      d.w3 = w[1].data();
      d.w2 = w[2].data();
      d.w1_scale = sc[0].data();
      d.w3_scale = sc[1].data();
      d.w2_scale = sc[2].data();
      d.block_n = d.block_k = kBlock;
      if (moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &out.fp8) != MOEKIT_OK) {
        std::fprintf(stderr, "fp8 pack: %s\n", moekit_last_error());
        std::abort();
      }
    }
    {
      std::vector<std::vector<uint16_t>> b(3 * E);
#pragma omp parallel for schedule(dynamic)
      for (int64_t t = 0; t < 3 * E; ++t) {
        const int i = static_cast<int>(t % 3);
        uint64_t seed = 5000 + t;
        b[t].resize(rows[i] * cols[i]);
        for (uint16_t& v : b[t])
          v = moekit::f32_to_bf16((static_cast<float>(splitmix(seed) % 2001) - 1000.0f) * 2e-6f);
      }
      std::vector<const void*> w[3];
      for (int64_t e = 0; e < E; ++e)
        for (int i = 0; i < 3; ++i) w[i].push_back(b[e * 3 + i].data());
      moekit_experts_desc d{};
      d.num_experts = E;
      d.hidden = kHidden;
      d.inter = kInter;
      d.dtype = MOEKIT_BF16;
      d.w1 = w[0].data();
      d.w3 = w[1].data();
      d.w2 = w[2].data();
      if (moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &out.bf16) != MOEKIT_OK) {
        std::fprintf(stderr, "bf16 pack: %s\n", moekit_last_error());
        std::abort();
      }
    }
    return out;
  }();
  return ex;
}

struct Inputs {
  std::vector<uint16_t> x, out;
  std::vector<float> weights;
  std::vector<std::vector<int32_t>> ids;  // kRoutings routings
  std::vector<int64_t> touched;           // distinct experts of each routing
  moekit_workspace* ws = nullptr;
};

Inputs make_inputs(int64_t M) {
  Inputs in;
  const int64_t E = num_experts();
  in.x = moekit_bench::random_bf16(M * kHidden, 7);
  in.out.resize(M * kHidden);
  in.weights = moekit_bench::random_floats(M * kTopK, 8, 0.0f, 0.25f);
  std::mt19937 rng(9);
  std::vector<int32_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  for (int r = 0; r < kRoutings; ++r) {
    std::vector<int32_t> ids;
    std::vector<bool> used(E, false);
    for (int64_t m = 0; m < M; ++m) {
      std::shuffle(order.begin(), order.end(), rng);
      for (int64_t j = 0; j < kTopK; ++j) {
        ids.push_back(order[j]);
        used[order[j]] = true;
      }
    }
    in.ids.push_back(std::move(ids));
    in.touched.push_back(std::count(used.begin(), used.end(), true));
  }
  const size_t ws_bytes = moekit_moe_workspace_size(M, kTopK, kHidden, kInter, moekit_num_threads());
  if (moekit_workspace_create(ws_bytes, &in.ws) != MOEKIT_OK) std::abort();
  return in;
}

moekit_tensor tensor(void* data, moekit_dtype dtype, int64_t rows, int64_t cols) {
  moekit_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.ndim = 2;
  t.shape[0] = rows;
  t.shape[1] = cols;
  return t;
}

std::map<int64_t, double>& bf16_seconds() {
  static std::map<int64_t, double> m;
  return m;
}

void run(benchmark::State& state, bool fp8) {
  const int64_t M = state.range(0);
  const moekit_experts* w = fp8 ? experts().fp8 : experts().bf16;
  Inputs in = make_inputs(M);
  moekit_tensor x = tensor(in.x.data(), MOEKIT_BF16, M, kHidden);
  moekit_tensor weights = tensor(in.weights.data(), MOEKIT_F32, M, kTopK);
  moekit_tensor out = tensor(in.out.data(), MOEKIT_BF16, M, kHidden);
  int64_t bytes = 0, calls = 0;
  double seconds = 0.0;
  for (auto _ : state) {
    const int r = static_cast<int>(calls % kRoutings);
    moekit_tensor ids = tensor(in.ids[r].data(), MOEKIT_I32, M, kTopK);
    const auto t0 = std::chrono::steady_clock::now();
    if (moekit_fused_moe(w, &x, &weights, &ids, nullptr, in.ws, &out) != MOEKIT_OK) {
      state.SkipWithError(moekit_last_error());
      break;
    }
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bytes += in.touched[r] * 3 * kHidden * kInter * (fp8 ? 1 : 2);
    ++calls;
  }
  moekit_workspace_free(in.ws);
  if (calls == 0) return;
  const int threads = moekit_num_threads();
  const double per_call = seconds / calls;
  const double bps = bytes / seconds;
  state.counters["weight_GBps"] = bps / 1e9;
  state.counters["frac_stream"] = bps / moekit_bench::streaming_read_bandwidth(threads);
  state.counters["GFLOPs"] = 2.0 * 3 * kHidden * kInter * M * kTopK / per_call / 1e9;
  state.counters["threads"] = threads;
  state.SetLabel(moekit_last_impl("fused_moe"));
  if (!fp8) {
    bf16_seconds()[M] = per_call;
  } else if (bf16_seconds().count(M)) {
    state.counters["x_vs_bf16"] = bf16_seconds()[M] / per_call;
  }
}

// bf16 then FP8 at each M, so that the ratio compares runs close in time; the FP8 run reads the
// bf16 time of its M for x_vs_bf16.
const bool registered = [] {
  for (int64_t M : {1, 4, 16, 64, 256, 1024, 4096}) {
    benchmark::RegisterBenchmark("BM_FusedMoeBf16", [](benchmark::State& s) { run(s, false); })
        ->Arg(M)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark("BM_FusedMoeFp8", [](benchmark::State& s) { run(s, true); })
        ->Arg(M)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
  }
  return true;
}();

}  // namespace
