// Benchmark helpers and the streaming-read ceiling (BM_StreamingRead/threads:N).
#include "bench/bench_util.h"

#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <random>

#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
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
  return std::max(floor_bytes, static_cast<size_t>(std::max<int64_t>(l3, 0)) * 4);
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

// One pass over the buffer; returns a checksum so the reads cannot be removed.
uint64_t read_pass(const Buffer& b, int threads) {
  const auto* words = reinterpret_cast<const uint64_t*>(b.data.get());
  const int64_t n = static_cast<int64_t>(b.bytes / 8);
  uint64_t total = 0;
#pragma omp parallel for schedule(static) reduction(^ : total) num_threads(threads)
  for (int64_t i = 0; i < n; i += 8) {
    total ^= words[i] ^ words[i + 1] ^ words[i + 2] ^ words[i + 3] ^ words[i + 4] ^ words[i + 5] ^
             words[i + 6] ^ words[i + 7];
  }
  return total;
}

}  // namespace

double streaming_read_bandwidth(int threads) {
  static std::mutex mu;
  static std::map<int, double> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(threads);
  if (it != cache.end()) return it->second;
  Buffer& b = probe_buffer();
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(read_pass(b, threads));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(b.bytes) / s);
  }
  cache[threads] = best;
  return best;
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
