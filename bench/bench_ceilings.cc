// The machine's ceilings, measured in-process beside each other: the AMX-BF16 register peak
// (TDPBF16PS on loaded tiles, per thread and on all threads), the AVX-512-BF16 one (VDPBF16PS on
// registers), the AVX-512 f32 FMA one, one large oneDNN bf16 matmul
// (4096^3, the practical compute ceiling a library reaches), and BM_StreamingRead (the memory
// ceiling, from bench_util.cc). Kernel benchmarks quote their FLOP/s and bytes/s against these.
// BM_AmxTileLoop times the AMX kernels' 2 x 2 tile step alone as its operands outgrow L1 and L2.
// AMX entries report themselves skipped on CPUs without AMX.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <dnnl.hpp>
#include <string>
#include <unordered_map>

#include "bench/amx_peak.h"
#include "bench/bench_util.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "moekit/moekit.h"

namespace {

// A register peak on state.range(0) threads (moekit_bench::register_peak_flops: measured once
// per process and thread count, so that the kernels' frac_*_peak counters in the same binary
// divide by this very figure). Skipped on CPUs below `level` (a ceiling of the machine:
// MOEKIT_ISA does not cap it).
void RunPeak(benchmark::State& state, moekit_isa level) {
  const int threads = static_cast<int>(state.range(0));
  double peak = 0;
  for (auto _ : state) peak = moekit_bench::register_peak_flops(level, threads);
  if (peak <= 0) {
    state.SkipWithError((std::string("skipped: needs ") + moekit_isa_name(level) +
                         ", this CPU has " + moekit_isa_name(moekit_detected_isa()))
                            .c_str());
    return;
  }
  state.counters["FLOP/s"] = peak;
  state.counters["threads"] = threads;
}

// TDPBF16PS on loaded tiles, six accumulators (bench/amx_peak.cc).
void BM_AmxBf16Peak(benchmark::State& state) { RunPeak(state, MOEKIT_ISA_AMX); }
BENCHMARK(BM_AmxBf16Peak)
    ->Arg(1)
    ->Arg(moekit::num_threads())
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// VDPBF16PS on registers, twelve accumulators (bench/avx512bf16_peak.cc).
void BM_Avx512Bf16Peak(benchmark::State& state) { RunPeak(state, MOEKIT_ISA_AVX512_BF16); }
BENCHMARK(BM_Avx512Bf16Peak)
    ->Arg(1)
    ->Arg(moekit::num_threads())
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// f32 FMA on registers, 24 accumulators (bench/avx512fma_peak.cc): what the AVX-512-BF16
// kernel's FMA path (MOEKIT_BF16_FMA_MIN_ROWS) runs against.
void BM_Avx512FmaPeak(benchmark::State& state) { RunPeak(state, MOEKIT_ISA_AVX512); }
BENCHMARK(BM_Avx512FmaPeak)
    ->Arg(1)
    ->Arg(moekit::num_threads())
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// The AMX 2 x 2 tile step alone (moekit_bench::amx_tile_loop_flops) on state.range(1) threads,
// each on its own operands, as they grow: 32 rows of A and 32 columns of B over state.range(0)
// K blocks, 4 KiB per block in all (L1 is 48 KiB, L2 2 MiB on Sapphire/Emerald Rapids).
// state.range(2) tile loads per block: 4 is the GEMM step, 3 and 2 load fewer tiles for the
// same products (not a GEMM; amx_peak.h), which prices the loads. frac_peak: FLOP/s over the
// register peak of the same threads measured right before, not the cached figure (one
// thread's peak drifted 3x within minutes on a shared AMX machine). On all threads with
// operands in L1 and 4 loads, this is the ceiling of any kernel built on this step: fused MoE
// rows quote it (8 K blocks, 32 KiB) as frac_amx_tile_l1_now. The 2 and 4 K block rows (8 and
// 16 KiB) show whether the step runs faster on a smaller footprint than that.
void BM_AmxTileLoop(benchmark::State& state) {
  const int64_t k_blocks = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const int loads = static_cast<int>(state.range(2));
  if (moekit_detected_isa() < MOEKIT_ISA_AMX) {
    state.SkipWithError("skipped: needs amx");
    return;
  }
  double peak = 0, flops = 0;
  for (auto _ : state) {
    peak = moekit_bench::register_peak_flops_now(MOEKIT_ISA_AMX, threads);
    flops = moekit_bench::amx_tile_loop_flops(threads, k_blocks, loads);
  }
  state.counters["FLOP/s"] = flops;
  state.counters["frac_peak"] = flops / peak;
  state.counters["operand_KiB"] = static_cast<double>(k_blocks * 4);
  state.counters["threads"] = threads;
}
BENCHMARK(BM_AmxTileLoop)
    ->ArgNames({"k_blocks", "threads", "loads"})
    ->Args({8, 1, 4})
    ->Args({12, 1, 4})
    ->Args({16, 1, 4})
    ->Args({32, 1, 4})
    ->Args({96, 1, 4})
    ->Args({384, 1, 4})
    ->Args({2, moekit::num_threads(), 4})
    ->Args({4, moekit::num_threads(), 4})
    ->Args({8, moekit::num_threads(), 4})
    ->Args({8, moekit::num_threads(), 3})
    ->Args({8, moekit::num_threads(), 2})
    ->Args({96, moekit::num_threads(), 4})
    ->Args({96, moekit::num_threads(), 2})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// oneDNN matmul dst[M][N] (f32) = src[M][K] (bf16) x weights[K][N] (bf16), the weights
// reordered once into the layout oneDNN prefers (as a packed inference weight would be).
void BM_OnednnMatmulBf16(benchmark::State& state) {
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  const int64_t n = state.range(0);
  const int threads = moekit::num_threads();
  omp_set_num_threads(threads);
  try {
    dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    dnnl::stream stream(engine);
    const dnnl::memory::dims src_dims = {n, n}, wei_dims = {n, n}, dst_dims = {n, n};
    dnnl::memory::desc src_md(src_dims, dt::bf16, tag::ab);
    dnnl::memory::desc wei_any(wei_dims, dt::bf16, tag::any);
    dnnl::memory::desc wei_plain(wei_dims, dt::bf16, tag::ab);
    dnnl::memory::desc dst_md(dst_dims, dt::f32, tag::ab);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_any, dst_md), engine);
    dnnl::memory src(src_md, engine), wei_src(wei_plain, engine), wei(pd.weights_desc(), engine),
        dst(dst_md, engine);
    const auto values = moekit_bench::random_bf16(static_cast<size_t>(n * n), 1);
    std::copy(values.begin(), values.end(), static_cast<uint16_t*>(src.get_data_handle()));
    std::copy(values.begin(), values.end(), static_cast<uint16_t*>(wei_src.get_data_handle()));
    dnnl::reorder(wei_src, wei).execute(stream, wei_src, wei);
    dnnl::matmul matmul(pd);
    const std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
    matmul.execute(stream, args);  // warm-up: JIT and first touch
    stream.wait();
    for (auto _ : state) {
      matmul.execute(stream, args);
      stream.wait();
    }
    state.SetLabel(pd.impl_info_str());
  } catch (const dnnl::error& e) {
    state.SkipWithError((std::string("oneDNN: ") + e.what()).c_str());
    return;
  }
  state.counters["FLOP/s"] = benchmark::Counter(
      2.0 * static_cast<double>(n) * n * n * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}
BENCHMARK(BM_OnednnMatmulBf16)->Arg(4096)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
