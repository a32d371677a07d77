// Shared test helpers: tensor descriptions, random inputs, and iteration over the dispatch
// tables so that every implementation is compared with the reference (and reported skipped
// when this CPU cannot run it).
#ifndef MOEKIT_TESTS_TEST_UTIL_H_
#define MOEKIT_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "dispatch/registry.h"
#include "moekit/moekit.h"
#include "reference/numeric.h"

namespace moekit_test {

// A tensor description over `data`; strides empty = contiguous.
inline moekit_tensor make_tensor(void* data, moekit_dtype dtype, std::initializer_list<int64_t> shape,
                                 std::initializer_list<int64_t> strides = {}) {
  moekit_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int32_t>(shape.size());
  int d = 0;
  for (int64_t s : shape) t.shape[d++] = s;
  d = 0;
  for (int64_t s : strides) t.strides[d++] = s;
  return t;
}

inline std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Small integers in [lo, hi]: products and sums of these are exact in bf16 and f32.
inline std::vector<float> random_ints(size_t n, uint32_t seed, int lo = -4, int hi = 4) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(rng));
  return v;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = moekit::f32_to_bf16(v[i]);
  return out;
}

inline std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = moekit::bf16_to_f32(v[i]);
  return out;
}

// Whether this CPU may run an implementation of `level`.
inline bool cpu_can_run(moekit_isa level) { return level <= moekit_detected_isa(); }

// Index of each implementation of a table, for INSTANTIATE_TEST_SUITE_P.
template <class Args>
std::vector<int> impl_indices(const moekit::ImplList<Args>& impls) {
  std::vector<int> v;
  for (size_t i = 0; i < impls.size(); ++i) v.push_back(static_cast<int>(i));
  return v;
}

// Test-name suffix: the implementation's name.
template <class Args, const moekit::ImplList<Args>& (*Table)()>
std::string impl_test_name(const testing::TestParamInfo<int>& info) {
  return Table()[info.param].name;
}

// Skips the current test when the CPU cannot run `impl`, saying so.
#define MOEKIT_SKIP_IF_CANNOT_RUN(impl)                                                   \
  do {                                                                                      \
    if (!::moekit_test::cpu_can_run((impl).level))                                          \
      GTEST_SKIP() << (impl).name << " needs " << moekit_isa_name((impl).level)             \
                   << ", this CPU has " << moekit_isa_name(moekit_detected_isa());          \
  } while (0)

}  // namespace moekit_test

#endif  // MOEKIT_TESTS_TEST_UTIL_H_
