// RMSNorm family: every implementation in the dispatch tables against the reference (shape
// sweeps, strides, in place, eps, huge and tiny magnitudes, NaN/Inf, every dtype combination,
// tensor-parallel qk_norm), and the C API's refusal of bad arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/rmsnorm/rmsnorm.h"
#include "moekit/moekit.h"
#include "reference/reference.h"
#include "tests/test_util.h"

namespace {

using moekit::Impl;
using moekit::QkNormArgs;
using moekit::RmsnormArgs;

constexpr uint32_t kF32Sentinel = 0x7FC0DEADu;  // a NaN: an unwritten output cannot pass
constexpr uint16_t kBf16Sentinel = 0x7FABu;
constexpr double kF32RelTol = 1e-6;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

const char* dtype_name(moekit_dtype d) { return d == MOEKIT_BF16 ? "bf16" : "f32"; }

// Deterministic noise in [-1, 1) from (seed, row, column), independent of visiting order.
float noise(uint64_t seed, int64_t r, int64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(r) * 0xBF58476D1CE4E5B9ull +
               static_cast<uint64_t>(i) * 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0);
}

using Gen = std::function<float(int64_t r, int64_t i)>;

Gen uniform(uint64_t seed, float scale = 1.0f) {
  return [seed, scale](int64_t r, int64_t i) { return scale * noise(seed, r, i); };
}

// Weights around 1 with spread, as trained norm weights look.
Gen weights(uint64_t seed) {
  return [seed](int64_t, int64_t i) { return 1.0f + 0.5f * noise(seed, 0, i); };
}

// A [rows, width] f32 or bf16 matrix with a row stride; padding and unwritten elements hold a
// NaN sentinel.
class Matrix {
 public:
  Matrix(moekit_dtype dtype, int64_t rows, int64_t width, int64_t stride)
      : dtype_(dtype), rows_(rows), width_(width), stride_(stride) {
    const size_t n = static_cast<size_t>(std::max<int64_t>(1, rows * stride));
    if (dtype == MOEKIT_BF16)
      bf16_.assign(n, kBf16Sentinel);
    else
      f32_.assign(n, kF32Sentinel);
  }
  Matrix(moekit_dtype dtype, int64_t rows, int64_t width, int64_t stride, const Gen& gen)
      : Matrix(dtype, rows, width, stride) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < width; ++i) set(r, i, gen(r, i));
  }

  moekit_dtype dtype() const { return dtype_; }
  int64_t rows() const { return rows_; }
  int64_t width() const { return width_; }
  int64_t stride() const { return stride_; }
  void* data() { return dtype_ == MOEKIT_BF16 ? static_cast<void*>(bf16_.data()) : f32_.data(); }
  // The element at column `col` of row 0: the start of a column slice.
  void* at(int64_t col) {
    return static_cast<char*>(data()) + col * (dtype_ == MOEKIT_BF16 ? 2 : 4);
  }
  size_t storage() const { return dtype_ == MOEKIT_BF16 ? bf16_.size() : f32_.size(); }

  void set(int64_t r, int64_t i, float v) {
    const size_t k = static_cast<size_t>(r * stride_ + i);
    if (dtype_ == MOEKIT_BF16)
      bf16_[k] = moekit::f32_to_bf16(v);
    else
      std::memcpy(&f32_[k], &v, 4);
  }
  float get_flat(size_t k) const {
    if (dtype_ == MOEKIT_BF16) return moekit::bf16_to_f32(bf16_[k]);
    float v;
    std::memcpy(&v, &f32_[k], 4);
    return v;
  }
  uint32_t bits_flat(size_t k) const { return dtype_ == MOEKIT_BF16 ? bf16_[k] : f32_[k]; }
  uint32_t sentinel() const { return dtype_ == MOEKIT_BF16 ? kBf16Sentinel : kF32Sentinel; }

 private:
  moekit_dtype dtype_;
  int64_t rows_, width_, stride_;
  std::vector<uint32_t> f32_;
  std::vector<uint16_t> bf16_;
};

// bf16 bits as a monotonic integer, so that neighbours differ by one.
int32_t ordered_bf16(uint32_t bits) {
  return (bits & 0x8000u) ? -static_cast<int32_t>(bits & 0x7FFFu) : static_cast<int32_t>(bits);
}

struct Agreement {
  int64_t mismatches = 0;
  int64_t exact = 0;
  int64_t compared = 0;
};

// Compares `got` with `want` element by element: NaN where the reference has NaN, equal
// infinities, f32 within kF32RelTol, bf16 within `bf16_ulps` units in the last place
// (bf16_ulps == 0: every element bit for bit); padding must still hold the sentinel. Reports the
// first few differences.
Agreement compare(const Matrix& got, const Matrix& want, const std::string& what,
                  int bf16_ulps = 1) {
  Agreement a;
  int reported = 0;
  for (size_t k = 0; k < got.storage(); ++k) {
    const int64_t r = static_cast<int64_t>(k) / got.stride();
    const int64_t i = static_cast<int64_t>(k) % got.stride();
    bool ok;
    const float g = got.get_flat(k), w = want.get_flat(k);
    if (r >= got.rows() || i >= got.width() || bf16_ulps == 0) {
      ok = got.bits_flat(k) == want.bits_flat(k);
      if (r < got.rows() && i < got.width()) {
        ++a.compared;
        a.exact += ok;
      }
    } else {
      ++a.compared;
      if (got.bits_flat(k) == want.bits_flat(k)) ++a.exact;
      if (std::isnan(w)) {
        ok = std::isnan(g);
      } else if (std::isinf(w) || std::isnan(g)) {
        ok = g == w;
      } else if (got.dtype() == MOEKIT_BF16) {
        ok =
            std::abs(ordered_bf16(got.bits_flat(k)) - ordered_bf16(want.bits_flat(k))) <= bf16_ulps;
      } else {
        ok = std::abs(static_cast<double>(g) - w) <= kF32RelTol * std::abs(static_cast<double>(w));
      }
    }
    if (!ok) {
      ++a.mismatches;
      if (reported++ < 5)
        ADD_FAILURE() << what << ": row " << r << " col " << i << " got " << g << " (0x" << std::hex
                      << got.bits_flat(k) << ") want " << w << " (0x" << want.bits_flat(k)
                      << std::dec << ")";
    }
  }
  EXPECT_EQ(a.mismatches, 0) << what;
  return a;
}

std::string describe(const char* op, int64_t rows, int64_t width,
                     std::initializer_list<moekit_dtype> dtypes, float eps) {
  std::ostringstream s;
  s << op << " rows=" << rows << " width=" << width << " dtypes=";
  for (moekit_dtype d : dtypes) s << dtype_name(d) << "/";
  s << " eps=" << eps;
  return s.str();
}

constexpr moekit_dtype kDtypes[] = {MOEKIT_F32, MOEKIT_BF16};
const std::vector<int64_t> kWidths = {1, 7, 31, 64, 1024, 3072, 4096 + 13, 6144};

// Fixture base: tracks how many bf16 outputs of a test agree with the reference to the last
// bit. One-ulp differences (f32 vs double rounding) must stay rare: a kernel that truncates
// instead of rounding would still be within one ulp everywhere.
class AgreementTracking : public testing::TestWithParam<int> {
 protected:
  void Track(const Agreement& a, moekit_dtype out) {
    if (out != MOEKIT_BF16) return;
    bf16_.exact += a.exact;
    bf16_.compared += a.compared;
  }
  void TearDown() override {
    if (bf16_.compared < kMinSample) return;
    const double fraction = static_cast<double>(bf16_.exact) / static_cast<double>(bf16_.compared);
    EXPECT_GE(fraction, kMinExactFraction)
        << bf16_.compared << " bf16 outputs, " << bf16_.exact << " bit-identical";
  }

 private:
  static constexpr int64_t kMinSample = 10000;
  static constexpr double kMinExactFraction = 0.999;
  Agreement bf16_;
};

// ---- rmsnorm ------------------------------------------------------------------------------

struct RmsCase {
  int64_t rows = 1, width = 1;
  moekit_dtype x = MOEKIT_F32, y = MOEKIT_F32, w = MOEKIT_F32;
  float eps = 1e-6f;
  int64_t x_pad = 0, y_pad = 0;
  bool in_place = false;
  Gen x_gen = uniform(1, 2.0f);
  Gen w_gen = weights(2);
};

class RmsnormTest : public AgreementTracking {
 protected:
  const Impl<RmsnormArgs>& impl() const { return moekit::rmsnorm_impls()[GetParam()]; }

  // Runs impl() and the reference on the same inputs and compares; returns the agreement.
  Agreement Check(const RmsCase& c) {
    const std::string what = std::string(impl().name) + " " +
                             describe("rmsnorm", c.rows, c.width, {c.x, c.y, c.w}, c.eps) +
                             (c.in_place ? " in place" : "") + " pads " + std::to_string(c.x_pad) +
                             "/" + std::to_string(c.y_pad);
    const Matrix x(c.x, c.rows, c.width, c.width + c.x_pad, c.x_gen);
    const Matrix w(c.w, 1, c.width, c.width, c.w_gen);
    const moekit_dtype y_dtype = c.in_place ? c.x : c.y;
    const int64_t y_stride = c.in_place ? c.width + c.x_pad : c.width + c.y_pad;
    Matrix x_got = x, x_want = x, w_copy = w;
    Matrix y_got = c.in_place ? x : Matrix(y_dtype, c.rows, c.width, y_stride);
    Matrix y_want = y_got;
    auto args = [&](Matrix& xm, Matrix& ym) {
      RmsnormArgs a;
      a.rows = c.rows;
      a.width = c.width;
      a.x = c.in_place ? ym.data() : xm.data();
      a.x_stride = xm.stride();
      a.x_dtype = c.x;
      a.y = ym.data();
      a.y_stride = ym.stride();
      a.y_dtype = y_dtype;
      a.w = w_copy.data();
      a.w_dtype = c.w;
      a.eps = c.eps;
      return a;
    };
    impl().run(args(x_got, y_got));
    moekit::ref_rmsnorm(args(x_want, y_want));
    if (!c.in_place) compare(x_got, x, what + " (x must be unchanged)", 0);
    compare(w_copy, w, what + " (w must be unchanged)", 0);
    const Agreement a = compare(y_got, y_want, what);
    Track(a, y_dtype);
    return a;
  }
};

TEST_P(RmsnormTest, WidthRowsDtypeSweep) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (int64_t width : kWidths)
    for (int64_t rows : {1, 3, 64})
      for (moekit_dtype x : kDtypes)
        for (moekit_dtype y : kDtypes)
          for (moekit_dtype w : kDtypes) {
            RmsCase c;
            c.rows = rows;
            c.width = width;
            c.x = x;
            c.y = y;
            c.w = w;
            c.x_gen = uniform(rows * 131 + width, 3.0f);
            Check(c);
          }
}

TEST_P(RmsnormTest, ManyRows) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const struct {
    int64_t width;
    moekit_dtype x, y, w;
  } cases[] = {
      {3072, MOEKIT_BF16, MOEKIT_BF16, MOEKIT_BF16}, {3072, MOEKIT_F32, MOEKIT_F32, MOEKIT_F32},
      {3072, MOEKIT_BF16, MOEKIT_F32, MOEKIT_F32},   {1024, MOEKIT_BF16, MOEKIT_BF16, MOEKIT_F32},
      {6144, MOEKIT_BF16, MOEKIT_BF16, MOEKIT_BF16},
  };
  for (const auto& k : cases) {
    RmsCase c;
    c.rows = 1000;
    c.width = k.width;
    c.x = k.x;
    c.y = k.y;
    c.w = k.w;
    Check(c);
  }
}

// Outputs of 8 MiB and more (the kernels' default kLargeTensorBytes) are written with streaming
// stores from the first vector-aligned element of each row, and the next row's input is
// prefetched: odd paddings start rows at every alignment, odd widths leave tails, and NaN/Inf
// weight columns go through the bf16 pairs' rounding.
TEST_P(RmsnormTest, LargeOutputsWithStreamingStores) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const struct {
    int64_t rows, width;
    moekit_dtype x, y, w;
    bool bad_weight;
  } cases[] = {
      {683, 6147, MOEKIT_BF16, MOEKIT_BF16, MOEKIT_BF16, false},
      {683, 6147, MOEKIT_BF16, MOEKIT_BF16, MOEKIT_BF16, true},
      {410, 5125, MOEKIT_F32, MOEKIT_F32, MOEKIT_F32, false},
      {410, 5125, MOEKIT_BF16, MOEKIT_F32, MOEKIT_BF16, true},
  };
  for (const auto& k : cases) {
    ASSERT_GE(k.rows * k.width * (k.y == MOEKIT_BF16 ? 2 : 4), int64_t{8} << 20);
    RmsCase c;
    c.rows = k.rows;
    c.width = k.width;
    c.x = k.x;
    c.y = k.y;
    c.w = k.w;
    c.x_pad = 1;
    c.y_pad = 3;
    if (k.bad_weight)
      c.w_gen = [](int64_t, int64_t i) { return i == 100 ? kNaN : i == 1000 ? -kInf : 0.75f; };
    Check(c);
  }
}

TEST_P(RmsnormTest, StridedAndInPlace) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (int64_t width : {7, 64, 3072, 4096 + 13})
    for (moekit_dtype x : kDtypes)
      for (moekit_dtype y : kDtypes) {
        RmsCase c;
        c.rows = 5;
        c.width = width;
        c.x = x;
        c.y = y;
        c.w = x;
        c.x_pad = 5;
        c.y_pad = 3;
        Check(c);
        c.in_place = true;
        Check(c);
        c.x_pad = 0;
        c.rows = 70;
        Check(c);
      }
}

TEST_P(RmsnormTest, EpsVariants) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (float eps : {0.0f, 1e-6f, 1e-5f, 0.1f, 10.0f})
    for (moekit_dtype d : kDtypes) {
      RmsCase c;
      c.rows = 4;
      c.width = 3072;
      c.x = c.y = c.w = d;
      c.eps = eps;
      c.x_gen = uniform(7, 0.01f);  // small values so that eps matters
      Check(c);
    }
}

TEST_P(RmsnormTest, HugeAndTinyMagnitudes) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  struct Magnitude {
    float scale, eps;
  };
  // 1e4 in bf16 (squares ~1e8), past the f32 square overflow (1e20, 1e30), and tiny values
  // whose squares are subnormal or vanish in f32, with and without eps.
  for (Magnitude m : {Magnitude{1e4f, 1e-6f}, Magnitude{3e4f, 0.0f}, Magnitude{1e20f, 1e-6f},
                      Magnitude{1e30f, 0.0f}, Magnitude{1e-20f, 1e-6f}, Magnitude{1e-20f, 0.0f},
                      Magnitude{1e-30f, 0.0f}, Magnitude{1e-3f, 0.0f}})
    for (moekit_dtype x : kDtypes)
      for (moekit_dtype y : kDtypes) {
        RmsCase c;
        c.rows = 3;
        c.width = 3072 + 5;
        c.x = x;
        c.y = y;
        c.w = MOEKIT_BF16;
        c.eps = m.eps;
        c.x_gen = uniform(11, m.scale);
        Check(c);
      }
  // Rows of zeros and of one repeated value.
  for (moekit_dtype d : kDtypes)
    for (float eps : {0.0f, 1e-6f}) {
      RmsCase c;
      c.rows = 2;
      c.width = 100;
      c.x = c.y = c.w = d;
      c.eps = eps;
      c.x_gen = [](int64_t r, int64_t) { return r == 0 ? 0.0f : -3.5f; };
      Check(c);
    }
}

TEST_P(RmsnormTest, NanAndInfPropagate) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (moekit_dtype x : kDtypes)
    for (moekit_dtype y : kDtypes) {
      RmsCase c;
      c.rows = 6;
      c.width = 1000;
      c.x = x;
      c.y = y;
      c.w = x;
      const Gen base = uniform(5);
      c.x_gen = [base](int64_t r, int64_t i) {
        if (r == 0 && i == 17) return kNaN;
        if (r == 1 && i == 0) return kInf;
        if (r == 2 && i == 999) return -kInf;
        if (r == 3 && (i == 3 || i == 500)) return i == 3 ? kInf : -kInf;
        return base(r, i);
      };
      Check(c);
      // NaN and Inf in the weight poison only their columns.
      c.x_gen = base;
      c.w_gen = [](int64_t, int64_t i) { return i == 3 ? kNaN : i == 40 ? kInf : 1.25f; };
      const Agreement a = Check(c);
      EXPECT_GT(a.exact, 0);
    }
}

// Rows are independent: the result must not depend on how rows are split among threads.
TEST_P(RmsnormTest, SameBitsOnOneAndTwoThreads) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const int64_t rows = 301, width = 1024;
  const Matrix x(MOEKIT_BF16, rows, width, width, uniform(71, 4.0f));
  const Matrix w(MOEKIT_F32, 1, width, width, weights(72));
  Matrix x_in = x, w_in = w, y1(MOEKIT_BF16, rows, width, width), y2 = y1;
  RmsnormArgs a;
  a.rows = rows;
  a.width = width;
  a.x = x_in.data();
  a.x_stride = width;
  a.x_dtype = MOEKIT_BF16;
  a.y_stride = width;
  a.y_dtype = MOEKIT_BF16;
  a.w = w_in.data();
  a.w_dtype = MOEKIT_F32;
  const int saved = moekit_num_threads();
  ASSERT_EQ(moekit_set_num_threads(1), MOEKIT_OK);
  a.y = y1.data();
  impl().run(a);
  ASSERT_EQ(moekit_set_num_threads(2), MOEKIT_OK);
  a.y = y2.data();
  impl().run(a);
  ASSERT_EQ(moekit_set_num_threads(saved), MOEKIT_OK);
  compare(y2, y1, std::string(impl().name) + " 2 threads vs 1", 0);
}

INSTANTIATE_TEST_SUITE_P(Impls, RmsnormTest,
                         testing::ValuesIn(moekit_test::impl_indices(moekit::rmsnorm_impls())),
                         (moekit_test::impl_test_name<RmsnormArgs, moekit::rmsnorm_impls>));

// ---- fused_add_rmsnorm --------------------------------------------------------------------

struct FusedCase {
  int64_t rows = 1, width = 1;
  moekit_dtype x = MOEKIT_F32, w = MOEKIT_F32;
  float eps = 1e-6f;
  int64_t x_pad = 0, res_pad = 0;
  Gen x_gen = uniform(21, 2.0f);
  Gen res_gen = uniform(22, 2.0f);
  Gen w_gen = weights(23);
};

class FusedAddRmsnormTest : public AgreementTracking {
 protected:
  const Impl<RmsnormArgs>& impl() const { return moekit::fused_add_rmsnorm_impls()[GetParam()]; }

  void Check(const FusedCase& c) {
    const std::string what = std::string(impl().name) + " " +
                             describe("fused_add_rmsnorm", c.rows, c.width, {c.x, c.w}, c.eps) +
                             " pads " + std::to_string(c.x_pad) + "/" + std::to_string(c.res_pad);
    const Matrix x(c.x, c.rows, c.width, c.width + c.x_pad, c.x_gen);
    const Matrix res(c.x, c.rows, c.width, c.width + c.res_pad, c.res_gen);
    const Matrix w(c.w, 1, c.width, c.width, c.w_gen);
    Matrix x_got = x, x_want = x, res_got = res, res_want = res, w_copy = w;
    auto args = [&](Matrix& xm, Matrix& rm) {
      RmsnormArgs a;
      a.rows = c.rows;
      a.width = c.width;
      a.x = xm.data();
      a.x_stride = xm.stride();
      a.x_dtype = c.x;
      a.y = xm.data();
      a.y_stride = xm.stride();
      a.y_dtype = c.x;
      a.w = w_copy.data();
      a.w_dtype = c.w;
      a.eps = c.eps;
      a.residual = rm.data();
      a.residual_stride = rm.stride();
      return a;
    };
    impl().run(args(x_got, res_got));
    moekit::ref_fused_add_rmsnorm(args(x_want, res_want));
    compare(res_got, res_want, what + " (residual, exact)", 0);
    Track(compare(x_got, x_want, what + " (x)"), c.x);
  }
};

TEST_P(FusedAddRmsnormTest, WidthRowsDtypeSweep) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (int64_t width : kWidths)
    for (int64_t rows : {1, 3, 64})
      for (moekit_dtype x : kDtypes)
        for (moekit_dtype w : kDtypes) {
          FusedCase c;
          c.rows = rows;
          c.width = width;
          c.x = x;
          c.w = w;
          Check(c);
        }
}

TEST_P(FusedAddRmsnormTest, ManyRowsStridesEps) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (moekit_dtype x : kDtypes) {
    FusedCase c;
    c.rows = 1000;
    c.width = 3072;
    c.x = x;
    c.w = MOEKIT_BF16;
    Check(c);
    c.rows = 9;
    c.width = 4096 + 13;
    c.x_pad = 7;
    c.res_pad = 2;
    for (float eps : {0.0f, 1e-6f, 1.0f}) {
      c.eps = eps;
      Check(c);
    }
  }
}

TEST_P(FusedAddRmsnormTest, MagnitudesNanInf) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (moekit_dtype x : kDtypes) {
    for (float scale : {1e4f, 1e20f, 1e-20f}) {
      FusedCase c;
      c.rows = 3;
      c.width = 3072;
      c.x = x;
      c.eps = scale < 1.0f ? 0.0f : 1e-6f;
      c.x_gen = uniform(31, scale);
      c.res_gen = uniform(32, scale);
      Check(c);
    }
    FusedCase c;
    c.rows = 4;
    c.width = 777;
    c.x = x;
    const Gen base = uniform(33);
    c.x_gen = [base](int64_t r, int64_t i) {
      return r == 0 && i == 5 ? kNaN : r == 1 && i == 776 ? kInf : base(r, i);
    };
    c.res_gen = [base](int64_t r, int64_t i) {
      return r == 2 && i == 0 ? -kInf : r == 1 && i == 776 ? -kInf : base(r + 7, i);
    };
    Check(c);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Impls, FusedAddRmsnormTest,
    testing::ValuesIn(moekit_test::impl_indices(moekit::fused_add_rmsnorm_impls())),
    (moekit_test::impl_test_name<RmsnormArgs, moekit::fused_add_rmsnorm_impls>));

// ---- qk_norm ------------------------------------------------------------------------------

struct QkCase {
  int64_t tokens = 1, q_width = 1, k_width = 1;
  moekit_dtype q = MOEKIT_F32, k = MOEKIT_F32, q_w = MOEKIT_F32, k_w = MOEKIT_F32;
  float eps = 1e-6f;
  int64_t pad = 0;
  Gen q_gen = uniform(41, 2.0f);
  Gen k_gen = uniform(42, 2.0f);
};

class QkNormTest : public AgreementTracking {
 protected:
  const Impl<QkNormArgs>& impl() const { return moekit::qk_norm_impls()[GetParam()]; }

  static QkNormArgs Args(QkNormArgs::Mode mode, int64_t tokens, Matrix& q, int64_t q_col,
                         int64_t q_width, Matrix& k, int64_t k_col, int64_t k_width, float eps) {
    QkNormArgs a;
    a.mode = mode;
    a.tokens = tokens;
    a.q = q.at(q_col);
    a.q_stride = q.stride();
    a.q_width = q_width;
    a.q_dtype = q.dtype();
    a.k = k.at(k_col);
    a.k_stride = k.stride();
    a.k_width = k_width;
    a.k_dtype = k.dtype();
    a.eps = eps;
    return a;
  }

  // Full, partial-sumsq and apply (from the reference's sums) against the reference.
  void Check(const QkCase& c) {
    const std::string what =
        std::string(impl().name) + " " +
        describe("qk_norm", c.tokens, c.q_width, {c.q, c.k, c.q_w, c.k_w}, c.eps) +
        " k_width=" + std::to_string(c.k_width) + " pad=" + std::to_string(c.pad);
    const Matrix q(c.q, c.tokens, c.q_width, c.q_width + c.pad, c.q_gen);
    const Matrix k(c.k, c.tokens, c.k_width, c.k_width + c.pad, c.k_gen);
    Matrix q_w(c.q_w, 1, c.q_width, c.q_width, weights(43));
    Matrix k_w(c.k_w, 1, c.k_width, c.k_width, weights(44));
    auto with_weights = [&](QkNormArgs a) {
      a.q_w = q_w.data();
      a.q_w_dtype = c.q_w;
      a.k_w = k_w.data();
      a.k_w_dtype = c.k_w;
      return a;
    };
    using Mode = QkNormArgs::Mode;
    {
      Matrix q_got = q, q_want = q, k_got = k, k_want = k;
      impl().run(with_weights(
          Args(Mode::kFull, c.tokens, q_got, 0, c.q_width, k_got, 0, c.k_width, c.eps)));
      moekit::ref_qk_norm(with_weights(
          Args(Mode::kFull, c.tokens, q_want, 0, c.q_width, k_want, 0, c.k_width, c.eps)));
      Track(compare(q_got, q_want, what + " full q"), c.q);
      Track(compare(k_got, k_want, what + " full k"), c.k);
    }
    std::vector<float> q_ss(c.tokens, kNaN), k_ss(c.tokens, kNaN);
    {
      Matrix q_in = q, k_in = k;
      std::vector<float> q_got(c.tokens, kNaN), k_got(c.tokens, kNaN);
      QkNormArgs a =
          Args(Mode::kPartialSumsq, c.tokens, q_in, 0, c.q_width, k_in, 0, c.k_width, c.eps);
      a.q_sumsq = q_got.data();
      a.k_sumsq = k_got.data();
      impl().run(a);
      a.q_sumsq = q_ss.data();
      a.k_sumsq = k_ss.data();
      moekit::ref_qk_norm(a);
      compare(q_in, q, what + " partial leaves q", 0);
      compare(k_in, k, what + " partial leaves k", 0);
      for (int64_t t = 0; t < c.tokens; ++t) {
        for (auto [got, want] : {std::pair{q_got[t], q_ss[t]}, std::pair{k_got[t], k_ss[t]}}) {
          if (std::isnan(want) || std::isinf(want))
            EXPECT_TRUE(got == want || (std::isnan(got) && std::isnan(want)))
                << what << " partial token " << t << ": " << got << " vs " << want;
          else
            EXPECT_NEAR(got, want, kF32RelTol * want) << what << " partial token " << t;
        }
      }
    }
    {
      Matrix q_got = q, q_want = q, k_got = k, k_want = k;
      const int64_t q_global = c.q_width * 2 + 1, k_global = c.k_width * 3;  // any >= width
      QkNormArgs a = with_weights(
          Args(Mode::kApply, c.tokens, q_got, 0, c.q_width, k_got, 0, c.k_width, c.eps));
      a.q_sumsq = q_ss.data();
      a.k_sumsq = k_ss.data();
      a.q_global_width = q_global;
      a.k_global_width = k_global;
      impl().run(a);
      a.q = q_want.data();
      a.k = k_want.data();
      moekit::ref_qk_norm(a);
      Track(compare(q_got, q_want, what + " apply q"), c.q);
      Track(compare(k_got, k_want, what + " apply k"), c.k);
    }
  }

  // Tensor parallelism over `world` ranks: each rank holds a column slice of q (heads split
  // evenly) and of k (moekit_qk_norm_kv_weight_slice: split, or replicated when kv heads are
  // fewer than ranks); partial sums are all-reduced (each distinct kv head counted once) and
  // applied with the global widths. Every rank's slice must match the full qk_norm.
  void CheckTensorParallel(int64_t world, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                           moekit_dtype dtype, moekit_dtype w_dtype) {
    const std::string what = std::string(impl().name) + " tp world=" + std::to_string(world) +
                             " kv_heads=" + std::to_string(kv_heads) + " " + dtype_name(dtype) +
                             "/" + dtype_name(w_dtype);
    const int64_t tokens = 5, q_width = q_heads * head_dim, k_width = kv_heads * head_dim;
    const float eps = 1e-6f;
    const Matrix q(dtype, tokens, q_width, q_width + 3, uniform(51, 3.0f));
    const Matrix k(dtype, tokens, k_width, k_width + 1, uniform(52, 3.0f));
    Matrix q_w(w_dtype, 1, q_width, q_width, weights(53));
    Matrix k_w(w_dtype, 1, k_width, k_width, weights(54));

    using Mode = QkNormArgs::Mode;
    Matrix q_full = q, k_full = k;
    QkNormArgs full = Args(Mode::kFull, tokens, q_full, 0, q_width, k_full, 0, k_width, eps);
    full.q_w = q_w.data();
    full.q_w_dtype = w_dtype;
    full.k_w = k_w.data();
    full.k_w_dtype = w_dtype;
    moekit::ref_qk_norm(full);

    std::vector<Matrix> q_rank(world, q), k_rank(world, k);
    std::vector<int64_t> k_begin(world), k_len(world);
    const int64_t q_len = q_width / world;
    std::vector<float> q_sum(tokens, 0.0f), k_sum(tokens, 0.0f);
    for (int64_t r = 0; r < world; ++r) {
      ASSERT_EQ(
          moekit_qk_norm_kv_weight_slice(kv_heads, head_dim, r, world, &k_begin[r], &k_len[r]),
          MOEKIT_OK);
      std::vector<float> q_part(tokens, kNaN), k_part(tokens, kNaN);
      QkNormArgs a = Args(Mode::kPartialSumsq, tokens, q_rank[r], r * q_len, q_len, k_rank[r],
                          k_begin[r], k_len[r], eps);
      a.q_sumsq = q_part.data();
      a.k_sumsq = k_part.data();
      impl().run(a);
      const bool counts_k = kv_heads >= world || r % (world / kv_heads) == 0;
      for (int64_t t = 0; t < tokens; ++t) {
        q_sum[t] += q_part[t];
        if (counts_k) k_sum[t] += k_part[t];
      }
    }
    for (int64_t r = 0; r < world; ++r) {
      QkNormArgs a = Args(Mode::kApply, tokens, q_rank[r], r * q_len, q_len, k_rank[r], k_begin[r],
                          k_len[r], eps);
      a.q_sumsq = q_sum.data();
      a.k_sumsq = k_sum.data();
      a.q_global_width = q_width;
      a.k_global_width = k_width;
      a.q_w = q_w.at(r * q_len);
      a.q_w_dtype = w_dtype;
      a.k_w = k_w.at(k_begin[r]);
      a.k_w_dtype = w_dtype;
      impl().run(a);
      // This rank's slice must match the full result; the rest must be untouched.
      Matrix q_expect = q, k_expect = k;
      for (int64_t t = 0; t < tokens; ++t) {
        const size_t qo = static_cast<size_t>(t * q.stride() + r * q_len);
        const size_t ko = static_cast<size_t>(t * k.stride() + k_begin[r]);
        const size_t qe = dtype == MOEKIT_BF16 ? 2 : 4;
        std::memcpy(static_cast<char*>(q_expect.data()) + qo * qe,
                    static_cast<char*>(q_full.data()) + qo * qe, q_len * qe);
        std::memcpy(static_cast<char*>(k_expect.data()) + ko * qe,
                    static_cast<char*>(k_full.data()) + ko * qe, k_len[r] * qe);
      }
      compare(q_rank[r], q_expect, what + " rank " + std::to_string(r) + " q");
      compare(k_rank[r], k_expect, what + " rank " + std::to_string(r) + " k");
    }
  }
};

TEST_P(QkNormTest, WidthTokensDtypeSweep) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const struct {
    int64_t q_width, k_width;
  } widths[] = {{6144, 1024}, {3072, 1024}, {4096 + 13, 31}, {64, 7}, {1, 1}};
  for (const auto& wd : widths)
    for (int64_t tokens : {1, 3, 64})
      for (moekit_dtype q : kDtypes)
        for (moekit_dtype k : kDtypes) {
          QkCase c;
          c.tokens = tokens;
          c.q_width = wd.q_width;
          c.k_width = wd.k_width;
          c.q = q;
          c.k = k;
          c.q_w = k;  // every weight dtype against every q/k dtype across the loop
          c.k_w = q;
          Check(c);
        }
}

TEST_P(QkNormTest, ManyTokensStridesEpsMagnitudes) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  QkCase c;
  c.tokens = 1000;
  c.q_width = 6144;
  c.k_width = 1024;
  c.q = c.k = c.q_w = c.k_w = MOEKIT_BF16;
  Check(c);
  c.tokens = 7;
  c.pad = 9;
  for (moekit_dtype d : kDtypes)
    for (float eps : {0.0f, 1e-5f})
      for (float scale : {1e-20f, 1.0f, 1e4f, 1e20f}) {
        c.q = c.k = d;
        c.eps = eps;
        c.q_gen = uniform(61, scale);
        c.k_gen = uniform(62, scale);
        Check(c);
      }
  c.q_gen = [](int64_t r, int64_t i) { return r == 1 && i == 9 ? kNaN : 0.5f; };
  c.k_gen = [](int64_t r, int64_t i) { return r == 2 && i == 0 ? -kInf : -0.25f; };
  Check(c);
}

TEST_P(QkNormTest, TensorParallelSplit) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (moekit_dtype d : kDtypes) {
    // MiniMax-M2: 48 q heads, 8 kv heads of 128.
    CheckTensorParallel(2, 48, 8, 128, d, MOEKIT_BF16);
    CheckTensorParallel(4, 48, 8, 128, d, MOEKIT_F32);
    // Fewer kv heads than ranks: replicated k slices.
    CheckTensorParallel(4, 8, 2, 64, d, MOEKIT_BF16);
    CheckTensorParallel(2, 4, 1, 96, d, MOEKIT_F32);
  }
}

INSTANTIATE_TEST_SUITE_P(Impls, QkNormTest,
                         testing::ValuesIn(moekit_test::impl_indices(moekit::qk_norm_impls())),
                         (moekit_test::impl_test_name<QkNormArgs, moekit::qk_norm_impls>));

// ---- dispatch and the C API -----------------------------------------------------------------

TEST(RmsnormTables, ReferenceIsLastAndAcceptsEverything) {
  EXPECT_STREQ(moekit::rmsnorm_impls().back().name, "ref_rmsnorm");
  EXPECT_STREQ(moekit::fused_add_rmsnorm_impls().back().name, "ref_fused_add_rmsnorm");
  EXPECT_STREQ(moekit::qk_norm_impls().back().name, "ref_qk_norm");
  EXPECT_EQ(moekit::rmsnorm_impls().back().supports, nullptr);
}

TEST(RmsnormCApi, ChoosesTheBestImplementationTheCpuRuns) {
  std::vector<float> x(2 * 64, 1.5f), y(2 * 64, kNaN), w(64, 2.0f);
  moekit_tensor xt = moekit_test::make_tensor(x.data(), MOEKIT_F32, {2, 64});
  moekit_tensor yt = moekit_test::make_tensor(y.data(), MOEKIT_F32, {2, 64});
  moekit_tensor wt = moekit_test::make_tensor(w.data(), MOEKIT_F32, {64});
  ASSERT_EQ(moekit_rmsnorm(&xt, &wt, 0.0f, &yt), MOEKIT_OK) << moekit_last_error();
  for (float v : y) EXPECT_FLOAT_EQ(v, 2.0f);
  std::string expected;
  for (const auto& impl : moekit::rmsnorm_impls())
    if (impl.level <= moekit_effective_isa()) {
      expected = impl.name;
      break;
    }
  EXPECT_EQ(moekit_last_impl("rmsnorm"), expected);
}

// Every bad call must fail with a message and leave every output exactly as it was.
class RmsnormCApiErrors : public testing::Test {
 protected:
  static constexpr int64_t kRows = 3, kWidth = 16;
  std::vector<float> x = std::vector<float>(kRows * kWidth, 1.0f);
  std::vector<float> y = std::vector<float>(kRows * kWidth, -7.0f);
  std::vector<float> res = std::vector<float>(kRows * kWidth, 0.5f);
  std::vector<float> w = std::vector<float>(kWidth, 1.0f);
  std::vector<float> k = std::vector<float>(kRows * 8, 2.0f);
  std::vector<float> k_w = std::vector<float>(8, 1.0f);
  std::vector<float> sums = std::vector<float>(kRows, -9.0f), sums2 = sums;

  moekit_tensor xt = moekit_test::make_tensor(x.data(), MOEKIT_F32, {kRows, kWidth});
  moekit_tensor yt = moekit_test::make_tensor(y.data(), MOEKIT_F32, {kRows, kWidth});
  moekit_tensor rt = moekit_test::make_tensor(res.data(), MOEKIT_F32, {kRows, kWidth});
  moekit_tensor wt = moekit_test::make_tensor(w.data(), MOEKIT_F32, {kWidth});
  moekit_tensor kt = moekit_test::make_tensor(k.data(), MOEKIT_F32, {kRows, 8});
  moekit_tensor kwt = moekit_test::make_tensor(k_w.data(), MOEKIT_F32, {8});
  moekit_tensor st = moekit_test::make_tensor(sums.data(), MOEKIT_F32, {kRows});
  moekit_tensor st2 = moekit_test::make_tensor(sums2.data(), MOEKIT_F32, {kRows});

  std::vector<std::vector<float>> Snapshot() const { return {x, y, res, w, k, k_w, sums, sums2}; }

  void ExpectRefused(moekit_status s, const std::vector<std::vector<float>>& before,
                     const char* what) {
    EXPECT_NE(s, MOEKIT_OK) << what;
    EXPECT_STRNE(moekit_last_error(), "") << what;
    const std::vector<std::vector<float>> after = Snapshot();
    for (size_t b = 0; b < before.size(); ++b)
      EXPECT_EQ(std::memcmp(before[b].data(), after[b].data(), before[b].size() * 4), 0)
          << what << ": buffer " << b << " was written";
  }
};

TEST_F(RmsnormCApiErrors, Rmsnorm) {
  const auto before = Snapshot();
  ExpectRefused(moekit_rmsnorm(nullptr, &wt, 1e-6f, &yt), before, "null x");
  ExpectRefused(moekit_rmsnorm(&xt, nullptr, 1e-6f, &yt), before, "null weight");
  ExpectRefused(moekit_rmsnorm(&xt, &wt, 1e-6f, nullptr), before, "null y");
  moekit_tensor bad = yt;
  bad.data = nullptr;
  ExpectRefused(moekit_rmsnorm(&xt, &wt, 1e-6f, &bad), before, "null y data");
  bad = yt;
  bad.shape[0] = kRows - 1;
  ExpectRefused(moekit_rmsnorm(&xt, &wt, 1e-6f, &bad), before, "y rows mismatch");
  bad = wt;
  bad.shape[0] = kWidth - 1;
  ExpectRefused(moekit_rmsnorm(&xt, &bad, 1e-6f, &yt), before, "weight width mismatch");
  bad = xt;
  bad.dtype = MOEKIT_I32;
  ExpectRefused(moekit_rmsnorm(&bad, &wt, 1e-6f, &yt), before, "x dtype i32");
  bad = wt;
  bad.dtype = MOEKIT_FP8_E4M3;
  ExpectRefused(moekit_rmsnorm(&xt, &bad, 1e-6f, &yt), before, "weight dtype fp8");
  bad = xt;
  bad.ndim = 3;
  ExpectRefused(moekit_rmsnorm(&bad, &wt, 1e-6f, &yt), before, "x 3-D");
  ExpectRefused(moekit_rmsnorm(&xt, &wt, -1e-6f, &yt), before, "negative eps");
  ExpectRefused(moekit_rmsnorm(&xt, &wt, kNaN, &yt), before, "NaN eps");
  ExpectRefused(moekit_rmsnorm(&xt, &wt, kInf, &yt), before, "Inf eps");
  bad = yt;
  bad.data = x.data() + 1;  // overlaps x without being exactly in place
  ExpectRefused(moekit_rmsnorm(&xt, &wt, 1e-6f, &bad), before, "partial overlap");
}

TEST_F(RmsnormCApiErrors, FusedAddRmsnorm) {
  const auto before = Snapshot();
  ExpectRefused(moekit_fused_add_rmsnorm(nullptr, &rt, &wt, 1e-6f), before, "null x");
  ExpectRefused(moekit_fused_add_rmsnorm(&xt, nullptr, &wt, 1e-6f), before, "null residual");
  ExpectRefused(moekit_fused_add_rmsnorm(&xt, &rt, nullptr, 1e-6f), before, "null weight");
  moekit_tensor bad = rt;
  bad.dtype = MOEKIT_BF16;
  ExpectRefused(moekit_fused_add_rmsnorm(&xt, &bad, &wt, 1e-6f), before, "residual dtype");
  bad = rt;
  bad.shape[1] = kWidth - 1;
  ExpectRefused(moekit_fused_add_rmsnorm(&xt, &bad, &wt, 1e-6f), before, "residual shape");
  bad = wt;
  bad.shape[0] = kWidth + 1;
  ExpectRefused(moekit_fused_add_rmsnorm(&xt, &rt, &bad, 1e-6f), before, "weight shape");
  ExpectRefused(moekit_fused_add_rmsnorm(&xt, &rt, &wt, -1.0f), before, "negative eps");
  ExpectRefused(moekit_fused_add_rmsnorm(&xt, &xt, &wt, 1e-6f), before, "residual is x");
}

TEST_F(RmsnormCApiErrors, QkNorm) {
  const auto before = Snapshot();
  ExpectRefused(moekit_qk_norm(nullptr, &kt, &wt, &kwt, 1e-6f), before, "null q");
  ExpectRefused(moekit_qk_norm(&xt, nullptr, &wt, &kwt, 1e-6f), before, "null k");
  ExpectRefused(moekit_qk_norm(&xt, &kt, &kwt, &kwt, 1e-6f), before, "q weight width");
  ExpectRefused(moekit_qk_norm(&xt, &kt, &wt, &wt, 1e-6f), before, "k weight width");
  ExpectRefused(moekit_qk_norm(&xt, &kt, &wt, &kwt, -1e-6f), before, "negative eps");
  moekit_tensor bad = kt;
  bad.shape[0] = kRows + 1;
  ExpectRefused(moekit_qk_norm(&xt, &bad, &wt, &kwt, 1e-6f), before, "token mismatch");
  bad = kt;
  bad.dtype = MOEKIT_I64;
  ExpectRefused(moekit_qk_norm(&xt, &bad, &wt, &kwt, 1e-6f), before, "k dtype");

  ExpectRefused(moekit_qk_norm_partial_sumsq(&xt, &kt, nullptr, &st2), before, "null sums");
  bad = st;
  bad.dtype = MOEKIT_BF16;
  ExpectRefused(moekit_qk_norm_partial_sumsq(&xt, &kt, &bad, &st2), before, "bf16 sums");
  bad = st;
  bad.shape[0] = kRows + 1;
  ExpectRefused(moekit_qk_norm_partial_sumsq(&xt, &kt, &bad, &st2), before, "sums length");
  ExpectRefused(moekit_qk_norm_partial_sumsq(&xt, &kt, &st, &st), before, "same sums");

  ExpectRefused(moekit_qk_norm_apply(&xt, &kt, &st, &st2, kWidth - 1, 8, &wt, &kwt, 1e-6f), before,
                "q global width below local");
  ExpectRefused(moekit_qk_norm_apply(&xt, &kt, &st, &st2, kWidth, 0, &wt, &kwt, 1e-6f), before,
                "k global width 0");
  ExpectRefused(moekit_qk_norm_apply(&xt, &kt, &st, &st2, kWidth, 8, &kwt, &kwt, 1e-6f), before,
                "q weight slice width");
  ExpectRefused(moekit_qk_norm_apply(&xt, &kt, &st, &st2, kWidth, 8, &wt, &kwt, -2.0f), before,
                "negative eps");
  ExpectRefused(moekit_qk_norm_apply(&xt, &kt, nullptr, &st2, kWidth, 8, &wt, &kwt, 1e-6f), before,
                "null sums");

  int64_t begin = -5, len = -5;
  EXPECT_NE(moekit_qk_norm_kv_weight_slice(8, 128, 4, 4, &begin, &len), MOEKIT_OK);
  EXPECT_NE(moekit_qk_norm_kv_weight_slice(3, 128, 0, 2, &begin, &len), MOEKIT_OK);
  EXPECT_NE(moekit_qk_norm_kv_weight_slice(2, 128, 0, 3, &begin, &len), MOEKIT_OK);
  EXPECT_NE(moekit_qk_norm_kv_weight_slice(8, 0, 0, 2, &begin, &len), MOEKIT_OK);
  EXPECT_EQ(begin, -5);
  EXPECT_EQ(len, -5);
}

}  // namespace
