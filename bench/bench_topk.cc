// Top-k routing and the fused router GEMM on MiniMax-M2 / DeepSeek-V3 shapes.
//
// Counters come from seconds_per_call (below), not from the framework's columns.
// BM_TopkRoute/<impl>/<model>/<M>: time per token of each routing implementation; the counter
//   x_vs_ref is the reference's time over this implementation's, both measured in this run.
// BM_RouterTopk/<impl>/<M>: fused router GEMM + routing, H=3072, E=256 (MiniMax-M2 routing);
//   GFLOP/s of the GEMM, and x_vs_openblas = time of OpenBLAS cblas_sgemm (logits to memory)
//   plus the time of the best routing implementation on those logits (each timed on its own),
//   over the fused time; x_vs_openblas_chained uses the time of the two calls back to back
//   instead (each library's threads then start while the other's still spin). BM_RouterOpenBLAS/<M>
//   reports the separate-timing baseline on its own line. gate_GBps / frac_stream: the gate bytes
//   read per call against the streaming-read ceiling the same binary measures (BM_StreamingRead).
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "dispatch/runtime.h"
#include "kernels/topk/topk.h"

namespace {

using moekit::RouterTopkArgs;
using moekit::TopkArgs;

constexpr int64_t kExperts = 256, kTopK = 8, kHidden = 3072;
const int64_t kTokenCounts[] = {1, 64, 1024, 8192};

struct Model {
  const char* name;
  int groups, topk_group;
  float scaling;
};
const Model kModels[] = {{"MiniMaxM2", 0, 0, 1.0f}, {"DeepSeekV3", 8, 4, 2.5f}};

// With one thread (MOEKIT_NUM_THREADS=1, which also sets OpenBLAS to one thread) every kernel
// runs on the calling thread, and its CPU time is immune to the preemption a shared machine
// inflicts; with more threads only wall time means anything.
bool single_thread() { return moekit::num_threads() == 1; }

double now_seconds(bool wall = false) {
  if (single_thread() && !wall) {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds per call: the fastest of several batches, each at least ~20 ms long (the machine is
// shared: the minimum is the least disturbed figure, and it is taken the same way on both sides
// of every ratio).
// `wall` forces wall time (for comparisons across thread counts).
double seconds_per_call(const std::function<void()>& fn, bool wall = false) {
  fn();  // warm up
  int batch = 1;
  for (;;) {
    const double t0 = now_seconds(wall);
    for (int i = 0; i < batch; ++i) fn();
    if (now_seconds(wall) - t0 > 0.02 || batch >= (1 << 20)) break;
    batch *= 2;
  }
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const double t0 = now_seconds(wall);
    for (int i = 0; i < batch; ++i) fn();
    best = std::min(best, (now_seconds(wall) - t0) / batch);
  }
  return best;
}

struct RouteProblem {
  std::vector<float> logits, bias, weights;
  std::vector<int32_t> ids;
  TopkArgs args;
  RouteProblem(const Model& model, int64_t M) {
    logits = moekit_bench::random_floats(static_cast<size_t>(M * kExperts), 11, -4.0f, 4.0f);
    bias = moekit_bench::random_floats(kExperts, 12, -0.1f, 0.1f);
    weights.resize(static_cast<size_t>(M * kTopK));
    ids.resize(static_cast<size_t>(M * kTopK));
    args.M = M;
    args.E = kExperts;
    args.logits = logits.data();
    args.logits_stride = kExperts;
    args.bias = bias.data();
    args.k = kTopK;
    args.scoring = MOEKIT_SCORING_SIGMOID;
    args.renormalize = true;
    args.num_expert_group = model.groups;
    args.topk_group = model.topk_group;
    args.scaling = model.scaling;
    args.weights = weights.data();
    args.weights_stride = kTopK;
    args.ids = ids.data();
    args.ids_stride = kTopK;
  }
};

double reference_route_seconds(const Model& model, int64_t M) {
  static std::map<std::pair<std::string, int64_t>, double> cache;
  const auto key = std::make_pair(std::string(model.name), M);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  RouteProblem p(model, M);
  const auto& ref = moekit::topk_route_impls().back();
  return cache[key] = seconds_per_call([&] { ref.run(p.args); });
}

void BM_TopkRoute(benchmark::State& state, int impl_index, Model model, int64_t M) {
  const auto& impl = moekit::topk_route_impls()[impl_index];
  if (impl.level > moekit::effective_isa()) {
    state.SkipWithError("this CPU lacks the ISA");
    return;
  }
  RouteProblem p(model, M);
  for (auto _ : state) {
    impl.run(p.args);
    benchmark::DoNotOptimize(p.weights.data());
  }
  const double own = seconds_per_call([&] { impl.run(p.args); });
  state.counters["ns_per_token"] = own / M * 1e9;
  state.counters["x_vs_ref"] = reference_route_seconds(model, M) / own;
}

struct RouterProblem {
  std::vector<float> hidden, gate, logits;
  RouteProblem route;
  RouterTopkArgs args;
  explicit RouterProblem(int64_t M, int64_t E = kExperts, int64_t H = kHidden)
      : route(kModels[0], M) {
    hidden = moekit_bench::random_floats(static_cast<size_t>(M * H), 21, -1.0f, 1.0f);
    gate = moekit_bench::random_floats(static_cast<size_t>(E * H), 22, -0.05f, 0.05f);
    logits.resize(static_cast<size_t>(M * E));
    args.H = H;
    args.hidden = hidden.data();
    args.hidden_stride = H;
    args.hidden_dtype = MOEKIT_F32;
    args.gate = gate.data();
    args.gate_stride = H;
    args.route = route.args;
    args.route.E = E;
    args.route.k = static_cast<int>(std::min<int64_t>(kTopK, E));
  }
  // The unfused baseline: OpenBLAS writes [M, E] logits, then the best routing kernel reads them.
  void openblas_sgemm() {
    const int64_t M = args.route.M;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), kExperts, kHidden,
                1.0f, hidden.data(), kHidden, gate.data(), kHidden, 0.0f, logits.data(), kExperts);
  }
  void route_logits() {
    TopkArgs r = route.args;
    r.logits = logits.data();
    moekit::choose("topk_route", moekit::topk_route_impls(), r).run(r);
  }
  void openblas_then_route() {
    openblas_sgemm();
    route_logits();
  }
};

// OpenBLAS's pthread workers spin for a while (about 2^28 cycles) after each call, and moekit's
// OpenMP workers spin briefly after each parallel region: on a machine with no spare cores the
// spinning pool delays the other's threads. Each side is therefore timed on its own, after the
// other's pool has gone idle.
void let_thread_pools_idle() { std::this_thread::sleep_for(std::chrono::milliseconds(300)); }

// Seconds of the unfused baseline: cblas_sgemm and the routing of its logits, each timed
// separately (the routing after OpenBLAS's workers have gone idle), summed.
double openblas_seconds(int64_t M) {
  static std::map<int64_t, double> cache;
  auto it = cache.find(M);
  if (it != cache.end()) return it->second;
  RouterProblem p(M);
  const double sgemm = seconds_per_call([&] { p.openblas_sgemm(); });
  let_thread_pools_idle();
  const double route = seconds_per_call([&] { p.route_logits(); });
  return cache[M] = sgemm + route;
}

// Seconds of cblas_sgemm and the routing called back to back, timed together.
double openblas_chained_seconds(int64_t M) {
  static std::map<int64_t, double> cache;
  auto it = cache.find(M);
  if (it != cache.end()) return it->second;
  RouterProblem p(M);
  const double seconds = seconds_per_call([&] { p.openblas_then_route(); });
  let_thread_pools_idle();
  return cache[M] = seconds;
}

void set_router_counters(benchmark::State& state, int64_t M, double seconds) {
  const double flops = 2.0 * M * kExperts * kHidden;
  const double gate_bytes = 4.0 * kExperts * kHidden;
  state.counters["GFLOPs"] = flops / seconds * 1e-9;
  state.counters["gate_GBps"] = gate_bytes / seconds * 1e-9;
  // Every M runs on all the threads (M = 1 splits the experts; see topk_route-inl.h).
  state.counters["frac_stream"] =
      gate_bytes / seconds / moekit_bench::streaming_read_bandwidth(moekit::num_threads());
}

void BM_RouterTopk(benchmark::State& state, int impl_index, int64_t M) {
  const auto& impl = moekit::router_topk_impls()[impl_index];
  if (impl.level > moekit::effective_isa()) {
    state.SkipWithError("this CPU lacks the ISA");
    return;
  }
  // The baseline first (cached per M), so that OpenBLAS's workers are idle while this runs.
  const double baseline = openblas_seconds(M);
  const double chained = openblas_chained_seconds(M);
  let_thread_pools_idle();
  RouterProblem p(M);
  for (auto _ : state) {
    impl.run(p.args);
    benchmark::DoNotOptimize(p.route.weights.data());
  }
  const double own = seconds_per_call([&] { impl.run(p.args); });
  set_router_counters(state, M, own);
  state.counters["x_vs_openblas"] = baseline / own;
  state.counters["x_vs_openblas_chained"] = chained / own;
}

void BM_RouterOpenBLAS(benchmark::State& state, int64_t M) {
  RouterProblem p(M);
  for (auto _ : state) {
    p.openblas_then_route();
    benchmark::DoNotOptimize(p.route.weights.data());
  }
  set_router_counters(state, M, openblas_seconds(M));
}

// The few-token expert split against the same call on one thread (both in wall time), over
// gate sizes around the split's work threshold (kRouterSplitMinMacs in topk_route-inl.h):
// x_vs_one_thread > 1 where the threads pay.
void BM_RouterSplit(benchmark::State& state, int64_t E, int64_t H, int64_t M) {
  let_thread_pools_idle();
  RouterProblem p(M, E, H);
  const auto& impl = moekit::choose("router_topk", moekit::router_topk_impls(), p.args);
  for (auto _ : state) {
    impl.run(p.args);
    benchmark::DoNotOptimize(p.route.weights.data());
  }
  const int threads = moekit::num_threads();
  const double own = seconds_per_call([&] { impl.run(p.args); }, true);
  moekit::set_num_threads(1);
  const double one = seconds_per_call([&] { impl.run(p.args); }, true);
  moekit::set_num_threads(threads);
  state.counters["us_per_call"] = own * 1e6;
  state.counters["x_vs_one_thread"] = one / own;
  state.counters["macs"] = static_cast<double>(M * E * H);
}

const bool registered = [] {
  openblas_set_num_threads(moekit::num_threads());
  benchmark::AddCustomContext("openblas_corename", openblas_get_corename());
  benchmark::AddCustomContext("moekit_threads", std::to_string(moekit::num_threads()));
  benchmark::AddCustomContext("ratio_clock", single_thread() ? "thread CPU time" : "wall time");
  const auto& route_impls = moekit::topk_route_impls();
  for (const Model& model : kModels)
    for (int64_t M : kTokenCounts)
      for (int i = 0; i < static_cast<int>(route_impls.size()); ++i)
        benchmark::RegisterBenchmark((std::string("BM_TopkRoute/") + route_impls[i].name + "/" +
                                      model.name + "/" + std::to_string(M))
                                         .c_str(),
                                     BM_TopkRoute, i, model, M)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
  const auto& router_impls = moekit::router_topk_impls();
  for (int64_t M : kTokenCounts) {
    for (int i = 0; i < static_cast<int>(router_impls.size()); ++i) {
      // The scalar and reference GEMMs are too slow to be worth timing on large M.
      if (M > 64 && router_impls[i].level == MOEKIT_ISA_SCALAR) continue;
      benchmark::RegisterBenchmark(
          (std::string("BM_RouterTopk/") + router_impls[i].name + "/" + std::to_string(M)).c_str(),
          BM_RouterTopk, i, M)
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
    benchmark::RegisterBenchmark(("BM_RouterOpenBLAS/" + std::to_string(M)).c_str(),
                                 BM_RouterOpenBLAS, M)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  }
  const int64_t split_shapes[][3] = {{8, 1024, 1},   {16, 2048, 1},  {32, 2048, 1},  {64, 2048, 1},
                                     {128, 2048, 1}, {256, 1024, 1}, {256, 3072, 1}, {256, 3072, 2},
                                     {256, 3072, 3}, {256, 3072, 5}};
  for (const auto& s : split_shapes)
    benchmark::RegisterBenchmark(("BM_RouterSplit/E" + std::to_string(s[0]) + "/H" +
                                  std::to_string(s[1]) + "/" + std::to_string(s[2]))
                                     .c_str(),
                                 BM_RouterSplit, s[0], s[1], s[2])
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
