// The row threshold of the AMX fused-MoE path (MOEKIT_AMX_MIN_ROWS): one expert segment of r
// rows on AMX tiles vs on the AVX-512-BF16 microkernel, on MiniMax-M2 shapes (H 3072, I 1536).
//
// BM_AmxSegment/<amx|avx512bf16>/rows:<r>   fused_moe_bf16_amx with every segment forced onto
//     one microkernel (amx_set_min_rows(1) or a huge threshold). Each call routes r tokens to
//     the same 8 experts (k 8), so each expert has one segment of exactly r rows; successive
//     calls rotate over groups of 8 experts so the weights come from memory, as in decode.
// Counters: GFLOPs, weight_Bps (expert weight bytes / s), bw_frac (of BM_StreamingRead with the
// same threads), and on amx rows x_avx512bf16 = avx512bf16 time / amx time: the threshold is the
// smallest r where it exceeds 1.
// BM_AmxGemmL2: the AMX GEMM microkernel alone on L2-resident operands, one thread (CPU time).
// Environment: MOEKIT_BENCH_AMX_EXPERTS (default 32: 4 groups of 8, about 900 MB of weights).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"

namespace {

constexpr int64_t kHidden = 3072, kInter = 1536, kTopK = 8;
const int64_t kRows[] = {1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128};

bool have_amx() { return moekit_detected_isa() >= MOEKIT_ISA_AMX; }

int64_t num_experts() {
  const char* v = std::getenv("MOEKIT_BENCH_AMX_EXPERTS");
  const int64_t e = v && *v ? std::atoll(v) : 32;
  return std::max<int64_t>(kTopK, e / kTopK * kTopK);
}

struct ExpertsDeleter {
  void operator()(moekit_experts* e) const { moekit_experts_free(e); }
};

// bf16 experts in the AMX layout; a few random patterns cycled over the experts.
moekit_experts* experts() {
  static std::unique_ptr<moekit_experts, ExpertsDeleter> handle = [] {
    const int64_t E = num_experts();
    constexpr int kPatterns = 4;
    std::vector<std::vector<uint16_t>> w13, w2;
    for (int p = 0; p < kPatterns; ++p) {
      w13.push_back(moekit_bench::random_bf16(kInter * kHidden, 10 + p, -0.03f, 0.03f));
      w2.push_back(moekit_bench::random_bf16(kHidden * kInter, 20 + p, -0.03f, 0.03f));
    }
    std::vector<const void*> p1, p3, p2;
    for (int64_t e = 0; e < E; ++e) {
      p1.push_back(w13[e % kPatterns].data());
      p3.push_back(w13[(e + 1) % kPatterns].data());
      p2.push_back(w2[e % kPatterns].data());
    }
    moekit_experts_desc d{};
    d.num_experts = E, d.hidden = kHidden, d.inter = kInter, d.dtype = MOEKIT_BF16;
    d.w1 = p1.data(), d.w3 = p3.data(), d.w2 = p2.data();
    moekit_experts* h = nullptr;
    if (moekit_experts_pack(&d, MOEKIT_LAYOUT_AMX, &h) != MOEKIT_OK) h = nullptr;
    return std::unique_ptr<moekit_experts, ExpertsDeleter>(h);
  }();
  return handle.get();
}

const moekit::Impl<moekit::FusedMoeArgs>* amx_entry() {
  for (const auto& impl : moekit::fused_moe_impls())
    if (std::string(impl.name) == "fused_moe_bf16_amx") return &impl;
  return nullptr;
}

std::map<int64_t, double>& avx512bf16_seconds() {
  static std::map<int64_t, double> m;
  return m;
}

void BM_AmxSegment(benchmark::State& state, int64_t rows, bool amx) {
  const auto* impl = amx_entry();
  if (!have_amx() || impl == nullptr) {
    state.SkipWithError(
        ("skipped: needs amx, this CPU has " + std::string(moekit_isa_name(moekit_detected_isa())))
            .c_str());
    return;
  }
  moekit_experts* w = experts();
  if (w == nullptr) {
    state.SkipWithError("cannot pack the experts");
    return;
  }
  const int64_t groups = w->num_experts / kTopK;
  const int threads = moekit::num_threads();
  const auto hidden = moekit_bench::random_bf16(rows * kHidden, 3);
  std::vector<float> out(static_cast<size_t>(rows * kHidden));
  std::vector<float> weights(static_cast<size_t>(rows * kTopK), 1.0f / kTopK);
  std::vector<std::vector<int32_t>> ids(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t j = 0; j < kTopK; ++j) ids[g].push_back(static_cast<int32_t>(g * kTopK + j));
  const size_t ws_bytes = moekit_moe_workspace_size(rows, kTopK, kHidden, kInter, threads);
  moekit_workspace* ws = nullptr;
  moekit_workspace_create(ws_bytes, &ws);

  moekit::FusedMoeArgs a;
  a.experts = w;
  a.M = rows;
  a.k = kTopK;
  a.hidden = hidden.data();
  a.hidden_stride = kHidden;
  a.hidden_dtype = MOEKIT_BF16;
  a.topk_weights = weights.data();
  a.topk_weights_stride = kTopK;
  a.topk_ids_stride = kTopK;
  a.topk_ids_dtype = MOEKIT_I32;
  a.ws = ws;
  a.out = out.data();
  a.out_stride = kHidden;
  a.out_dtype = MOEKIT_F32;
  a.threads = threads;

  moekit::amx_set_min_rows(amx ? 1 : int64_t{1} << 30);
  int64_t call = 0;
  double seconds = 0;
  for (auto _ : state) {
    a.topk_ids = ids[call++ % groups].data();
    const auto t0 = std::chrono::steady_clock::now();
    impl->run(a);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    benchmark::DoNotOptimize(out.data());
  }
  moekit::amx_set_min_rows(0);
  moekit_workspace_free(ws);

  const double per_call = seconds / static_cast<double>(state.iterations());
  const double weight_bytes = 3.0 * kHidden * kInter * 2 * kTopK;
  const double flops = 2.0 * 3 * kHidden * kInter * rows * kTopK;
  state.counters["GFLOPs"] = flops / per_call * 1e-9;
  state.counters["weight_Bps"] = weight_bytes / per_call;
  state.counters["bw_frac"] =
      weight_bytes / per_call / moekit_bench::streaming_read_bandwidth(threads);
  state.counters["threads"] = threads;
  if (!amx) {
    avx512bf16_seconds()[rows] = per_call;
  } else {
    auto it = avx512bf16_seconds().find(rows);
    if (it != avx512bf16_seconds().end()) state.counters["x_avx512bf16"] = it->second / per_call;
  }
}

// The AMX GEMM microkernel alone, operands resident in L2 (A 128 x 3072 bf16 = 768 KiB, weights
// 128 x 3072 = 768 KiB), one thread: what the tile loop reaches without memory traffic (compare
// BM_AmxBf16Peak in bench_ceilings).
void BM_AmxGemmL2(benchmark::State& state) {
  if (!have_amx()) {
    state.SkipWithError("skipped: needs amx");
    return;
  }
  constexpr int64_t rows = 128, n = 128, k = kHidden;
  // Row stride of A: k, or k plus state.range(0) elements (a stride of a multiple of 2 KiB puts
  // a tile's 16 rows in a few L1 sets).
  const int64_t lda = k + state.range(0);
  // Allocated as the library allocates its buffers: 64-byte aligned rows (a misaligned tile row
  // straddles two cache lines, which cost 1.5x here).
  const auto a_values = moekit_bench::random_bf16(rows * lda, 5);
  moekit::AlignedBytes a_bytes = moekit::aligned_alloc_bytes(a_values.size() * 2);
  auto* a = reinterpret_cast<uint16_t*>(a_bytes.get());
  std::copy(a_values.begin(), a_values.end(), a);
  const auto w = moekit_bench::random_bf16(n * k, 6);
  moekit::AlignedBytes packed_bytes = moekit::aligned_alloc_bytes(moekit::amx_packed_bytes(n, k));
  auto* packed = reinterpret_cast<uint16_t*>(packed_bytes.get());
  moekit::vnni_pack_matrix(w.data(), MOEKIT_BF16, n, k, packed);
  std::vector<float> c(static_cast<size_t>(rows * n));
  moekit::AmxTileScope tiles;
  for (auto _ : state) {
    moekit::amx_gemm_bf16(a, lda, rows, packed, n, k, c.data(), n);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["FLOP/s"] = benchmark::Counter(
      2.0 * rows * n * k * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_AmxGemmL2)->ArgName("lda_pad")->Arg(0)->Arg(32)->Unit(benchmark::kMicrosecond);

// Registered so that each row count runs avx512bf16 first, then amx (for x_avx512bf16).
const bool registered = [] {
  for (int64_t rows : kRows)
    for (bool amx : {false, true})
      benchmark::RegisterBenchmark(
          (std::string("BM_AmxSegment/") + (amx ? "amx" : "avx512bf16") +
           "/rows:" + std::to_string(rows))
              .c_str(),
          [rows, amx](benchmark::State& s) { BM_AmxSegment(s, rows, amx); })
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
