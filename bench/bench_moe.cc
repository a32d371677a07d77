// Blockwise expert matmul (fused MoE) on MiniMax-M2 shapes: H 3072, I 1536, k 8, E experts
// (256 by default), uniform random routing, M in {1, 4, 16, 64, 256, 1024, 4096}.
//
// BM_FusedMoe/<impl>/M:<M>        every fused_moe implementation this CPU runs, bf16 weights,
//                                 bf16 hidden and output (scalar only for M <= 4).
// BM_FusedMoeRef/M:<M>            the reference (M <= 4 only: it works in double).
// BM_AmxBf16Peak, BM_Avx512Bf16Peak, BM_Avx512FmaPeak, BM_OnednnMatmulBf16, BM_StreamingRead
//                                 the machine's ceilings (bench_ceilings.cc, compiled in here
//                                 too, with its BM_AmxTileLoop), measured in the same run as
//                                 the kernels.
// BM_FusedMoeShared/M:<M>         one shared expert (I_s = 1536, bf16) added to the routed call
//                                 (moekit_fused_moe_shared's path), M in {1, 1024}: the chosen
//                                 implementation timed with and without it in the same run;
//                                 counters routed_ms, shared_ms, x_routed = shared_ms /
//                                 routed_ms, and the ratios of the work: bytes_ratio (weights
//                                 touched, (distinct + 1) / distinct: the decode ideal) and
//                                 flops_ratio ((k + 1) / k: the prefill ideal).
// BM_OnednnPerExpert/M:<M>        baseline: a loop over experts of oneDNN bf16 matmuls (gate|up
//                                 as one [H, 2I] matmul, SiLU*up, down), gather/scatter by
//                                 token; weights reordered once into oneDNN's preferred format.
// BM_FusedMoeF32/<impl>/M:<M>     f32 weights, f32 hidden and output.
// BM_OpenblasPerExpert/M:<M>      baseline: a loop over experts of OpenBLAS cblas_sgemm (f32).
// Counters, side by side in one run:
//   weight_Bps  bytes of expert weights the call touches (distinct routed experts x 3 matrices)
//               per second;  bw_frac  weight_Bps / the streaming-read bandwidth measured by this
//               binary (BM_StreamingRead) with the same threads;  GFLOPs  2 * 3 * H * I per
//               routed pair;  x_moekit (on baseline rows)  baseline time / the time of the
//               implementation dispatch chooses for that dtype (> 1: moekit is faster);
//               x_avx512bf16 (oneDNN rows)  the same against fused_moe_bf16_avx512bf16_vnni;
//               frac_fma_peak / frac_bf16_peak / frac_amx_peak (bf16 rows)  GFLOPs over the
//               f32 FMA / VDPBF16PS / TDPBF16PS register peak of the same threads, measured by
//               this binary (BM_Avx512FmaPeak / BM_Avx512Bf16Peak / BM_AmxBf16Peak; absent on
//               CPUs without the level). The avx512bf16 implementation runs f32 FMA on expert
//               segments of at least MOEKIT_BF16_FMA_MIN_ROWS rows (moe_microkernel.h).
//   bw_frac_now, frac_amx_peak_now  the same ratios against a streaming read and an AMX peak
//               loop measured again right after the row's own timing (best of 3, not cached):
//               on a shared machine whose bandwidth and clocks drift within minutes, the first
//               reading can be far from the one the row ran under.
//   frac_amx_tile_l1_now (bf16 rows, AMX CPUs)  GFLOPs over the AMX 2 x 2 tile step run on
//               every thread with its operands in L1 (BM_AmxTileLoop/k_blocks:8), measured
//               right after the row: the fastest the kernels' step runs here. With eight
//               tiles, 2 x 2 accumulators load one tile per product, the fewest a GEMM can.
// oneDNN picks its own ISA (AMX here); ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 caps it to the
// AVX-512-BF16 kernels for a like-for-like comparison with the avx512bf16 implementation.
// Every call takes the next of several routings so that decode calls stream weights from memory
// (the experts' weights are several times the last-level cache).
//
// Environment: MOEKIT_BENCH_MOE_EXPERTS (default 256) and MOEKIT_BENCH_MOE_F32_EXPERTS
// (default 64: f32 weights take twice the memory and OpenBLAS needs its own copy) set the
// expert counts; MOEKIT_BENCH_MOE_MAX_M (default 4096) skips larger M for quick runs. Memory is
// held one phase at a time (bf16 handle, then oneDNN weights, then the f32 handle and OpenBLAS
// weights): about 7.2 GB at E = 256.
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <dnnl.hpp>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench/bench_util.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "reference/numeric.h"
#include "reference/reference.h"

namespace {

using moekit::FusedMoeArgs;

constexpr int64_t kHidden = 3072, kInter = 1536, kTopK = 8;
const int64_t kTokenCounts[] = {1, 4, 16, 64, 256, 1024, 4096};
constexpr int kSourceExperts = 4;  // distinct random weight patterns, cycled over the experts

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : fallback;
}
int64_t bf16_experts() { return env_int("MOEKIT_BENCH_MOE_EXPERTS", 256); }
int64_t f32_experts() { return env_int("MOEKIT_BENCH_MOE_F32_EXPERTS", 64); }
int64_t max_m() { return env_int("MOEKIT_BENCH_MOE_MAX_M", 4096); }
int threads() { return moekit::num_threads(); }

// Seconds per call, the fastest of a few batches (the machine is shared: the minimum is the
// least disturbed figure, taken the same way on both sides of every ratio).
double seconds_per_call(const std::function<void()>& fn) {
  using clock = std::chrono::steady_clock;
  fn();  // warm up (first-touch of workspaces, primitive creation)
  int batch = 1;
  for (;;) {
    const auto t0 = clock::now();
    for (int i = 0; i < batch; ++i) fn();
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    if (s > 0.2 || batch >= 64) break;
    batch *= 2;
  }
  double best = 1e30;
  const int reps = batch == 1 ? 1 : 3;  // calls of seconds: one timed batch is enough
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = clock::now();
    for (int i = 0; i < batch; ++i) fn();
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count() / batch);
  }
  return best;
}

// ---- routing -------------------------------------------------------------------------------

struct Routing {
  std::vector<int32_t> ids;    // [M, k]
  std::vector<float> weights;  // [M, k]
  int64_t distinct = 0;        // experts routed to
  // Pairs grouped by expert (for the per-expert baselines): expert -> list of m * k + j.
  std::vector<std::vector<int32_t>> by_expert;
};

std::vector<Routing> make_routings(int64_t M, int64_t E) {
  const int64_t variants = std::clamp<int64_t>(2048 / M, 1, 32);
  std::vector<Routing> out(variants);
  std::mt19937 rng(static_cast<uint32_t>(M * 131 + E));
  for (Routing& r : out) {
    r.ids.resize(M * kTopK);
    r.weights.resize(M * kTopK);
    r.by_expert.assign(E, {});
    std::vector<int32_t> pool(E);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t e = 0; e < E; ++e) pool[e] = static_cast<int32_t>(e);
      float sum = 0;
      for (int64_t j = 0; j < kTopK; ++j) {  // partial Fisher-Yates: k distinct experts
        std::uniform_int_distribution<int64_t> pick(j, E - 1);
        std::swap(pool[j], pool[pick(rng)]);
        r.ids[m * kTopK + j] = pool[j];
        r.weights[m * kTopK + j] = std::uniform_real_distribution<float>(0.1f, 1.0f)(rng);
        sum += r.weights[m * kTopK + j];
        r.by_expert[pool[j]].push_back(static_cast<int32_t>(m * kTopK + j));
      }
      for (int64_t j = 0; j < kTopK; ++j) r.weights[m * kTopK + j] /= sum;
    }
    for (const auto& v : r.by_expert) r.distinct += !v.empty();
  }
  return out;
}

double mean_distinct(const std::vector<Routing>& rs) {
  double s = 0;
  for (const Routing& r : rs) s += static_cast<double>(r.distinct);
  return s / static_cast<double>(rs.size());
}

// ---- resident weights, one phase at a time ---------------------------------------------------

struct ExpertsDeleter {
  void operator()(moekit_experts* e) const { moekit_experts_free(e); }
};
using ExpertsPtr = std::unique_ptr<moekit_experts, ExpertsDeleter>;

// HF-layout source matrices of kSourceExperts experts: w1/w3 [I, H], w2 [H, I].
struct Source {
  std::vector<std::vector<float>> w1, w3, w2;
  Source() {
    const float s1 = 2.0f / std::sqrt(static_cast<float>(kHidden));
    const float s2 = 2.0f / std::sqrt(static_cast<float>(kInter));
    for (int i = 0; i < kSourceExperts; ++i) {
      w1.push_back(moekit_bench::random_floats(kInter * kHidden, 10 + 3 * i, -s1, s1));
      w3.push_back(moekit_bench::random_floats(kInter * kHidden, 11 + 3 * i, -s1, s1));
      w2.push_back(moekit_bench::random_floats(kHidden * kInter, 12 + 3 * i, -s2, s2));
    }
  }
};
const Source& source() {
  static Source s;
  return s;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = moekit::f32_to_bf16(v[i]);
  return out;
}

ExpertsPtr pack(int64_t E, moekit_dtype dtype) {
  const Source& s = source();
  std::vector<std::vector<uint16_t>> b16[3];
  const std::vector<std::vector<float>>* mats[3] = {&s.w1, &s.w3, &s.w2};
  std::vector<const void*> ptrs[3];
  for (int m = 0; m < 3; ++m) {
    if (dtype == MOEKIT_BF16)
      for (int i = 0; i < kSourceExperts; ++i) b16[m].push_back(to_bf16((*mats[m])[i]));
    for (int64_t e = 0; e < E; ++e)
      ptrs[m].push_back(dtype == MOEKIT_BF16
                            ? static_cast<const void*>(b16[m][e % kSourceExperts].data())
                            : static_cast<const void*>((*mats[m])[e % kSourceExperts].data()));
  }
  moekit_experts_desc d{};
  d.num_experts = E;
  d.hidden = kHidden;
  d.inter = kInter;
  d.dtype = dtype;
  d.w1 = ptrs[0].data();
  d.w3 = ptrs[1].data();
  d.w2 = ptrs[2].data();
  moekit_experts* h = nullptr;
  if (moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &h) != MOEKIT_OK) {
    std::fprintf(stderr, "bench_moe: pack failed: %s\n", moekit_last_error());
    std::abort();
  }
  return ExpertsPtr(h);
}

// oneDNN weights of every expert: w13 [H, 2I] (gate columns then up columns) and w2 [I, H],
// in the format oneDNN picks for bf16 matmul.
struct OnednnExperts {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  dnnl::memory::desc w13_md, w2_md;
  std::vector<dnnl::memory> w13, w2;
  // Primitives by row count (created on first use, outside the timed loops: warm-up call).
  std::map<int64_t, std::pair<dnnl::matmul, dnnl::matmul>> prims;

  explicit OnednnExperts(int64_t E);
  const std::pair<dnnl::matmul, dnnl::matmul>& matmuls(int64_t rows);
};

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

dnnl::matmul::primitive_desc matmul_pd(const dnnl::engine& eng, int64_t M, int64_t K, int64_t N,
                                       const dnnl::memory::desc& w) {
  dnnl::memory::desc src({M, K}, dt::bf16, tag::ab), dst({M, N}, dt::f32, tag::ab);
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, w, dst), eng);
}

OnednnExperts::OnednnExperts(int64_t E) {
  const int64_t probe_rows = 32;
  w13_md = matmul_pd(engine, probe_rows, kHidden, 2 * kInter,
                     dnnl::memory::desc({kHidden, 2 * kInter}, dt::bf16, tag::any))
               .weights_desc();
  w2_md = matmul_pd(engine, probe_rows, kInter, kHidden,
                    dnnl::memory::desc({kInter, kHidden}, dt::bf16, tag::any))
              .weights_desc();
  const Source& s = source();
  // Plain sources: w13 as [2I][H] row-major = {H, 2I} with tag ba; w2 [H][I] = {I, H} ba.
  std::vector<dnnl::memory> plain13, plain2;
  for (int i = 0; i < kSourceExperts; ++i) {
    std::vector<float> cat(s.w1[i]);
    cat.insert(cat.end(), s.w3[i].begin(), s.w3[i].end());
    dnnl::memory p13({{kHidden, 2 * kInter}, dt::bf16, tag::ba}, engine);
    std::vector<uint16_t> b = to_bf16(cat);
    std::memcpy(p13.get_data_handle(), b.data(), b.size() * 2);
    plain13.push_back(p13);
    dnnl::memory p2({{kInter, kHidden}, dt::bf16, tag::ba}, engine);
    b = to_bf16(s.w2[i]);
    std::memcpy(p2.get_data_handle(), b.data(), b.size() * 2);
    plain2.push_back(p2);
  }
  for (int64_t e = 0; e < E; ++e) {
    w13.emplace_back(w13_md, engine);
    dnnl::reorder(plain13[e % kSourceExperts], w13.back())
        .execute(stream, plain13[e % kSourceExperts], w13.back());
    w2.emplace_back(w2_md, engine);
    dnnl::reorder(plain2[e % kSourceExperts], w2.back())
        .execute(stream, plain2[e % kSourceExperts], w2.back());
  }
  stream.wait();
}

const std::pair<dnnl::matmul, dnnl::matmul>& OnednnExperts::matmuls(int64_t rows) {
  auto it = prims.find(rows);
  if (it != prims.end()) return it->second;
  dnnl::matmul up(matmul_pd(engine, rows, kHidden, 2 * kInter, w13_md));
  dnnl::matmul down(matmul_pd(engine, rows, kInter, kHidden, w2_md));
  return prims.emplace(rows, std::make_pair(up, down)).first->second;
}

// f32 weights: our handle and OpenBLAS's HF-layout copy of every expert.
struct F32Experts {
  ExpertsPtr handle;
  std::vector<std::vector<float>> w1, w3, w2;
  explicit F32Experts(int64_t E) : handle(pack(E, MOEKIT_F32)) {
    const Source& s = source();
    for (int64_t e = 0; e < E; ++e) {
      w1.push_back(s.w1[e % kSourceExperts]);
      w3.push_back(s.w3[e % kSourceExperts]);
      w2.push_back(s.w2[e % kSourceExperts]);
    }
  }
};

enum class Phase { kNone, kBf16, kOnednn, kF32 };
struct Resident {
  Phase phase = Phase::kNone;
  ExpertsPtr bf16;
  std::unique_ptr<OnednnExperts> onednn;
  std::unique_ptr<F32Experts> f32;
  void enter(Phase p) {
    if (phase == p) return;
    bf16.reset();
    onednn.reset();
    f32.reset();
    phase = p;
    if (p == Phase::kBf16) bf16 = pack(bf16_experts(), MOEKIT_BF16);
    if (p == Phase::kOnednn) onednn = std::make_unique<OnednnExperts>(bf16_experts());
    if (p == Phase::kF32) f32 = std::make_unique<F32Experts>(f32_experts());
  }
};
Resident& resident() {
  static Resident r;
  return r;
}

// ---- activations and outputs -----------------------------------------------------------------

struct Io {
  int64_t M;
  std::vector<uint16_t> x_bf16, out_bf16;
  std::vector<float> x_f32, out_f32;
  moekit_workspace* ws = nullptr;
  explicit Io(int64_t m) : M(m) {
    x_f32 = moekit_bench::random_floats(M * kHidden, 99);
    x_bf16 = to_bf16(x_f32);
    out_bf16.resize(M * kHidden);
    out_f32.resize(M * kHidden);
    moekit_workspace_create(moekit_moe_workspace_size(M, kTopK, kHidden, kInter, threads()), &ws);
  }
  ~Io() { moekit_workspace_free(ws); }
};

FusedMoeArgs args_for(const moekit_experts* w, Io& io, const Routing& r, bool f32) {
  FusedMoeArgs a;
  a.experts = w;
  a.M = io.M;
  a.k = kTopK;
  a.hidden = f32 ? static_cast<const void*>(io.x_f32.data()) : io.x_bf16.data();
  a.hidden_stride = kHidden;
  a.hidden_dtype = f32 ? MOEKIT_F32 : MOEKIT_BF16;
  a.topk_weights = r.weights.data();
  a.topk_weights_stride = kTopK;
  a.topk_ids = r.ids.data();
  a.topk_ids_stride = kTopK;
  a.ws = io.ws;
  a.out = f32 ? static_cast<void*>(io.out_f32.data()) : io.out_bf16.data();
  a.out_stride = kHidden;
  a.out_dtype = f32 ? MOEKIT_F32 : MOEKIT_BF16;
  a.threads = threads();
  return a;
}

// Seconds per call of the implementation dispatch chooses, by (dtype, M); measured by the
// BM_FusedMoe rows and read by the baselines' x_moekit.
std::map<std::pair<std::string, int64_t>, double>& impl_seconds() {
  static std::map<std::pair<std::string, int64_t>, double> m;
  return m;
}
std::map<std::pair<int, int64_t>, double>& chosen_seconds() {
  static std::map<std::pair<int, int64_t>, double> m;
  return m;
}

void set_counters(benchmark::State& state, int64_t M, double seconds, double distinct,
                  size_t weight_elem) {
  const double weight_bytes = distinct * 3.0 * kHidden * kInter * static_cast<double>(weight_elem);
  const double flops = 2.0 * 3.0 * kHidden * kInter * static_cast<double>(M * kTopK);
  state.counters["weight_Bps"] = weight_bytes / seconds;
  state.counters["bw_frac"] =
      weight_bytes / seconds / moekit_bench::streaming_read_bandwidth(threads());
  state.counters["GFLOPs"] = flops / seconds * 1e-9;
  // bf16 rows against the register peaks of the same threads (BM_*Bf16Peak rows).
  if (weight_elem == 2)
    for (const auto& [level, counter] : {std::pair{MOEKIT_ISA_AVX512, "frac_fma_peak"},
                                         std::pair{MOEKIT_ISA_AVX512_BF16, "frac_bf16_peak"},
                                         std::pair{MOEKIT_ISA_AMX, "frac_amx_peak"}})
      if (const double peak = moekit_bench::register_peak_flops(level, threads()); peak > 0)
        state.counters[counter] = flops / seconds / peak;
  state.counters["bw_frac_now"] =
      weight_bytes / seconds / moekit_bench::streaming_read_bandwidth_now(threads());
  if (weight_elem == 2) {
    if (const double peak = moekit_bench::register_peak_flops_now(MOEKIT_ISA_AMX, threads());
        peak > 0)
      state.counters["frac_amx_peak_now"] = flops / seconds / peak;
    if (const double loop = moekit_bench::amx_tile_loop_flops(threads(), 8, 4); loop > 0)
      state.counters["frac_amx_tile_l1_now"] = flops / seconds / loop;
  }
  state.counters["threads"] = threads();
  state.SetIterationTime(seconds);
}

// Runs `call(routing)` cycling over the routings; reports the best seconds per call.
double time_cycling(const std::vector<Routing>& rs,
                    const std::function<void(const Routing&)>& call) {
  size_t next = 0;
  return seconds_per_call([&] { call(rs[next++ % rs.size()]); });
}

// ---- moekit ---------------------------------------------------------------------------------

void BM_FusedMoe(benchmark::State& state, int impl_index, int64_t M, bool f32) {
  const auto& impl = moekit::fused_moe_impls()[impl_index];
  resident().enter(f32 ? Phase::kF32 : Phase::kBf16);
  const moekit_experts* w = f32 ? resident().f32->handle.get() : resident().bf16.get();
  const std::vector<Routing> rs = make_routings(M, w->num_experts);
  Io io(M);
  const FusedMoeArgs probe = args_for(w, io, rs[0], f32);
  if (impl.level > moekit::effective_isa() || (impl.supports && impl.supports(probe))) {
    state.SkipWithError("not supported here");
    return;
  }
  double seconds = 0;
  for (auto _ : state)
    seconds = time_cycling(rs, [&](const Routing& r) { impl.run(args_for(w, io, r, f32)); });
  const bool chosen = &moekit::choose("fused_moe", moekit::fused_moe_impls(), probe) == &impl;
  if (chosen) chosen_seconds()[{f32, M}] = seconds;
  impl_seconds()[{impl.name, M}] = seconds;
  state.counters["chosen"] = chosen;
  set_counters(state, M, seconds, mean_distinct(rs), f32 ? 4 : 2);
}

void BM_FusedMoeRef(benchmark::State& state, int64_t M) {
  resident().enter(Phase::kBf16);
  const moekit_experts* w = resident().bf16.get();
  const std::vector<Routing> rs = make_routings(M, w->num_experts);
  Io io(M);
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    moekit::ref_fused_moe(args_for(w, io, rs[0], false));
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  auto it = chosen_seconds().find({false, M});
  if (it != chosen_seconds().end()) state.counters["x_moekit"] = seconds / it->second;
  set_counters(state, M, seconds, static_cast<double>(rs[0].distinct), 2);
}

// Routed-only vs routed + one shared expert through the implementation dispatch chooses, in
// one run (bf16 weights, hidden and output; the shared expert has the routed inter).
void BM_FusedMoeShared(benchmark::State& state, int64_t M) {
  resident().enter(Phase::kBf16);
  const moekit_experts* w = resident().bf16.get();
  const ExpertsPtr shared = pack(1, MOEKIT_BF16);
  const std::vector<Routing> rs = make_routings(M, w->num_experts);
  Io io(M);
  moekit_workspace* ws = nullptr;
  moekit_workspace_create(
      moekit_moe_workspace_size_shared(M, kTopK, kHidden, kInter, 1, kInter, threads()), &ws);
  const auto args = [&](const Routing& r, bool with_shared) {
    FusedMoeArgs a = args_for(w, io, r, false);
    a.ws = ws;
    if (with_shared) a.shared = shared.get();
    return a;
  };
  const auto& routed_impl =
      moekit::choose("fused_moe", moekit::fused_moe_impls(), args(rs[0], false));
  const auto& shared_impl =
      moekit::choose("fused_moe", moekit::fused_moe_impls(), args(rs[0], true));
  double routed = 0, with_shared = 0;
  for (auto _ : state) {
    routed = time_cycling(rs, [&](const Routing& r) { routed_impl.run(args(r, false)); });
    with_shared = time_cycling(rs, [&](const Routing& r) { shared_impl.run(args(r, true)); });
  }
  moekit_workspace_free(ws);
  state.SetLabel(std::string(routed_impl.name) + " / " + shared_impl.name);
  const double distinct = mean_distinct(rs);
  state.counters["routed_ms"] = routed * 1e3;
  state.counters["shared_ms"] = with_shared * 1e3;
  state.counters["x_routed"] = with_shared / routed;
  state.counters["bytes_ratio"] = (distinct + 1) / distinct;
  state.counters["flops_ratio"] = static_cast<double>(kTopK + 1) / kTopK;
  state.counters["threads"] = threads();
  state.SetIterationTime(with_shared);
}

// ---- baselines -------------------------------------------------------------------------------

inline float silu_mul(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

void BM_OnednnPerExpert(benchmark::State& state, int64_t M) {
  resident().enter(Phase::kOnednn);
  OnednnExperts& d = *resident().onednn;
  const int64_t E = static_cast<int64_t>(d.w13.size());
  const std::vector<Routing> rs = make_routings(M, E);
  Io io(M);
  const int64_t max_rows = M;  // an expert gets at most one pair per token
  dnnl::memory a({{max_rows, kHidden}, dt::bf16, tag::ab}, d.engine);
  dnnl::memory c({{max_rows, 2 * kInter}, dt::f32, tag::ab}, d.engine);
  dnnl::memory act({{max_rows, kInter}, dt::bf16, tag::ab}, d.engine);
  dnnl::memory y({{max_rows, kHidden}, dt::f32, tag::ab}, d.engine);
  std::vector<float> acc(M * kHidden);
  const auto call = [&](const Routing& r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      const std::vector<int32_t>& pairs = r.by_expert[e];
      const int64_t rows = static_cast<int64_t>(pairs.size());
      if (rows == 0) continue;
      auto* av = static_cast<uint16_t*>(a.get_data_handle());
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(av + i * kHidden, &io.x_bf16[(pairs[i] / kTopK) * kHidden], kHidden * 2);
      const auto& mm = d.matmuls(rows);
      // Views of the first `rows` rows of the scratch buffers.
      dnnl::memory a_v({{rows, kHidden}, dt::bf16, tag::ab}, d.engine, a.get_data_handle());
      dnnl::memory c_v({{rows, 2 * kInter}, dt::f32, tag::ab}, d.engine, c.get_data_handle());
      dnnl::memory act_v({{rows, kInter}, dt::bf16, tag::ab}, d.engine, act.get_data_handle());
      dnnl::memory y_v({{rows, kHidden}, dt::f32, tag::ab}, d.engine, y.get_data_handle());
      mm.first.execute(d.stream,
                       {{DNNL_ARG_SRC, a_v}, {DNNL_ARG_WEIGHTS, d.w13[e]}, {DNNL_ARG_DST, c_v}});
      d.stream.wait();
      const float* cv = static_cast<const float*>(c.get_data_handle());
      auto* actv = static_cast<uint16_t*>(act.get_data_handle());
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t n = 0; n < kInter; ++n)
          actv[i * kInter + n] = moekit::f32_to_bf16(
              silu_mul(cv[i * 2 * kInter + n], cv[i * 2 * kInter + kInter + n]));
      mm.second.execute(d.stream,
                        {{DNNL_ARG_SRC, act_v}, {DNNL_ARG_WEIGHTS, d.w2[e]}, {DNNL_ARG_DST, y_v}});
      d.stream.wait();
      const float* yv = static_cast<const float*>(y.get_data_handle());
#pragma omp parallel for schedule(static)
      for (int64_t h0 = 0; h0 < kHidden; h0 += 256)  // by columns: no two threads share a sum
        for (int64_t i = 0; i < rows; ++i) {
          const float wt = r.weights[pairs[i]];
          float* dst = &acc[(pairs[i] / kTopK) * kHidden];
          for (int64_t h = h0; h < std::min(h0 + 256, kHidden); ++h)
            dst[h] += wt * yv[i * kHidden + h];
        }
    }
    for (int64_t i = 0; i < M * kHidden; ++i) io.out_bf16[i] = moekit::f32_to_bf16(acc[i]);
  };
  // Create every primitive this benchmark needs before timing.
  for (const Routing& r : rs)
    for (const auto& v : r.by_expert)
      if (!v.empty()) d.matmuls(static_cast<int64_t>(v.size()));
  double seconds = 0;
  for (auto _ : state) seconds = time_cycling(rs, call);
  auto it = chosen_seconds().find({false, M});
  if (it != chosen_seconds().end()) state.counters["x_moekit"] = seconds / it->second;
  auto bf = impl_seconds().find({"fused_moe_bf16_avx512bf16_vnni", M});
  if (bf != impl_seconds().end()) state.counters["x_avx512bf16"] = seconds / bf->second;
  set_counters(state, M, seconds, mean_distinct(rs), 2);
}

void BM_OpenblasPerExpert(benchmark::State& state, int64_t M) {
  resident().enter(Phase::kF32);
  F32Experts& f = *resident().f32;
  const int64_t E = static_cast<int64_t>(f.w1.size());
  openblas_set_num_threads(threads());
  const std::vector<Routing> rs = make_routings(M, E);
  Io io(M);
  std::vector<float> a(M * kHidden), g(M * kInter), u(M * kInter), y(M * kHidden);
  const auto call = [&](const Routing& r) {
    std::fill(io.out_f32.begin(), io.out_f32.end(), 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      const std::vector<int32_t>& pairs = r.by_expert[e];
      const int rows = static_cast<int>(pairs.size());
      if (rows == 0) continue;
      for (int i = 0; i < rows; ++i)
        std::memcpy(&a[i * kHidden], &io.x_f32[(pairs[i] / kTopK) * kHidden], kHidden * 4);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, kInter, kHidden, 1.0f, a.data(),
                  kHidden, f.w1[e].data(), kHidden, 0.0f, g.data(), kInter);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, kInter, kHidden, 1.0f, a.data(),
                  kHidden, f.w3[e].data(), kHidden, 0.0f, u.data(), kInter);
      for (int64_t i = 0; i < rows * kInter; ++i) g[i] = silu_mul(g[i], u[i]);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, kHidden, kInter, 1.0f, g.data(),
                  kInter, f.w2[e].data(), kInter, 0.0f, y.data(), kHidden);
      for (int i = 0; i < rows; ++i) {
        const float wt = r.weights[pairs[i]];
        float* dst = &io.out_f32[(pairs[i] / kTopK) * kHidden];
        for (int64_t h = 0; h < kHidden; ++h) dst[h] += wt * y[i * kHidden + h];
      }
    }
  };
  double seconds = 0;
  for (auto _ : state) seconds = time_cycling(rs, call);
  auto it = chosen_seconds().find({true, M});
  if (it != chosen_seconds().end()) state.counters["x_moekit"] = seconds / it->second;
  set_counters(state, M, seconds, mean_distinct(rs), 4);
}

// ---- registration (run order = memory phases) --------------------------------------------------

int register_all() {
  // The OpenBLAS kernels in force (OPENBLAS_CORETYPE or its own detection) go in the context.
  benchmark::AddCustomContext("openblas_core", openblas_get_corename());
  const auto& impls = moekit::fused_moe_impls();
  const auto for_m = [](const std::function<void(int64_t)>& fn) {
    for (int64_t M : kTokenCounts)
      if (M <= max_m()) fn(M);
  };
  const auto reg = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)
        ->Iterations(1)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  };
  const auto is_ref = [](const char* name) { return std::string(name).rfind("ref", 0) == 0; };
  const auto is_scalar = [](const char* name) {
    return std::string(name).find("scalar") != std::string::npos;
  };
  const auto serves = [&](int i, moekit_dtype dt) {
    return std::string(impls[i].name).find(dt == MOEKIT_F32 ? "_f32_" : "_bf16_") !=
           std::string::npos;
  };
  for_m([&](int64_t M) {
    for (int i = 0; i < static_cast<int>(impls.size()); ++i)
      if (!is_ref(impls[i].name) && serves(i, MOEKIT_BF16) && (!is_scalar(impls[i].name) || M <= 4))
        reg(std::string("BM_FusedMoe/") + impls[i].name + "/M:" + std::to_string(M),
            [i, M](benchmark::State& s) { BM_FusedMoe(s, i, M, false); });
  });
  for (int64_t M : {1, 4})
    reg("BM_FusedMoeRef/M:" + std::to_string(M),
        [M](benchmark::State& s) { BM_FusedMoeRef(s, M); });
  for (int64_t M : {1, 1024})
    if (M <= max_m())
      reg("BM_FusedMoeShared/M:" + std::to_string(M),
          [M](benchmark::State& s) { BM_FusedMoeShared(s, M); });
  for_m([&](int64_t M) {
    reg("BM_OnednnPerExpert/M:" + std::to_string(M),
        [M](benchmark::State& s) { BM_OnednnPerExpert(s, M); });
  });
  for_m([&](int64_t M) {
    for (int i = 0; i < static_cast<int>(impls.size()); ++i)
      if (!is_ref(impls[i].name) && serves(i, MOEKIT_F32) && (!is_scalar(impls[i].name) || M <= 4))
        reg(std::string("BM_FusedMoeF32/") + impls[i].name + "/M:" + std::to_string(M),
            [i, M](benchmark::State& s) { BM_FusedMoe(s, i, M, true); });
  });
  for_m([&](int64_t M) {
    reg("BM_OpenblasPerExpert/M:" + std::to_string(M),
        [M](benchmark::State& s) { BM_OpenblasPerExpert(s, M); });
  });
  return 0;
}
const int kRegistered = register_all();

}  // namespace
