// Benchmark helpers and the streaming-read ceiling (BM_StreamingRead/threads:N).
#include "bench/bench_util.h"

#include <benchmark/benchmark.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <random>

#include "bench/amx_peak.h"
#include "bench/avx512bf16_peak.h"
#include "bench/avx512fma_peak.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "moekit/moekit.h"
#include "reference/numeric.h"

namespace moekit_bench {

std::vector<float> random_floats(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<uint16_t> random_bf16(size_t n, uint32_t seed, float lo, float hi) {
  std::vector<float> f = random_floats(n, seed, lo, hi);
  std::vector<uint16_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = moekit::f32_to_bf16(f[i]);
  return v;
}

size_t streaming_buffer_bytes() {
  const int64_t l3 = moekit::topology().l3_bytes;
  const size_t floor_bytes = size_t{1} << 30;
  const size_t bytes = std::max(floor_bytes, static_cast<size_t>(std::max<int64_t>(l3, 0)) * 4);
  return bytes >> 20 << 20;  // whole 1 MiB chunks, the unit read_pass splits the buffer in
}

namespace {

struct Buffer {
  moekit::AlignedBytes data;
  size_t bytes = 0;
};

Buffer& probe_buffer() {
  static Buffer b;
  static std::once_flag once;
  std::call_once(once, [] {
    b.bytes = streaming_buffer_bytes();
    b.data = moekit::aligned_alloc_bytes(b.bytes);
    // Touch every page in parallel so first-touch places pages near their readers.
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < static_cast<int64_t>(b.bytes / 4096); ++i)
      std::memset(b.data.get() + i * 4096, static_cast<int>(i & 0x7f), 4096);
  });
  return b;
}

// One pass over the buffer with the widest loads the CPU has (the kernels use them too, and
// narrow loads under-measure the bandwidth); returns a checksum so the reads cannot be removed.
__attribute__((target("avx512f"))) uint64_t read_chunk_avx512(const unsigned char* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
  }
  const __m512i x = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, x);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3] ^ lanes[4] ^ lanes[5] ^ lanes[6] ^ lanes[7];
}

__attribute__((target("avx2"))) uint64_t read_chunk_avx2(const unsigned char* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i + 128 <= n; i += 128) {
    a0 = _mm256_xor_si256(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i x = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), x);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

uint64_t read_chunk_plain(const unsigned char* p, int64_t n) {
  const auto* words = reinterpret_cast<const uint64_t*>(p);
  uint64_t total = 0;
  for (int64_t i = 0; i < n / 8; ++i) total ^= words[i];
  return total;
}

uint64_t read_pass(const Buffer& b, int threads) {
  constexpr int64_t kChunk = int64_t{1} << 20;  // a multiple of every loop's step
  const int64_t chunks = static_cast<int64_t>(b.bytes) / kChunk;
  const moekit_isa level = moekit_detected_isa();
  uint64_t total = 0;
#pragma omp parallel for schedule(static) reduction(^ : total) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    const unsigned char* p = b.data.get() + c * kChunk;
    total ^= level >= MOEKIT_ISA_AVX512 ? read_chunk_avx512(p, kChunk)
             : level >= MOEKIT_ISA_AVX2 ? read_chunk_avx2(p, kChunk)
                                        : read_chunk_plain(p, kChunk);
  }
  return total;
}

// The best rate over `passes` runs of run(), which returns the work it did (FLOP or bytes).
template <class Run>
double best_rate(int passes, Run run) {
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    const double work = run();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, work / s);
  }
  return best;
}

double measure_peak(moekit_isa level, int threads, int passes) {
  double (*loop)(int64_t) = nullptr;
  int64_t rounds = 0;  // per thread and pass: ~10-20 ms
  if (level == MOEKIT_ISA_AMX) {
    loop = amx_bf16_peak_loop;
    rounds = 200000;
  } else if (level == MOEKIT_ISA_AVX512_BF16) {
    loop = avx512bf16_peak_loop;
    rounds = 1000000;
  } else if (level == MOEKIT_ISA_AVX512) {
    loop = avx512fma_peak_loop;
    rounds = 1000000;
  }
  if (loop == nullptr || moekit_detected_isa() < level) return 0.0;
  return best_rate(passes, [&] {
    double flops = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    flops += loop(rounds);
    return flops;
  });
}

double measure_bandwidth(int threads, int passes) {
  Buffer& b = probe_buffer();
  return best_rate(passes, [&] {
    benchmark::DoNotOptimize(read_pass(b, threads));
    return static_cast<double>(b.bytes);
  });
}

}  // namespace

double register_peak_flops(moekit_isa level, int threads) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, double> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({level, threads});
  if (it != cache.end()) return it->second;
  return cache[{level, threads}] = measure_peak(level, threads, 5);
}

double register_peak_flops_now(moekit_isa level, int threads) {
  return measure_peak(level, threads, 3);
}

double streaming_read_bandwidth(int threads) {
  static std::mutex mu;
  static std::map<int, double> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(threads);
  if (it != cache.end()) return it->second;
  return cache[threads] = measure_bandwidth(threads, 5);
}

double streaming_read_bandwidth_now(int threads) { return measure_bandwidth(threads, 3); }

double amx_tile_loop_flops(int threads, int64_t k_blocks, int loads_per_block) {
  if (moekit_detected_isa() < MOEKIT_ISA_AMX) return 0.0;
  // A rows an odd number of cache lines apart (k_blocks even), as the library lays them out.
  const int64_t lda = k_blocks * 32 + 32;
  const size_t a_elems = static_cast<size_t>(32 * lda);
  const size_t b_elems = static_cast<size_t>(2 * k_blocks * 512);
  const std::vector<uint16_t> values = random_bf16(a_elems + b_elems, 3);
  const int64_t repeats = std::max<int64_t>(1, 80000 / k_blocks);  // ~5-10 ms per pass
  // Each thread's own copy, written (and so placed) by that thread and run once to warm it.
  std::vector<moekit::AlignedBytes> a(threads), b(threads);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    a[t] = moekit::aligned_alloc_bytes(a_elems * 2);
    b[t] = moekit::aligned_alloc_bytes(b_elems * 2);
    std::memcpy(a[t].get(), values.data(), a_elems * 2);
    std::memcpy(b[t].get(), values.data() + a_elems, b_elems * 2);
    amx_tile_loop(reinterpret_cast<const uint16_t*>(a[t].get()), lda,
                  reinterpret_cast<const uint16_t*>(b[t].get()), k_blocks, 1, loads_per_block);
  }
  return best_rate(3, [&] {
    double flops = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    {
      const int t = omp_get_thread_num();
      flops += amx_tile_loop(reinterpret_cast<const uint16_t*>(a[t].get()), lda,
                             reinterpret_cast<const uint16_t*>(b[t].get()), k_blocks, repeats,
                             loads_per_block);
    }
    return flops;
  });
}

namespace {

void BM_StreamingRead(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  Buffer& b = probe_buffer();
  for (auto _ : state) benchmark::DoNotOptimize(read_pass(b, threads));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(b.bytes));
  state.counters["threads"] = threads;
}
BENCHMARK(BM_StreamingRead)->Arg(1)->Arg(moekit::num_threads())->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace moekit_bench
