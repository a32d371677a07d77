// RMSNorm family benchmarks: every implementation in the dispatch tables that this CPU can run
// (the reference included) on MiniMax-M2 shapes: rmsnorm over [M, 3072] (hidden), [M, 6144]
// (q) and [M, 1024] (k), fused_add_rmsnorm over [M, 3072], and qk_norm over q [M, 6144] with
// k [M, 1024]; M in {1, 16, 256, 4096}; f32 and bf16 tensors (f32 weights for f32, bf16 for
// bf16). Counters, side by side in one run:
//   bytes_per_second  bytes the op must move (read x and w, write y; read and write in place)
//   bw_frac           bytes_per_second / the streaming-read bandwidth measured by this binary
//   x_ref             the reference's time per call / this implementation's time per call
// M <= 256 runs on hot data (the previous op just wrote it). M = 4096 runs cold: each call
// takes the next of several buffer sets whose footprint is as large as the streaming probe's
// buffer (several times the last-level cache), so the data comes from memory.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "bench/bench_util.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "kernels/rmsnorm/rmsnorm.h"
#include "moekit/moekit.h"
#include "reference/numeric.h"

namespace {

constexpr int64_t kColdRows = 4096;
constexpr int64_t kRowCounts[] = {1, 16, 256, kColdRows};

size_t elem_size(moekit_dtype d) { return d == MOEKIT_BF16 ? 2 : 4; }

// Inputs: bf16 values of magnitude 2^-7 .. 2^-3 with a random sign and mantissa, whose pairs
// read as f32 also lie in that range, so that one buffer serves either dtype.
void fill_inputs(unsigned char* p, size_t bytes) {
  auto* h = reinterpret_cast<uint16_t*>(p);
  const int64_t n = static_cast<int64_t>(bytes / 2);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t z = static_cast<uint32_t>(i) * 2654435761u;
    z ^= z >> 15;
    h[i] = static_cast<uint16_t>(0x3C00u | (z & 0x837Fu));
  }
}

// One memory arena for the cold runs, refilled for each benchmark: outputs an earlier
// benchmark wrote as f32 would read as bf16 NaNs here and send rows down the slow path.
struct Arena {
  moekit::AlignedBytes data;
  size_t bytes = 0;
};

const Arena& fresh_arena() {
  static Arena a;
  static std::once_flag once;
  std::call_once(once, [] {
    a.bytes = moekit_bench::streaming_buffer_bytes();
    a.data = moekit::aligned_alloc_bytes(a.bytes);
  });
  fill_inputs(a.data.get(), a.bytes);
  return a;
}

// Tensors a benchmark cycles through: `sets` groups of `bytes_per_set` bytes each.
class Sets {
 public:
  // Hot: one private set, filled like the arena. Cold: consecutive sets of the arena.
  Sets(size_t bytes_per_set, bool cold) : bytes_(bytes_per_set) {
    if (cold) {
      const Arena& a = fresh_arena();
      count_ = std::max<size_t>(1, a.bytes / bytes_per_set);
      base_ = a.data.get();
    } else {
      own_ = moekit::aligned_alloc_bytes(bytes_per_set);
      fill_inputs(own_.get(), bytes_per_set);
      base_ = own_.get();
      count_ = 1;
    }
  }
  unsigned char* set(size_t i) const { return base_ + (i % count_) * bytes_; }
  size_t count() const { return count_; }

 private:
  size_t bytes_ = 0, count_ = 1;
  unsigned char* base_ = nullptr;
  moekit::AlignedBytes own_;
};

// Weights in [0.5, 1.5] (out of place) or exactly 1 (in place, so that repeated calls on the
// same data stay normalized instead of drifting towards subnormals).
std::vector<unsigned char> make_weight(int64_t width, moekit_dtype d, bool ones) {
  std::vector<float> f =
      ones ? std::vector<float>(width, 1.0f) : moekit_bench::random_floats(width, 7, 0.5f, 1.5f);
  std::vector<unsigned char> out(width * elem_size(d));
  for (int64_t i = 0; i < width; ++i) {
    if (d == MOEKIT_BF16) {
      const uint16_t h = moekit::f32_to_bf16(f[i]);
      std::memcpy(&out[i * 2], &h, 2);
    } else {
      std::memcpy(&out[i * 4], &f[i], 4);
    }
  }
  return out;
}

// A benchmark case: a call on buffer set i, the bytes one call must move, the sets.
struct Case {
  std::function<void(size_t set)> call;
  int64_t bytes = 0;
  std::shared_ptr<Sets> sets;
  std::shared_ptr<std::vector<unsigned char>> w1, w2;
};

Case rmsnorm_case(void (*run)(const moekit::RmsnormArgs&), int64_t rows, int64_t width,
                  moekit_dtype d) {
  Case c;
  const size_t tensor = rows * width * elem_size(d);
  c.sets = std::make_shared<Sets>(2 * tensor, rows >= kColdRows);
  c.w1 = std::make_shared<std::vector<unsigned char>>(make_weight(width, d, false));
  c.bytes = static_cast<int64_t>(2 * tensor + c.w1->size());
  c.call = [=, sets = c.sets.get(), w = c.w1->data()](size_t i) {
    moekit::RmsnormArgs a;
    a.rows = rows;
    a.width = width;
    a.x = sets->set(i);
    a.x_stride = width;
    a.x_dtype = d;
    a.y = sets->set(i) + tensor;
    a.y_stride = width;
    a.y_dtype = d;
    a.w = w;
    a.w_dtype = d;
    run(a);
  };
  return c;
}

Case fused_case(void (*run)(const moekit::RmsnormArgs&), int64_t rows, int64_t width,
                moekit_dtype d) {
  Case c;
  const size_t tensor = rows * width * elem_size(d);
  c.sets = std::make_shared<Sets>(2 * tensor, rows >= kColdRows);
  c.w1 = std::make_shared<std::vector<unsigned char>>(make_weight(width, d, true));
  c.bytes = static_cast<int64_t>(4 * tensor + c.w1->size());  // x, residual: read and write
  c.call = [=, sets = c.sets.get(), w = c.w1->data()](size_t i) {
    moekit::RmsnormArgs a;
    a.rows = rows;
    a.width = width;
    a.x = sets->set(i);
    a.x_stride = width;
    a.x_dtype = d;
    a.y = sets->set(i);
    a.y_stride = width;
    a.y_dtype = d;
    a.w = w;
    a.w_dtype = d;
    a.residual = sets->set(i) + tensor;
    a.residual_stride = width;
    run(a);
  };
  return c;
}

constexpr int64_t kQWidth = 6144, kKWidth = 1024;  // MiniMax-M2: 48 q heads, 8 kv heads of 128

Case qk_case(void (*run)(const moekit::QkNormArgs&), int64_t rows, int64_t, moekit_dtype d) {
  Case c;
  const size_t q_bytes = rows * kQWidth * elem_size(d), k_bytes = rows * kKWidth * elem_size(d);
  c.sets = std::make_shared<Sets>(q_bytes + k_bytes, rows >= kColdRows);
  c.w1 = std::make_shared<std::vector<unsigned char>>(make_weight(kQWidth, d, true));
  c.w2 = std::make_shared<std::vector<unsigned char>>(make_weight(kKWidth, d, true));
  c.bytes = static_cast<int64_t>(2 * (q_bytes + k_bytes) + c.w1->size() + c.w2->size());
  c.call = [=, sets = c.sets.get(), qw = c.w1->data(), kw = c.w2->data()](size_t i) {
    moekit::QkNormArgs a;
    a.mode = moekit::QkNormArgs::Mode::kFull;
    a.tokens = rows;
    a.q = sets->set(i);
    a.q_stride = a.q_width = kQWidth;
    a.q_dtype = d;
    a.k = sets->set(i) + q_bytes;
    a.k_stride = a.k_width = kKWidth;
    a.k_dtype = d;
    a.q_w = qw;
    a.q_w_dtype = d;
    a.k_w = kw;
    a.k_w_dtype = d;
    run(a);
  };
  return c;
}

// Seconds per call of `c`, cycling through its sets (for the x_ref counter).
double seconds_per_call(const Case& c) {
  using clock = std::chrono::steady_clock;
  c.call(0);  // warm-up
  size_t calls = 0;
  const auto t0 = clock::now();
  double elapsed = 0;
  do {
    c.call(++calls);
    elapsed = std::chrono::duration<double>(clock::now() - t0).count();
  } while (elapsed < 0.2 || calls < 3);
  return elapsed / static_cast<double>(calls);
}

template <class Args>
using MakeCase = Case (*)(void (*run)(const Args&), int64_t rows, int64_t width, moekit_dtype d);

template <class Args>
double reference_seconds(const char* op, const moekit::ImplList<Args>& impls, MakeCase<Args> make,
                         int64_t rows, int64_t width, moekit_dtype d) {
  static std::mutex mu;
  static std::map<std::tuple<std::string, int64_t, int64_t, int>, double> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(std::string(op), rows, width, static_cast<int>(d));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  return cache[key] = seconds_per_call(make(impls.back().run, rows, width, d));
}

template <class Args>
void run_benchmark(benchmark::State& state, const char* op, const moekit::ImplList<Args>* impls,
                   size_t index, MakeCase<Args> make, int64_t rows, int64_t width, moekit_dtype d) {
  const moekit::Impl<Args>& impl = (*impls)[index];
  if (impl.level > moekit_detected_isa()) {
    state.SkipWithError((std::string("skipped: needs ") + moekit_isa_name(impl.level) +
                         ", this CPU has " + moekit_isa_name(moekit_detected_isa()))
                            .c_str());
    return;
  }
  const double bandwidth = moekit_bench::streaming_read_bandwidth(moekit::num_threads());
  const double ref_seconds = reference_seconds(op, *impls, make, rows, width, d);
  Case c = make(impl.run, rows, width, d);
  c.call(0);
  size_t i = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) c.call(++i);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double calls = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * c.bytes);
  state.counters["bw_frac"] = calls * static_cast<double>(c.bytes) / seconds / bandwidth;
  state.counters["x_ref"] = calls * ref_seconds / seconds;
  state.counters["threads"] = moekit::num_threads();
  state.counters["sets"] = static_cast<double>(c.sets->count());
}

template <class Args>
void register_op(const char* op, const moekit::ImplList<Args>& impls, MakeCase<Args> make,
                 std::initializer_list<int64_t> widths) {
  for (size_t index = 0; index < impls.size(); ++index)
    for (moekit_dtype d : {MOEKIT_BF16, MOEKIT_F32})
      for (int64_t width : widths)
        for (int64_t rows : kRowCounts) {
          const std::string name = std::string(impls[index].name) + "/" +
                                   (d == MOEKIT_BF16 ? "bf16" : "f32") +
                                   "/M:" + std::to_string(rows) + "/N:" + std::to_string(width);
          benchmark::RegisterBenchmark(name.c_str(), run_benchmark<Args>, op, &impls, index, make,
                                       rows, width, d)
              ->UseRealTime()
              ->Unit(benchmark::kMicrosecond);
        }
}

const int registered = [] {
  register_op<moekit::RmsnormArgs>("rmsnorm", moekit::rmsnorm_impls(), rmsnorm_case,
                                   {3072, 6144, 1024});
  register_op<moekit::RmsnormArgs>("fused_add_rmsnorm", moekit::fused_add_rmsnorm_impls(),
                                   fused_case, {3072});
  register_op<moekit::QkNormArgs>("qk_norm", moekit::qk_norm_impls(), qk_case, {kQWidth + kKWidth});
  return 0;
}();

}  // namespace
