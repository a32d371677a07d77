// Bad-input tests for every function of the C API (include/moekit/moekit.h): each bad call must
// return an error status, leave a message in moekit_last_error() that names the function, the
// argument and what was wrong, and write nothing (outputs are pre-filled with a sentinel byte
// pattern and compared bytewise afterwards). Also the success paths of the small query
// functions.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "kernels/moe/moe.h"  // moekit_workspace, for one white-box check
#include "moekit/moekit.h"
#include "test_util.h"

namespace {

using moekit_test::make_tensor;

constexpr unsigned char kSentinel = 0xA5;
constexpr int64_t kHuge = int64_t{1} << 62;

// Byte buffers pre-filled with the sentinel; untouched() says whether every byte survived.
class Sentinels {
 public:
  template <class T>
  T* make(size_t count) {
    buffers_.emplace_back(count * sizeof(T), kSentinel);
    return reinterpret_cast<T*>(buffers_.back().data());
  }
  bool untouched() const {
    for (const auto& b : buffers_)
      for (unsigned char c : b)
        if (c != kSentinel) return false;
    return true;
  }

 private:
  std::deque<std::vector<unsigned char>> buffers_;
};

// Leaves a known message as the last error, so a stale message cannot pass for a new one.
void reset_error() {
  moekit_isa unused;
  moekit_isa_from_name("<reset>", &unused);
}

// The call failed, and the message is "<function>: <argument>..." and mentions `what`.
testing::AssertionResult Rejected(moekit_status status, const std::string& function,
                                  const std::string& argument, const std::string& what) {
  const std::string message = moekit_last_error();
  if (status == MOEKIT_OK) return testing::AssertionFailure() << "the call succeeded";
  const std::string prefix = function + ": " + argument;
  if (message.compare(0, prefix.size(), prefix) != 0)
    return testing::AssertionFailure() << "message '" << message << "' does not start with '"
                                       << prefix << "'";
  if (message.find(what) == std::string::npos)
    return testing::AssertionFailure() << "message '" << message << "' does not say '" << what
                                       << "'";
  return testing::AssertionSuccess() << message;
}

// Expects `call` to be rejected as described, with every sentinel buffer of `out` intact.
#define EXPECT_REJECTED(out, call, function, argument, what)                    \
  do {                                                                          \
    reset_error();                                                              \
    const moekit_status status_ = (call);                                       \
    EXPECT_TRUE(Rejected(status_, function, argument, what)) << #call;          \
    EXPECT_TRUE((out).untouched()) << #call << " wrote an output";              \
  } while (0)

// ---- library, errors, capabilities ---------------------------------------------------------

TEST(Api, VersionMatchesTheMacros) {
  char expected[32];
  std::snprintf(expected, sizeof expected, "%d.%d.%d", MOEKIT_VERSION_MAJOR, MOEKIT_VERSION_MINOR,
                MOEKIT_VERSION_PATCH);
  EXPECT_STREQ(moekit_version(), expected);
}

TEST(Api, NamesOfStatusesDtypesLevelsAndLayouts) {
  EXPECT_STREQ(moekit_status_name(MOEKIT_OK), "ok");
  EXPECT_STREQ(moekit_status_name(MOEKIT_ERR_INVALID_ARGUMENT), "invalid argument");
  EXPECT_STREQ(moekit_status_name(MOEKIT_ERR_UNSUPPORTED), "unsupported");
  EXPECT_STREQ(moekit_status_name(MOEKIT_ERR_OUT_OF_MEMORY), "out of memory");
  EXPECT_STREQ(moekit_status_name(MOEKIT_ERR_IO), "i/o error");
  EXPECT_STREQ(moekit_status_name(MOEKIT_ERR_INTERNAL), "internal error");
  // Invalid enum values: only those inside each enum's value range (the smallest bit field
  // holding its enumerators: 0..7 for status, dtype and isa) are defined in C++; a C caller may
  // pass any int, but passing one from C++ is undefined behaviour that UBSan's enum check
  // reports in the library. Layout (0..3) and scoring (0..1) have no such spare values.
  EXPECT_STREQ(moekit_status_name(static_cast<moekit_status>(6)), "unknown status");
  EXPECT_STREQ(moekit_status_name(static_cast<moekit_status>(7)), "unknown status");

  EXPECT_STREQ(moekit_dtype_name(MOEKIT_F32), "f32");
  EXPECT_STREQ(moekit_dtype_name(MOEKIT_BF16), "bf16");
  EXPECT_STREQ(moekit_dtype_name(MOEKIT_FP8_E4M3), "fp8");
  EXPECT_STREQ(moekit_dtype_name(MOEKIT_I32), "i32");
  EXPECT_STREQ(moekit_dtype_name(MOEKIT_I64), "i64");
  EXPECT_STREQ(moekit_dtype_name(static_cast<moekit_dtype>(5)), "unknown dtype");
  EXPECT_STREQ(moekit_dtype_name(static_cast<moekit_dtype>(7)), "unknown dtype");

  const char* levels[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx"};
  for (int i = MOEKIT_ISA_SCALAR; i <= MOEKIT_ISA_AMX; ++i) {
    EXPECT_STREQ(moekit_isa_name(static_cast<moekit_isa>(i)), levels[i]);
    moekit_isa parsed = static_cast<moekit_isa>(7);
    ASSERT_EQ(moekit_isa_from_name(levels[i], &parsed), MOEKIT_OK);
    EXPECT_EQ(parsed, i);
  }
  EXPECT_STREQ(moekit_isa_name(static_cast<moekit_isa>(5)), "unknown");
  EXPECT_STREQ(moekit_isa_name(static_cast<moekit_isa>(7)), "unknown");

  EXPECT_STREQ(moekit_pack_layout_name(MOEKIT_LAYOUT_AUTO), "auto");
  EXPECT_STREQ(moekit_pack_layout_name(MOEKIT_LAYOUT_PLAIN), "plain");
  EXPECT_STREQ(moekit_pack_layout_name(MOEKIT_LAYOUT_VNNI), "vnni");
  EXPECT_STREQ(moekit_pack_layout_name(MOEKIT_LAYOUT_AMX), "amx");
}

TEST(Api, LastErrorIsPerThreadAndEmptyInAFreshThread) {
  reset_error();
  EXPECT_NE(std::string(moekit_last_error()), "");
  std::string in_thread = "not run";
  std::thread([&] { in_thread = moekit_last_error(); }).join();
  EXPECT_EQ(in_thread, "");
  EXPECT_NE(std::string(moekit_last_error()), "") << "another thread must not clear ours";
}

TEST(Api, IsaFromNameRejectsBadNames) {
  Sentinels out;
  auto* isa = out.make<moekit_isa>(1);
  for (const char* bad : {"", "AVX2", "avx3", "avx2 ", " avx2", "avx512bf16", "sse4", "native",
                          "amx_bf16", "scalar\n"})
    EXPECT_REJECTED(out, moekit_isa_from_name(bad, isa), "moekit_isa_from_name", "name",
                    "is not a level");
  EXPECT_REJECTED(out, moekit_isa_from_name(nullptr, isa), "moekit_isa_from_name", "name",
                  "is NULL");
  EXPECT_REJECTED(out, moekit_isa_from_name("avx2", nullptr), "moekit_isa_from_name", "out",
                  "is NULL");
}

// Restores the detected level however the test ends.
struct LevelGuard {
  ~LevelGuard() { moekit_set_max_isa(moekit_detected_isa()); }
};

TEST(Api, SetMaxIsaRejectsInvalidAndUnavailableLevels) {
  LevelGuard guard;
  Sentinels none;
  const moekit_isa before = moekit_effective_isa();
  for (int bad : {5, 6, 7})  // inside the enum's value range: see the note on invalid enums
    EXPECT_REJECTED(none, moekit_set_max_isa(static_cast<moekit_isa>(bad)), "moekit_set_max_isa",
                    "isa", "is not a level");
  EXPECT_EQ(moekit_effective_isa(), before);
  // Above the detected level: an error (not a crash, not a silent cap).
  for (int level = moekit_detected_isa() + 1; level <= MOEKIT_ISA_AMX; ++level) {
    reset_error();
    EXPECT_EQ(moekit_set_max_isa(static_cast<moekit_isa>(level)), MOEKIT_ERR_UNSUPPORTED);
    EXPECT_TRUE(Rejected(MOEKIT_ERR_UNSUPPORTED, "moekit_set_max_isa", "isa",
                         "is not supported by this CPU"));
    EXPECT_EQ(moekit_effective_isa(), before);
  }
  // Every available level caps the effective one (which MOEKIT_ISA may cap further).
  for (int level = MOEKIT_ISA_SCALAR; level <= moekit_detected_isa(); ++level) {
    ASSERT_EQ(moekit_set_max_isa(static_cast<moekit_isa>(level)), MOEKIT_OK);
    EXPECT_LE(moekit_effective_isa(), level);
  }
  ASSERT_EQ(moekit_set_max_isa(moekit_detected_isa()), MOEKIT_OK);
  EXPECT_EQ(moekit_effective_isa(), before);
}

TEST(Api, NumThreads) {
  const int initial = moekit_num_threads();
  EXPECT_GE(initial, 1);
  Sentinels none;
  EXPECT_REJECTED(none, moekit_set_num_threads(4097), "moekit_set_num_threads", "n",
                  "exceeds 4096");
  EXPECT_REJECTED(none, moekit_set_num_threads(std::numeric_limits<int>::max()),
                  "moekit_set_num_threads", "n", "exceeds");
  EXPECT_EQ(moekit_num_threads(), initial);
  ASSERT_EQ(moekit_set_num_threads(3), MOEKIT_OK);
  EXPECT_EQ(moekit_num_threads(), 3);
  ASSERT_EQ(moekit_set_num_threads(0), MOEKIT_OK);  // back to the default
  EXPECT_EQ(moekit_num_threads(), initial);
  ASSERT_EQ(moekit_set_num_threads(-5), MOEKIT_OK);  // n <= 0 restores the default too
  EXPECT_EQ(moekit_num_threads(), initial);
}

// ---- dispatch introspection ----------------------------------------------------------------

TEST(Api, OpsAndImplementations) {
  const char* ops[] = {"rmsnorm",    "fused_add_rmsnorm", "qk_norm",  "topk_route",
                       "router_topk", "moe_align",        "fused_moe"};
  ASSERT_EQ(moekit_op_count(), 7);
  for (int i = 0; i < moekit_op_count(); ++i) {
    const char* op = moekit_op_name(i);
    ASSERT_NE(op, nullptr);
    EXPECT_STREQ(op, ops[i]);
    const int n = moekit_impl_count(op);
    ASSERT_GE(n, 1) << op;
    for (int j = 0; j < n; ++j) {
      const char* name = nullptr;
      moekit_isa level = static_cast<moekit_isa>(7);
      ASSERT_EQ(moekit_impl_info(op, j, &name, &level), MOEKIT_OK) << moekit_last_error();
      ASSERT_NE(name, nullptr);
      EXPECT_GE(level, MOEKIT_ISA_SCALAR);
      EXPECT_LE(level, MOEKIT_ISA_AMX);
      const bool is_ref = std::string(name).rfind("ref", 0) == 0;
      // The reference is last, and only the last is a reference.
      EXPECT_EQ(is_ref, j == n - 1) << op << "[" << j << "] = " << name;
      if (j == n - 1) {
        EXPECT_EQ(level, MOEKIT_ISA_SCALAR) << name;
      }
    }
  }
  EXPECT_EQ(moekit_op_name(-1), nullptr);
  EXPECT_EQ(moekit_op_name(7), nullptr);
  EXPECT_EQ(moekit_impl_count("nope"), -1);
  EXPECT_EQ(moekit_impl_count(nullptr), -1);
  EXPECT_EQ(moekit_impl_count("RMSNORM"), -1);
}

TEST(Api, ImplInfoRejectsBadArguments) {
  Sentinels out;
  auto* name = out.make<const char*>(1);
  auto* level = out.make<moekit_isa>(1);
  const int n = moekit_impl_count("rmsnorm");
  EXPECT_REJECTED(out, moekit_impl_info("rmsnorm", -1, name, level), "moekit_impl_info",
                  "impl_index", "out of range");
  EXPECT_REJECTED(out, moekit_impl_info("rmsnorm", n, name, level), "moekit_impl_info",
                  "impl_index", "out of range");
  EXPECT_REJECTED(out, moekit_impl_info("nope", 0, name, level), "moekit_impl_info", "op",
                  "is not an op");
  EXPECT_REJECTED(out, moekit_impl_info(nullptr, 0, name, level), "moekit_impl_info", "op",
                  "is not an op");
  EXPECT_REJECTED(out, moekit_impl_info("rmsnorm", 0, nullptr, level), "moekit_impl_info",
                  "name", "is NULL");
  EXPECT_REJECTED(out, moekit_impl_info("rmsnorm", 0, name, nullptr), "moekit_impl_info",
                  "name/level", "is NULL");
}

TEST(Api, QueryOnlyChoosesAndWritesNothing) {
  std::vector<float> x = {1, 2, 3, 4}, w = {1, 1, 1, 1};
  Sentinels out;
  float* y = out.make<float>(4);
  moekit_tensor tx = make_tensor(x.data(), MOEKIT_F32, {1, 4});
  moekit_tensor tw = make_tensor(w.data(), MOEKIT_F32, {4});
  moekit_tensor ty = make_tensor(y, MOEKIT_F32, {1, 4});
  std::string fresh = "not run";
  std::thread([&] { fresh = moekit_last_impl("rmsnorm"); }).join();
  EXPECT_EQ(fresh, "") << "no call on that thread yet";
  EXPECT_STREQ(moekit_last_impl("no_such_op"), "");
  EXPECT_STREQ(moekit_last_impl(nullptr), "");

  moekit_set_query_only(1);
  const moekit_status s = moekit_rmsnorm(&tx, &tw, 1e-6f, &ty);
  const std::string chosen = moekit_last_impl("rmsnorm");
  // Validation still runs in query mode.
  moekit_tensor bad = make_tensor(y, MOEKIT_F32, {1, 5});
  EXPECT_REJECTED(out, moekit_rmsnorm(&tx, &tw, 1e-6f, &bad), "moekit_rmsnorm", "y",
                  "does not match");
  moekit_set_query_only(0);
  ASSERT_EQ(s, MOEKIT_OK) << moekit_last_error();
  EXPECT_TRUE(out.untouched()) << "query mode wrote y";
  bool registered = false;
  for (int j = 0; j < moekit_impl_count("rmsnorm"); ++j) {
    const char* name;
    moekit_isa level;
    moekit_impl_info("rmsnorm", j, &name, &level);
    registered = registered || chosen == name;
  }
  EXPECT_TRUE(registered) << "'" << chosen << "' is not a registered rmsnorm";
  // Query mode is per thread and off again: a real call writes y and reports the same choice.
  ASSERT_EQ(moekit_rmsnorm(&tx, &tw, 1e-6f, &ty), MOEKIT_OK);
  EXPECT_FALSE(out.untouched());
  EXPECT_EQ(chosen, moekit_last_impl("rmsnorm"));
}

// ---- RMSNorm family ------------------------------------------------------------------------

class RmsnormApi : public testing::Test {
 protected:
  std::vector<float> x_ = {1, 2, 3, 4, 5, 6, 7, 8}, w_ = {1, 1, 1, 1};
  Sentinels out_;
  float* y_ = out_.make<float>(16);
  moekit_tensor x = make_tensor(x_.data(), MOEKIT_F32, {2, 4});
  moekit_tensor w = make_tensor(w_.data(), MOEKIT_F32, {4});
  moekit_tensor y = make_tensor(y_, MOEKIT_F32, {2, 4});
};

TEST_F(RmsnormApi, Rmsnorm) {
  const char* fn = "moekit_rmsnorm";
  EXPECT_REJECTED(out_, moekit_rmsnorm(nullptr, &w, 1e-6f, &y), fn, "x", "is NULL");
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, nullptr, 1e-6f, &y), fn, "weight", "is NULL");
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w, 1e-6f, nullptr), fn, "y", "is NULL");
  moekit_tensor t = x;
  t.data = nullptr;
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "data is NULL");
  t = x;
  t.ndim = 3;
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "expected 2 dimensions");
  t = x;
  t.ndim = -1;
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "dimensions");
  // Shape mismatches.
  moekit_tensor y5 = make_tensor(y_, MOEKIT_F32, {2, 5});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w, 1e-6f, &y5), fn, "y", "does not match");
  moekit_tensor y3 = make_tensor(y_, MOEKIT_F32, {3, 4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w, 1e-6f, &y3), fn, "y", "does not match");
  moekit_tensor w5 = make_tensor(w_.data(), MOEKIT_F32, {3});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w5, 1e-6f, &y), fn, "weight", "does not match");
  // Dtypes: integer and FP8 activations, integer weights, an invalid enum value.
  for (moekit_dtype bad : {MOEKIT_I32, MOEKIT_I64, MOEKIT_FP8_E4M3, static_cast<moekit_dtype>(7)}) {
    t = x;
    t.dtype = bad;
    EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "is not supported");
    moekit_tensor ty = y;
    ty.dtype = bad;
    EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w, 1e-6f, &ty), fn, "y", "is not supported");
    moekit_tensor tw = w;
    tw.dtype = bad;
    EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &tw, 1e-6f, &y), fn, "weight", "is not supported");
  }
  // Sizes: negative, 2^62, and a product that overflows.
  t = make_tensor(x_.data(), MOEKIT_F32, {-2, 4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "negative size");
  t = make_tensor(x_.data(), MOEKIT_F32, {kHuge, 4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "too large");
  t = make_tensor(x_.data(), MOEKIT_F32, {int64_t{1} << 31, int64_t{1} << 31});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "too large");
  // Strides: innermost != 1, rows closer than the width, and a row stride that reaches
  // beyond any addressable memory (2^20 rows 2^40 elements apart).
  t = make_tensor(x_.data(), MOEKIT_F32, {2, 4}, {8, 2});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "innermost stride");
  t = make_tensor(x_.data(), MOEKIT_F32, {2, 4}, {3, 1});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "smaller than the rows");
  t = make_tensor(x_.data(), MOEKIT_F32, {2, 4}, {-4, 1});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &y), fn, "x", "stride");
  t = make_tensor(x_.data(), MOEKIT_F32, {int64_t{1} << 20, 4}, {int64_t{1} << 40, 1});
  moekit_tensor big_y = make_tensor(y_, MOEKIT_F32, {int64_t{1} << 20, 4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&t, &w, 1e-6f, &big_y), fn, "x", "too large");
  moekit_tensor ys = make_tensor(y_, MOEKIT_F32, {2, 4}, {4, 2});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w, 1e-6f, &ys), fn, "y", "innermost stride");
  // eps must be finite and >= 0.
  for (float eps : {-1e-6f, std::nanf(""), std::numeric_limits<float>::infinity()})
    EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w, eps, &y), fn, "eps", "must be finite");
  // Overlap: y starting one element into y's own buffer shared with an input copy of x.
  moekit_tensor xin = make_tensor(y_, MOEKIT_F32, {2, 4});
  moekit_tensor yshift = make_tensor(y_ + 1, MOEKIT_F32, {2, 4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&xin, &w, 1e-6f, &yshift), fn, "y", "overlaps x");
  // Same pointer but a different row stride or dtype is not "in place".
  moekit_tensor ywide = make_tensor(y_, MOEKIT_F32, {2, 4}, {5, 1});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&xin, &w, 1e-6f, &ywide), fn, "y", "overlaps x");
  moekit_tensor ybf16 = make_tensor(y_, MOEKIT_BF16, {2, 4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&xin, &w, 1e-6f, &ybf16), fn, "y", "overlaps x");
  // The weight inside y, which is written while the weight is still read; in place too.
  moekit_tensor w_in_y = make_tensor(y_ + 4, MOEKIT_F32, {4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w_in_y, 1e-6f, &y), fn, "weight", "overlaps y");
  moekit_tensor w_bf16_in_y = make_tensor(y_ + 7, MOEKIT_BF16, {4});
  EXPECT_REJECTED(out_, moekit_rmsnorm(&x, &w_bf16_in_y, 1e-6f, &y), fn, "weight", "overlaps y");
  EXPECT_REJECTED(out_, moekit_rmsnorm(&xin, &w_in_y, 1e-6f, &xin), fn, "weight", "overlaps y");
}

// Exact in-place operation (y == x) and a weight right after y in the same buffer stay allowed.
TEST_F(RmsnormApi, InPlaceAndAdjacentWeight) {
  std::vector<float> expected(8);
  moekit_tensor te = make_tensor(expected.data(), MOEKIT_F32, {2, 4});
  ASSERT_EQ(moekit_rmsnorm(&x, &w, 1e-6f, &te), MOEKIT_OK) << moekit_last_error();
  std::vector<float> buf(x_);  // rows 0..1: x, then y, then the weight
  buf.insert(buf.end(), w_.begin(), w_.end());
  moekit_tensor xy = make_tensor(buf.data(), MOEKIT_F32, {2, 4});
  moekit_tensor w_after = make_tensor(buf.data() + 8, MOEKIT_F32, {4});
  ASSERT_EQ(moekit_rmsnorm(&xy, &w_after, 1e-6f, &xy), MOEKIT_OK) << moekit_last_error();
  EXPECT_EQ(std::vector<float>(buf.begin(), buf.begin() + 8), expected);
}

TEST_F(RmsnormApi, FusedAddRmsnorm) {
  const char* fn = "moekit_fused_add_rmsnorm";
  // x and residual are both outputs here: both live in sentinel memory.
  float* r_ = out_.make<float>(8);
  moekit_tensor xo = make_tensor(y_, MOEKIT_F32, {2, 4});
  moekit_tensor r = make_tensor(r_, MOEKIT_F32, {2, 4});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(nullptr, &r, &w, 1e-6f), fn, "x", "is NULL");
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, nullptr, &w, 1e-6f), fn, "residual",
                  "is NULL");
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &r, nullptr, 1e-6f), fn, "weight",
                  "is NULL");
  moekit_tensor rb = make_tensor(r_, MOEKIT_BF16, {2, 4});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &rb, &w, 1e-6f), fn, "residual",
                  "differs from x");
  moekit_tensor r3 = make_tensor(r_, MOEKIT_F32, {2, 3});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &r3, &w, 1e-6f), fn, "residual",
                  "does not match");
  moekit_tensor xi = make_tensor(y_, MOEKIT_I32, {2, 4});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xi, &r, &w, 1e-6f), fn, "x", "not supported");
  moekit_tensor w3 = make_tensor(w_.data(), MOEKIT_F32, {3});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &r, &w3, 1e-6f), fn, "weight",
                  "does not match");
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &r, &w, -1.0f), fn, "eps", "finite");
  moekit_tensor rs = make_tensor(y_ + 2, MOEKIT_F32, {2, 4});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &rs, &w, 1e-6f), fn, "residual",
                  "overlaps x");
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &xo, &w, 1e-6f), fn, "residual",
                  "overlaps x");
  moekit_tensor neg = make_tensor(y_, MOEKIT_F32, {2, -4});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&neg, &r, &w, 1e-6f), fn, "x", "negative");
  moekit_tensor strided = make_tensor(r_, MOEKIT_F32, {2, 4}, {2, 1});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &strided, &w, 1e-6f), fn, "residual",
                  "smaller than the rows");
  // The weight inside x or residual, both rewritten while the weight is still read.
  moekit_tensor w_in_x = make_tensor(y_ + 4, MOEKIT_F32, {4});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &r, &w_in_x, 1e-6f), fn, "weight",
                  "overlaps x");
  moekit_tensor w_in_r = make_tensor(r_ + 2, MOEKIT_F32, {4});
  EXPECT_REJECTED(out_, moekit_fused_add_rmsnorm(&xo, &r, &w_in_r, 1e-6f), fn, "weight",
                  "overlaps residual");
}

class QkNormApi : public testing::Test {
 protected:
  Sentinels out_;
  float* q_ = out_.make<float>(8);
  float* k_ = out_.make<float>(4);
  float* qs_ = out_.make<float>(2);
  float* ks_ = out_.make<float>(2);
  std::vector<float> qw_ = {1, 1, 1, 1}, kw_ = {1, 1};
  std::vector<float> sums_ = {4, 4};
  moekit_tensor q = make_tensor(q_, MOEKIT_F32, {2, 4});
  moekit_tensor k = make_tensor(k_, MOEKIT_F32, {2, 2});
  moekit_tensor qw = make_tensor(qw_.data(), MOEKIT_F32, {4});
  moekit_tensor kw = make_tensor(kw_.data(), MOEKIT_F32, {2});
  moekit_tensor qs = make_tensor(qs_, MOEKIT_F32, {2});
  moekit_tensor ks = make_tensor(ks_, MOEKIT_F32, {2});
  moekit_tensor sums = make_tensor(sums_.data(), MOEKIT_F32, {2});
};

TEST_F(QkNormApi, QkNorm) {
  const char* fn = "moekit_qk_norm";
  EXPECT_REJECTED(out_, moekit_qk_norm(nullptr, &k, &qw, &kw, 1e-6f), fn, "q", "is NULL");
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, nullptr, &qw, &kw, 1e-6f), fn, "k", "is NULL");
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, nullptr, &kw, 1e-6f), fn, "q_weight", "is NULL");
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &qw, nullptr, 1e-6f), fn, "k_weight", "is NULL");
  moekit_tensor k3 = make_tensor(k_, MOEKIT_F32, {1, 2});
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k3, &qw, &kw, 1e-6f), fn, "k", "tokens");
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &kw, &kw, 1e-6f), fn, "q_weight",
                  "does not match");
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &qw, &qw, 1e-6f), fn, "k_weight",
                  "does not match");
  moekit_tensor q8 = make_tensor(q_, MOEKIT_FP8_E4M3, {2, 4});
  EXPECT_REJECTED(out_, moekit_qk_norm(&q8, &k, &qw, &kw, 1e-6f), fn, "q", "not supported");
  moekit_tensor koverlap = make_tensor(q_ + 6, MOEKIT_F32, {2, 2});
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &koverlap, &qw, &kw, 1e-6f), fn, "k", "overlaps q");
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &qw, &kw, std::nanf("")), fn, "eps", "finite");
  moekit_tensor qhuge = make_tensor(q_, MOEKIT_F32, {2, kHuge});
  EXPECT_REJECTED(out_, moekit_qk_norm(&qhuge, &k, &qw, &kw, 1e-6f), fn, "q", "too large");
  // A weight inside q or k, which are rewritten while the weights are still read.
  moekit_tensor qw_in_q = make_tensor(q_ + 4, MOEKIT_F32, {4});
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &qw_in_q, &kw, 1e-6f), fn, "q_weight", "overlaps q");
  moekit_tensor qw_in_k = make_tensor(k_, MOEKIT_F32, {4});
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &qw_in_k, &kw, 1e-6f), fn, "q_weight", "overlaps k");
  moekit_tensor kw_in_q = make_tensor(q_ + 1, MOEKIT_F32, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &qw, &kw_in_q, 1e-6f), fn, "k_weight", "overlaps q");
  moekit_tensor kw_in_k = make_tensor(k_ + 2, MOEKIT_F32, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm(&q, &k, &qw, &kw_in_k, 1e-6f), fn, "k_weight", "overlaps k");
}

TEST_F(QkNormApi, PartialSumsq) {
  const char* fn = "moekit_qk_norm_partial_sumsq";
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, nullptr, &ks), fn, "q_sumsq",
                  "is NULL");
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, &qs, nullptr), fn, "k_sumsq",
                  "is NULL");
  moekit_tensor qs3 = make_tensor(qs_, MOEKIT_F32, {3});
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, &qs3, &ks), fn, "q_sumsq",
                  "does not match");
  moekit_tensor qsb = make_tensor(qs_, MOEKIT_BF16, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, &qsb, &ks), fn, "q_sumsq",
                  "not supported");
  moekit_tensor qs2d = make_tensor(qs_, MOEKIT_F32, {2, 1});
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, &qs2d, &ks), fn, "q_sumsq",
                  "dimensions");
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, &qs, &qs), fn, "k_sumsq",
                  "overlaps q_sumsq");
  // The sums must not land inside q or k, which the kernel is still reading.
  moekit_tensor in_q = make_tensor(q_ + 4, MOEKIT_F32, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, &in_q, &ks), fn, "q_sumsq",
                  "overlaps q");
  moekit_tensor in_k = make_tensor(k_, MOEKIT_F32, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm_partial_sumsq(&q, &k, &qs, &in_k), fn, "k_sumsq",
                  "overlaps k");
}

TEST_F(QkNormApi, Apply) {
  const char* fn = "moekit_qk_norm_apply";
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, nullptr, &sums, 4, 2, &qw, &kw, 1e-6f), fn,
                  "q_sumsq", "is NULL");
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, 3, 2, &qw, &kw, 1e-6f), fn,
                  "q_global_width", "at least the local width");
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, 4, 0, &qw, &kw, 1e-6f), fn,
                  "k_global_width", "must be positive");
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, -8, 2, &qw, &kw, 1e-6f), fn,
                  "q_global_width", "must be positive");
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, 4, 2, &kw, &kw, 1e-6f), fn,
                  "q_weight_slice", "does not match");
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, 4, 2, &qw, nullptr, 1e-6f),
                  fn, "k_weight_slice", "is NULL");
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, 4, 2, &qw, &kw, -1.0f), fn,
                  "eps", "finite");
  moekit_tensor sums_i = make_tensor(sums_.data(), MOEKIT_I32, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums_i, 4, 2, &qw, &kw, 1e-6f), fn,
                  "k_sumsq", "not supported");
  // The sums are read while q and k are written in place: they must not share memory.
  moekit_tensor in_q = make_tensor(q_ + 2, MOEKIT_F32, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &in_q, &sums, 4, 2, &qw, &kw, 1e-6f), fn,
                  "q_sumsq", "overlaps q");
  // So must the weight slices.
  moekit_tensor qw_in_k = make_tensor(k_, MOEKIT_F32, {4});
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, 4, 2, &qw_in_k, &kw, 1e-6f), fn,
                  "q_weight_slice", "overlaps k");
  moekit_tensor kw_in_q = make_tensor(q_ + 6, MOEKIT_F32, {2});
  EXPECT_REJECTED(out_, moekit_qk_norm_apply(&q, &k, &sums, &sums, 4, 2, &qw, &kw_in_q, 1e-6f), fn,
                  "k_weight_slice", "overlaps q");
}

TEST(Api, KvWeightSlice) {
  const char* fn = "moekit_qk_norm_kv_weight_slice";
  Sentinels out;
  int64_t* begin = out.make<int64_t>(1);
  int64_t* len = out.make<int64_t>(1);
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(0, 128, 0, 1, begin, len), fn,
                  "num_kv_heads", "must be positive");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(-8, 128, 0, 1, begin, len), fn,
                  "num_kv_heads", "must be positive");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(8, 0, 0, 1, begin, len), fn, "head_dim",
                  "must be positive");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(8, 128, 0, 0, begin, len), fn, "world",
                  "must be positive");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(8, 128, 4, 4, begin, len), fn, "rank",
                  "out of range");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(8, 128, -1, 4, begin, len), fn, "rank",
                  "out of range");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(8, 128, 0, 4, nullptr, len), fn, "begin",
                  "is NULL");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(8, 128, 0, 4, begin, nullptr), fn, "len",
                  "is NULL");
  // Heads that neither divide among nor replicate evenly over the ranks.
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(6, 128, 0, 4, begin, len), fn, "world",
                  "do not divide");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(3, 128, 0, 4, begin, len), fn, "world",
                  "do not replicate");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(2, 128, 0, 3, begin, len), fn, "world",
                  "do not replicate");
  // Widths beyond any tensor (the product would overflow int64).
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(kHuge, kHuge, 0, 1, begin, len), fn,
                  "num_kv_heads", "too large");
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(1, kHuge, 0, 1, begin, len), fn,
                  "num_kv_heads", "too large");
  // One pointer for both results: len would overwrite begin.
  EXPECT_REJECTED(out, moekit_qk_norm_kv_weight_slice(8, 128, 1, 4, begin, begin), fn, "len",
                  "same pointer as begin");
}

// ---- top-k routing -------------------------------------------------------------------------

class TopkApi : public testing::Test {
 protected:
  static constexpr int64_t kM = 2, kE = 8, kK = 2;
  std::vector<float> logits_ = moekit_test::random_floats(kM * kE, 1);
  std::vector<float> bias_ = std::vector<float>(kE, 0.0f);
  Sentinels out_;
  float* w_ = out_.make<float>(kM * kK * 2);
  int32_t* ids_ = out_.make<int32_t>(kM * kK * 2);
  moekit_tensor logits = make_tensor(logits_.data(), MOEKIT_F32, {kM, kE});
  moekit_tensor bias = make_tensor(bias_.data(), MOEKIT_F32, {kE});
  moekit_tensor w = make_tensor(w_, MOEKIT_F32, {kM, kK});
  moekit_tensor ids = make_tensor(ids_, MOEKIT_I32, {kM, kK});
  moekit_route_params p = [] {
    moekit_route_params r = moekit_route_params_default();
    r.top_k = kK;
    return r;
  }();

  moekit_status route(const moekit_route_params& params) {
    return moekit_topk_route(&logits, &bias, &params, &w, &ids);
  }
};

TEST(Api, RouteParamsDefault) {
  const moekit_route_params p = moekit_route_params_default();
  EXPECT_EQ(p.top_k, 1);
  EXPECT_EQ(p.scoring, MOEKIT_SCORING_SOFTMAX);
  EXPECT_EQ(p.renormalize, 0);
  EXPECT_EQ(p.num_expert_group, 0);
  EXPECT_EQ(p.topk_group, 0);
  EXPECT_EQ(p.routed_scaling_factor, 1.0f);
}

TEST_F(TopkApi, TopkRoute) {
  const char* fn = "moekit_topk_route";
  EXPECT_REJECTED(out_, moekit_topk_route(nullptr, &bias, &p, &w, &ids), fn, "logits",
                  "is NULL");
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, nullptr, &w, &ids), fn, "params",
                  "is NULL");
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &p, nullptr, &ids), fn, "weights",
                  "is NULL");
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &p, &w, nullptr), fn, "ids",
                  "is NULL");
  // k out of range.
  moekit_route_params bad = p;
  bad.top_k = 0;
  EXPECT_REJECTED(out_, route(bad), fn, "params.top_k", "out of range");
  bad.top_k = kE + 1;
  EXPECT_REJECTED(out_, route(bad), fn, "params.top_k", "out of range");
  bad.top_k = -3;
  EXPECT_REJECTED(out_, route(bad), fn, "params.top_k", "out of range");
  // No experts.
  moekit_tensor empty = make_tensor(logits_.data(), MOEKIT_F32, {kM, 0});
  EXPECT_REJECTED(out_, moekit_topk_route(&empty, nullptr, &p, &w, &ids), fn, "logits",
                  "no experts");
  moekit_tensor many = make_tensor(logits_.data(), MOEKIT_F32, {1, int64_t{1} << 31});
  EXPECT_REJECTED(out_, moekit_topk_route(&many, nullptr, &p, &w, &ids), fn, "logits",
                  "too many experts");
  // Enums and floats.
  // (params.scoring has no spare value in its enum's range to test with: see the note in
  // NamesOfStatusesDtypesLevelsAndLayouts.)
  bad = p;
  bad.routed_scaling_factor = std::nanf("");
  EXPECT_REJECTED(out_, route(bad), fn, "params.routed_scaling_factor", "finite");
  bad.routed_scaling_factor = std::numeric_limits<float>::infinity();
  EXPECT_REJECTED(out_, route(bad), fn, "params.routed_scaling_factor", "finite");
  // Groups.
  bad = p;
  bad.num_expert_group = -1;
  EXPECT_REJECTED(out_, route(bad), fn, "params.num_expert_group", "negative");
  bad.num_expert_group = 3;  // 8 experts
  bad.topk_group = 1;
  EXPECT_REJECTED(out_, route(bad), fn, "params.num_expert_group", "do not divide");
  bad.num_expert_group = 4;
  bad.topk_group = 0;
  EXPECT_REJECTED(out_, route(bad), fn, "params.topk_group", "out of range");
  bad.topk_group = 5;
  EXPECT_REJECTED(out_, route(bad), fn, "params.topk_group", "out of range");
  bad.topk_group = 1;  // 1 group of 2 experts kept, k = 3
  bad.top_k = 3;
  moekit_tensor w3 = make_tensor(w_, MOEKIT_F32, {kM, 3});
  moekit_tensor ids3 = make_tensor(ids_, MOEKIT_I32, {kM, 3});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &bad, &w3, &ids3), fn,
                  "params.top_k", "exceeds the experts");
  // Bias.
  moekit_tensor bias_short = make_tensor(bias_.data(), MOEKIT_F32, {kE - 1});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias_short, &p, &w, &ids), fn, "bias",
                  "does not match");
  moekit_tensor bias_bf16 = make_tensor(bias_.data(), MOEKIT_BF16, {kE});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias_bf16, &p, &w, &ids), fn, "bias",
                  "not supported");
  // Output shapes and dtypes.
  moekit_tensor w_wrong = make_tensor(w_, MOEKIT_F32, {kM, kK + 1});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &p, &w_wrong, &ids), fn, "weights",
                  "does not match");
  moekit_tensor ids_wrong = make_tensor(ids_, MOEKIT_I32, {kM + 1, kK});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &p, &w, &ids_wrong), fn, "ids",
                  "does not match");
  moekit_tensor w_bf16 = make_tensor(w_, MOEKIT_BF16, {kM, kK});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &p, &w_bf16, &ids), fn, "weights",
                  "not supported");
  moekit_tensor ids_f32 = make_tensor(ids_, MOEKIT_F32, {kM, kK});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &p, &w, &ids_f32), fn, "ids",
                  "not supported");
  // Activations.
  for (moekit_dtype bad_dtype : {MOEKIT_I32, MOEKIT_FP8_E4M3, MOEKIT_I64}) {
    moekit_tensor l = logits;
    l.dtype = bad_dtype;
    EXPECT_REJECTED(out_, moekit_topk_route(&l, &bias, &p, &w, &ids), fn, "logits",
                    "not supported");
  }
  moekit_tensor l_strided = make_tensor(logits_.data(), MOEKIT_F32, {kM, kE}, {kE, 2});
  EXPECT_REJECTED(out_, moekit_topk_route(&l_strided, &bias, &p, &w, &ids), fn, "logits",
                  "innermost stride");
  moekit_tensor l_rows = make_tensor(logits_.data(), MOEKIT_F32, {kM, kE}, {kE - 1, 1});
  EXPECT_REJECTED(out_, moekit_topk_route(&l_rows, &bias, &p, &w, &ids), fn, "logits",
                  "smaller than the rows");
  moekit_tensor l_neg = make_tensor(logits_.data(), MOEKIT_F32, {-1, kE});
  EXPECT_REJECTED(out_, moekit_topk_route(&l_neg, &bias, &p, &w, &ids), fn, "logits",
                  "negative");
  moekit_tensor l_huge = make_tensor(logits_.data(), MOEKIT_F32, {kHuge, kE});
  EXPECT_REJECTED(out_, moekit_topk_route(&l_huge, &bias, &p, &w, &ids), fn, "logits",
                  "too large");
  // Overlapping outputs, and outputs over the input.
  moekit_tensor ids_on_w = make_tensor(w_ + 1, MOEKIT_I32, {kM, kK});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias, &p, &w, &ids_on_w), fn, "ids",
                  "overlaps weights");
  moekit_tensor logits_on_w = make_tensor(w_, MOEKIT_F32, {kM, kE});
  moekit_tensor w_in_logits = make_tensor(w_ + 2, MOEKIT_F32, {kM, kK});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits_on_w, nullptr, &p, &w_in_logits, &ids), fn,
                  "weights/ids", "overlap logits");
  // The bias over an output: it is read for every row, after earlier rows are written.
  moekit_tensor bias_on_w = make_tensor(w_, MOEKIT_F32, {kE});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias_on_w, &p, &w, &ids), fn, "bias",
                  "overlaps weights");
  moekit_tensor bias_on_ids = make_tensor(ids_, MOEKIT_F32, {kE});
  EXPECT_REJECTED(out_, moekit_topk_route(&logits, &bias_on_ids, &p, &w, &ids), fn, "bias",
                  "overlaps ids");
}

TEST_F(TopkApi, RouterTopk) {
  const char* fn = "moekit_router_topk";
  const int64_t H = 4;
  std::vector<float> hidden_ = moekit_test::random_floats(kM * H, 2);
  std::vector<float> gate_ = moekit_test::random_floats(kE * H, 3);
  float* lo_ = out_.make<float>(kM * kE);
  moekit_tensor hidden = make_tensor(hidden_.data(), MOEKIT_F32, {kM, H});
  moekit_tensor gate = make_tensor(gate_.data(), MOEKIT_F32, {kE, H});
  moekit_tensor lo = make_tensor(lo_, MOEKIT_F32, {kM, kE});
  EXPECT_REJECTED(out_, moekit_router_topk(nullptr, &gate, &bias, &p, &w, &ids, &lo), fn,
                  "hidden", "is NULL");
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, nullptr, &bias, &p, &w, &ids, &lo), fn,
                  "gate_weight", "is NULL");
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate, &bias, nullptr, &w, &ids, &lo), fn,
                  "params", "is NULL");
  moekit_tensor gate5 = make_tensor(gate_.data(), MOEKIT_F32, {kE, H - 1});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate5, &bias, &p, &w, &ids, &lo), fn,
                  "gate_weight", "does not match");
  moekit_tensor gate_bf16 = make_tensor(gate_.data(), MOEKIT_BF16, {kE, H});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate_bf16, &bias, &p, &w, &ids, &lo), fn,
                  "gate_weight", "not supported");
  moekit_tensor hidden_fp8 = make_tensor(hidden_.data(), MOEKIT_FP8_E4M3, {kM, H});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden_fp8, &gate, &bias, &p, &w, &ids, &lo), fn,
                  "hidden", "not supported");
  moekit_route_params bad = p;
  bad.top_k = kE + 1;
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate, &bias, &bad, &w, &ids, &lo), fn,
                  "params.top_k", "out of range");
  moekit_tensor lo_wrong = make_tensor(lo_, MOEKIT_F32, {kM, kE + 1});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate, &bias, &p, &w, &ids, &lo_wrong), fn,
                  "logits_out", "does not match");
  moekit_tensor lo_bf16 = make_tensor(lo_, MOEKIT_BF16, {kM, kE});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate, &bias, &p, &w, &ids, &lo_bf16), fn,
                  "logits_out", "not supported");
  moekit_tensor lo_on_w = make_tensor(w_, MOEKIT_F32, {kM, kE});
  moekit_tensor w_far = make_tensor(w_ + 4, MOEKIT_F32, {kM, kK});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate, &bias, &p, &w_far, &ids, &lo_on_w),
                  fn, "logits_out", "overlaps");
  moekit_tensor hidden_on_w = make_tensor(w_, MOEKIT_F32, {kM, H});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden_on_w, &gate, &bias, &p, &w, &ids, nullptr),
                  fn, "weights/ids", "overlap hidden");
  moekit_tensor gate_huge = make_tensor(gate_.data(), MOEKIT_F32, {kHuge, H});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate_huge, &bias, &p, &w, &ids, &lo), fn,
                  "gate_weight", "too large");
  // The gate or the bias over an output: both are read after outputs of earlier tokens are
  // written.
  float* big_ = out_.make<float>(kE * H);  // room for the whole gate
  moekit_tensor gate_on_big = make_tensor(big_, MOEKIT_F32, {kE, H});
  moekit_tensor lo_on_gate = make_tensor(big_ + 4, MOEKIT_F32, {kM, kE});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate_on_big, &bias, &p, &w, &ids, &lo_on_gate),
                  fn, "gate_weight", "overlaps logits_out");
  moekit_tensor w_on_gate = make_tensor(big_ + 20, MOEKIT_F32, {kM, kK});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate_on_big, &bias, &p, &w_on_gate, &ids, &lo),
                  fn, "gate_weight", "overlaps weights");
  moekit_tensor ids_on_gate = make_tensor(big_ + 28, MOEKIT_I32, {kM, kK});
  EXPECT_REJECTED(out_,
                  moekit_router_topk(&hidden, &gate_on_big, &bias, &p, &w, &ids_on_gate, nullptr),
                  fn, "gate_weight", "overlaps ids");
  moekit_tensor bias_on_lo = make_tensor(lo_ + 8, MOEKIT_F32, {kE});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate, &bias_on_lo, &p, &w, &ids, &lo), fn,
                  "bias", "overlaps logits_out");
  moekit_tensor bias_on_w = make_tensor(w_, MOEKIT_F32, {kE});
  EXPECT_REJECTED(out_, moekit_router_topk(&hidden, &gate, &bias_on_w, &p, &w, &ids, nullptr), fn,
                  "bias", "overlaps weights");
}

// ---- moe_align ------------------------------------------------------------------------------

TEST(Api, MoeAlignCapacity) {
  EXPECT_EQ(moekit_moe_align_capacity(3, 2, 3, 2), 10);
  EXPECT_EQ(moekit_moe_align_capacity(0, 8, 256, 16), 0);
  EXPECT_EQ(moekit_moe_align_capacity(-1, 2, 3, 2), -1);
  EXPECT_EQ(moekit_moe_align_capacity(3, -2, 3, 2), -1);
  EXPECT_EQ(moekit_moe_align_capacity(3, 2, -3, 2), -1);
  EXPECT_EQ(moekit_moe_align_capacity(3, 2, 3, 0), -1);
  EXPECT_EQ(moekit_moe_align_capacity(3, 2, 3, 1025), -1);
  EXPECT_EQ(moekit_moe_align_capacity(kHuge, 8, 256, 16), -1);
  EXPECT_EQ(moekit_moe_align_capacity(int64_t{1} << 40, int64_t{1} << 40, 256, 16), -1);
  EXPECT_EQ(moekit_moe_align_capacity(8, kHuge, 256, 16), -1);
}

class MoeAlignApi : public testing::Test {
 protected:
  static constexpr int64_t kE = 4, kBlock = 2;
  std::vector<int32_t> ids_ = {0, 1, 2, 3, 1, 2};  // [3, 2]
  std::vector<int32_t> map_ = {0, 1, -1, 2};
  const int64_t capacity_ = moekit_moe_align_capacity(3, 2, kE, kBlock);
  Sentinels out_;
  int32_t* sorted_ = out_.make<int32_t>(capacity_ * 2);
  int32_t* blocks_ = out_.make<int32_t>(capacity_);
  int32_t* rows_ = out_.make<int32_t>(2);
  moekit_tensor ids = make_tensor(ids_.data(), MOEKIT_I32, {3, 2});
  moekit_tensor map = make_tensor(map_.data(), MOEKIT_I32, {kE});
  moekit_tensor sorted = make_tensor(sorted_, MOEKIT_I32, {capacity_});
  moekit_tensor blocks = make_tensor(blocks_, MOEKIT_I32, {capacity_ / kBlock});
  moekit_tensor rows = make_tensor(rows_, MOEKIT_I32, {1});
};

TEST_F(MoeAlignApi, MoeAlign) {
  const char* fn = "moekit_moe_align";
  EXPECT_REJECTED(out_, moekit_moe_align(nullptr, kE, nullptr, kBlock, &sorted, &blocks, &rows),
                  fn, "ids", "is NULL");
  EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, nullptr, kBlock, nullptr, &blocks, &rows), fn,
                  "sorted_pairs", "is NULL");
  EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted, nullptr, &rows), fn,
                  "block_expert", "is NULL");
  EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted, &blocks, nullptr),
                  fn, "num_rows", "is NULL");
  for (int64_t bad : {int64_t{0}, int64_t{-4}, (int64_t{1} << 20) + 1, kHuge})
    EXPECT_REJECTED(out_, moekit_moe_align(&ids, bad, nullptr, kBlock, &sorted, &blocks, &rows),
                    fn, "num_experts", "out of range");
  for (int64_t bad : {int64_t{0}, int64_t{-1}, int64_t{1025}})
    EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, nullptr, bad, &sorted, &blocks, &rows), fn,
                    "block_m", "out of range");
  // ids out of range: negative and >= E.
  for (int32_t bad : {-1, 4, 1 << 30}) {
    std::vector<int32_t> v = ids_;
    v[3] = bad;
    moekit_tensor t = make_tensor(v.data(), MOEKIT_I32, {3, 2});
    EXPECT_REJECTED(out_, moekit_moe_align(&t, kE, nullptr, kBlock, &sorted, &blocks, &rows), fn,
                    "ids", "out of range");
  }
  std::vector<int64_t> ids64 = {0, 1, 2, 3, 1, int64_t{1} << 40};
  moekit_tensor t64 = make_tensor(ids64.data(), MOEKIT_I64, {3, 2});
  EXPECT_REJECTED(out_, moekit_moe_align(&t64, kE, nullptr, kBlock, &sorted, &blocks, &rows), fn,
                  "ids", "out of range");
  moekit_tensor ids_f32 = make_tensor(ids_.data(), MOEKIT_F32, {3, 2});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids_f32, kE, nullptr, kBlock, &sorted, &blocks, &rows),
                  fn, "ids", "not supported");
  moekit_tensor ids_1d = make_tensor(ids_.data(), MOEKIT_I32, {6});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids_1d, kE, nullptr, kBlock, &sorted, &blocks, &rows),
                  fn, "ids", "dimensions");
  // Expert map: dtype, shape, entries.
  moekit_tensor map64 = make_tensor(map_.data(), MOEKIT_I64, {kE / 2});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, &map64, kBlock, &sorted, &blocks, &rows), fn,
                  "expert_map", "not supported");
  moekit_tensor map3 = make_tensor(map_.data(), MOEKIT_I32, {kE - 1});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, &map3, kBlock, &sorted, &blocks, &rows), fn,
                  "expert_map", "does not match");
  for (int32_t bad : {-2, 4}) {
    std::vector<int32_t> m = map_;
    m[1] = bad;
    moekit_tensor tm = make_tensor(m.data(), MOEKIT_I32, {kE});
    EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, &tm, kBlock, &sorted, &blocks, &rows), fn,
                    "expert_map", "out of range");
  }
  // Outputs too small (the workspace of this op), of the wrong dtype, or overlapping.
  moekit_tensor sorted_small = make_tensor(sorted_, MOEKIT_I32, {capacity_ - 1});
  EXPECT_REJECTED(out_,
                  moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted_small, &blocks, &rows), fn,
                  "sorted_pairs", "needs");
  moekit_tensor blocks_small = make_tensor(blocks_, MOEKIT_I32, {capacity_ / kBlock - 1});
  EXPECT_REJECTED(out_,
                  moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted, &blocks_small, &rows), fn,
                  "block_expert", "needs");
  moekit_tensor rows0 = make_tensor(rows_, MOEKIT_I32, {0});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted, &blocks, &rows0), fn,
                  "num_rows", "one element");
  moekit_tensor sorted64 = make_tensor(sorted_, MOEKIT_I64, {capacity_});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted64, &blocks, &rows),
                  fn, "sorted_pairs", "not supported");
  moekit_tensor blocks_on_sorted = make_tensor(sorted_ + 2, MOEKIT_I32, {capacity_ / kBlock});
  EXPECT_REJECTED(
      out_, moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted, &blocks_on_sorted, &rows), fn,
      "sorted_pairs/block_expert/num_rows", "overlap");
  moekit_tensor rows_on_blocks = make_tensor(blocks_, MOEKIT_I32, {1});
  EXPECT_REJECTED(
      out_, moekit_moe_align(&ids, kE, nullptr, kBlock, &sorted, &blocks, &rows_on_blocks), fn,
      "sorted_pairs/block_expert/num_rows", "overlap");
  // More pairs than the i32 outputs can number (the ids are never read: a dummy buffer).
  moekit_tensor ids_many = make_tensor(ids_.data(), MOEKIT_I32, {int64_t{1} << 20, 1 << 12});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids_many, kE, nullptr, kBlock, &sorted, &blocks, &rows),
                  fn, "ids", "too many");
  moekit_tensor ids_huge = make_tensor(ids_.data(), MOEKIT_I32, {kHuge, 2});
  EXPECT_REJECTED(out_, moekit_moe_align(&ids_huge, kE, nullptr, kBlock, &sorted, &blocks, &rows),
                  fn, "ids", "too large");
}

// ids or expert_map inside an output: the sort would read its own output back as expert ids.
// The shared buffer holds valid ids (or map entries), so that only the overlap is wrong; it
// must come back unchanged, and the other outputs (sentinels) unwritten.
TEST_F(MoeAlignApi, InputsInsideOutputs) {
  const char* fn = "moekit_moe_align";
  const char* output_names[3] = {"sorted_pairs", "block_expert", "num_rows"};
  const int64_t lengths[3] = {capacity_, capacity_ / kBlock, 1};
  for (const char* input : {"ids", "expert_map"})
    for (int o = 0; o < 3; ++o) {
      const bool is_ids = std::string(input) == "ids";
      std::vector<int32_t> shared(capacity_, 0);
      std::copy((is_ids ? ids_ : map_).begin(), (is_ids ? ids_ : map_).end(), shared.begin());
      const std::vector<int32_t> before = shared;
      const moekit_tensor in = is_ids ? make_tensor(shared.data(), MOEKIT_I32, {3, 2})
                                      : make_tensor(shared.data(), MOEKIT_I32, {kE});
      moekit_tensor outs[3] = {sorted, blocks, rows};
      outs[o] = make_tensor(shared.data(), MOEKIT_I32, {lengths[o]});
      EXPECT_REJECTED(out_,
                      moekit_moe_align(is_ids ? &in : &ids, kE, is_ids ? nullptr : &in, kBlock,
                                       &outs[0], &outs[1], &outs[2]),
                      fn, input, std::string("overlaps ") + output_names[o]);
      EXPECT_EQ(shared, before) << input << " inside " << output_names[o];
    }
  // An empty ids tensor touches no memory, wherever its pointer lies.
  std::vector<int32_t> buffer(capacity_, -5);
  const moekit_tensor no_ids = make_tensor(buffer.data() + 1, MOEKIT_I32, {0, 2});
  moekit_tensor sorted_in_buffer = make_tensor(buffer.data(), MOEKIT_I32, {capacity_});
  reset_error();
  EXPECT_EQ(moekit_moe_align(&no_ids, kE, nullptr, kBlock, &sorted_in_buffer, &blocks, &rows),
            MOEKIT_OK)
      << moekit_last_error();
}

// ---- packing, workspace, fused MoE ---------------------------------------------------------

// Two f32 experts, H = 4, I = 2.
struct TinyExperts {
  static constexpr int64_t kE = 2, kH = 4, kI = 2;
  std::vector<float> w13 = moekit_test::random_ints(kI * kH, 5);
  std::vector<float> w2 = moekit_test::random_ints(kH * kI, 6);
  std::vector<float> scale = std::vector<float>(16, 1.0f);
  std::vector<const void*> w1p = {w13.data(), w13.data()}, w3p = w1p;
  std::vector<const void*> w2p = {w2.data(), w2.data()};
  std::vector<const float*> sp = {scale.data(), scale.data()};
  moekit_experts_desc desc() const {
    moekit_experts_desc d{};
    d.num_experts = kE;
    d.hidden = kH;
    d.inter = kI;
    d.dtype = MOEKIT_F32;
    d.w1 = w1p.data();
    d.w3 = w3p.data();
    d.w2 = w2p.data();
    return d;
  }
};

TEST(Api, ExpertsPack) {
  const char* fn = "moekit_experts_pack";
  TinyExperts t;
  Sentinels out;
  auto** handle = out.make<moekit_experts*>(1);
  const moekit_experts_desc good = t.desc();
  EXPECT_REJECTED(out, moekit_experts_pack(nullptr, MOEKIT_LAYOUT_AUTO, handle), fn, "desc",
                  "is NULL");
  EXPECT_REJECTED(out, moekit_experts_pack(&good, MOEKIT_LAYOUT_AUTO, nullptr), fn, "out",
                  "is NULL");
  moekit_experts_desc d = good;
  d.num_experts = 0;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn,
                  "desc.num_experts", "out of range");
  d = good;
  d.num_experts = -2;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn,
                  "desc.num_experts", "out of range");
  d = good;
  d.hidden = 0;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.hidden",
                  "out of range");
  d = good;
  d.inter = kHuge;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.inter",
                  "out of range");
  d = good;
  d.num_experts = int64_t{1} << 20;
  d.hidden = d.inter = int64_t{1} << 20;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc",
                  "too large");
  d = good;
  d.dtype = MOEKIT_I32;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.dtype",
                  "not supported");
  d.dtype = static_cast<moekit_dtype>(6);
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.dtype",
                  "not supported");
  // (layout: no spare value in its enum's range, 0..3, to test with.)
  d = good;
  d.w1 = nullptr;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.w1",
                  "is NULL");
  std::vector<const void*> holes = {t.w2.data(), nullptr};
  d = good;
  d.w2 = holes.data();
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.w2",
                  "expert 1 is NULL");
  // FP8 needs block sizes and scales.
  d = good;
  d.dtype = MOEKIT_FP8_E4M3;
  d.block_n = d.block_k = 128;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.w1_scale",
                  "is NULL");
  d.w1_scale = d.w3_scale = t.sp.data();
  std::vector<const float*> scale_holes = {t.scale.data(), nullptr};
  d.w2_scale = scale_holes.data();
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn, "desc.w2_scale",
                  "expert 1 is NULL");
  d.w2_scale = t.sp.data();
  d.block_k = 0;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn,
                  "desc.block_n/block_k", "positive");
  d.block_k = -128;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn,
                  "desc.block_n/block_k", "positive");
  d.block_k = std::numeric_limits<int64_t>::max();  // ceil(K / block_k) must not overflow
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn,
                  "desc.block_n/block_k", "exceed");
  d.block_k = 128;
  d.block_n = kHuge;
  EXPECT_REJECTED(out, moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, handle), fn,
                  "desc.block_n/block_k", "exceed");
  // A layout this build or CPU cannot make is an error naming the layout (when one exists).
  for (moekit_pack_layout layout : {MOEKIT_LAYOUT_VNNI, MOEKIT_LAYOUT_AMX}) {
    moekit_experts* h = nullptr;
    reset_error();
    const moekit_status s = moekit_experts_pack(&good, layout, &h);
    if (s == MOEKIT_OK) {
      EXPECT_EQ(moekit_experts_layout(h), layout);
      moekit_experts_free(h);
    } else {
      EXPECT_EQ(s, MOEKIT_ERR_UNSUPPORTED) << moekit_last_error();
      EXPECT_TRUE(Rejected(s, fn, "layout", moekit_pack_layout_name(layout)));
      EXPECT_EQ(h, nullptr);
    }
  }
  // Success, and the handle queries.
  moekit_experts* h = nullptr;
  ASSERT_EQ(moekit_experts_pack(&good, MOEKIT_LAYOUT_PLAIN, &h), MOEKIT_OK) << moekit_last_error();
  EXPECT_EQ(moekit_experts_layout(h), MOEKIT_LAYOUT_PLAIN);
  EXPECT_GE(moekit_experts_bytes(h), size_t{2 * 3 * 8 * 4});
  moekit_experts_free(h);
  moekit_experts_free(nullptr);  // like free(NULL)
  EXPECT_EQ(moekit_experts_layout(nullptr), MOEKIT_LAYOUT_AUTO);
  EXPECT_EQ(moekit_experts_bytes(nullptr), 0u);
}

TEST(Api, Workspace) {
  const char* fn = "moekit_workspace_create";
  Sentinels out;
  auto** ws = out.make<moekit_workspace*>(1);
  EXPECT_REJECTED(out, moekit_workspace_create(64, nullptr), fn, "out", "is NULL");
  // Sizes no allocation can satisfy fail cleanly (and do not wrap around to a tiny buffer).
  for (size_t bytes : {std::numeric_limits<size_t>::max(), std::numeric_limits<size_t>::max() - 10,
                       size_t{1} << 62}) {
    reset_error();
    const moekit_status s = moekit_workspace_create(bytes, ws);
    EXPECT_NE(s, MOEKIT_OK) << bytes;
    EXPECT_TRUE(Rejected(s, fn, "bytes", "")) << bytes;
    EXPECT_TRUE(out.untouched());
  }
  moekit_workspace* w = nullptr;
  ASSERT_EQ(moekit_workspace_create(0, &w), MOEKIT_OK);
  moekit_workspace_free(w);
  ASSERT_EQ(moekit_workspace_create(1000, &w), MOEKIT_OK);
  moekit_workspace_free(w);
  moekit_workspace_free(nullptr);
  // Size queries: bad arguments give 0; sizes grow with M.
  EXPECT_EQ(moekit_moe_workspace_size(-1, 8, 3072, 1536, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size(1, -8, 3072, 1536, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size(1, 8, -1, 1536, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size(1, 8, 3072, -1, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size(kHuge, 8, 3072, 1536, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size(int64_t{1} << 40, 1024, 1 << 20, 1 << 20, 2), 0u);
  EXPECT_LE(moekit_moe_workspace_size(1, 8, 3072, 1536, 2),
            moekit_moe_workspace_size(64, 8, 3072, 1536, 2));
}

class FusedMoeApi : public testing::Test {
 protected:
  void SetUp() override {
    const moekit_experts_desc d = tiny_.desc();
    ASSERT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &experts_), MOEKIT_OK);
  }
  void TearDown() override { moekit_experts_free(experts_); }

  static constexpr int64_t kM = 3, kK = 2, kH = TinyExperts::kH;
  TinyExperts tiny_;
  moekit_experts* experts_ = nullptr;
  std::vector<float> x_ = moekit_test::random_ints(kM * kH, 7);
  std::vector<float> tw_ = std::vector<float>(kM * kK, 0.5f);
  std::vector<int32_t> ti_ = {0, 1, 1, 0, 0, 1};
  std::vector<int32_t> map_ = {0, -1, 1};
  Sentinels out_;
  float* y_ = out_.make<float>(kM * kH * 2);
  moekit_tensor x = make_tensor(x_.data(), MOEKIT_F32, {kM, kH});
  moekit_tensor tw = make_tensor(tw_.data(), MOEKIT_F32, {kM, kK});
  moekit_tensor ti = make_tensor(ti_.data(), MOEKIT_I32, {kM, kK});
  moekit_tensor y = make_tensor(y_, MOEKIT_F32, {kM, kH});
};

TEST_F(FusedMoeApi, FusedMoe) {
  const char* fn = "moekit_fused_moe";
  EXPECT_REJECTED(out_, moekit_fused_moe(nullptr, &x, &tw, &ti, nullptr, nullptr, &y), fn,
                  "experts", "is NULL");
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, nullptr, &tw, &ti, nullptr, nullptr, &y), fn,
                  "hidden", "is NULL");
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, nullptr, &ti, nullptr, nullptr, &y), fn,
                  "topk_weights", "is NULL");
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, nullptr, nullptr, nullptr, &y), fn,
                  "topk_ids", "is NULL");
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, nullptr, nullptr), fn,
                  "out", "is NULL");
  // Shapes.
  moekit_tensor x5 = make_tensor(x_.data(), MOEKIT_F32, {kM, kH - 1});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x5, &tw, &ti, nullptr, nullptr, &y), fn,
                  "hidden", "does not match");
  moekit_tensor tw_rows = make_tensor(tw_.data(), MOEKIT_F32, {kM - 1, kK});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw_rows, &ti, nullptr, nullptr, &y), fn,
                  "topk_weights", "does not match");
  moekit_tensor tw_k0 = make_tensor(tw_.data(), MOEKIT_F32, {kM, 0});
  moekit_tensor ti_k0 = make_tensor(ti_.data(), MOEKIT_I32, {kM, 0});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw_k0, &ti_k0, nullptr, nullptr, &y), fn,
                  "topk_weights", "k = 0");
  moekit_tensor ti_k1 = make_tensor(ti_.data(), MOEKIT_I32, {kM, 1});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti_k1, nullptr, nullptr, &y), fn,
                  "topk_ids", "does not match");
  // k > E: 3 slots over 2 experts.
  std::vector<float> tw3(kM * 3, 0.3f);
  std::vector<int32_t> ti3(kM * 3, 0);
  moekit_tensor tw_k3 = make_tensor(tw3.data(), MOEKIT_F32, {kM, 3});
  moekit_tensor ti_k3 = make_tensor(ti3.data(), MOEKIT_I32, {kM, 3});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw_k3, &ti_k3, nullptr, nullptr, &y), fn,
                  "topk_ids", "exceeds the 2 experts");
  moekit_tensor y_wrong = make_tensor(y_, MOEKIT_F32, {kM + 1, kH});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, nullptr, &y_wrong), fn,
                  "out", "does not match");
  // Dtypes.
  moekit_tensor x_fp8 = make_tensor(x_.data(), MOEKIT_FP8_E4M3, {kM, kH});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x_fp8, &tw, &ti, nullptr, nullptr, &y), fn,
                  "hidden", "not supported");
  moekit_tensor x_i32 = make_tensor(x_.data(), MOEKIT_I32, {kM, kH});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x_i32, &tw, &ti, nullptr, nullptr, &y), fn,
                  "hidden", "not supported");
  moekit_tensor tw_bf16 = make_tensor(tw_.data(), MOEKIT_BF16, {kM, kK});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw_bf16, &ti, nullptr, nullptr, &y), fn,
                  "topk_weights", "not supported");
  moekit_tensor ti_f32 = make_tensor(ti_.data(), MOEKIT_F32, {kM, kK});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti_f32, nullptr, nullptr, &y), fn,
                  "topk_ids", "not supported");
  moekit_tensor y_i32 = make_tensor(y_, MOEKIT_I32, {kM, kH});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, nullptr, &y_i32), fn,
                  "out", "not supported");
  // ids out of range: negative and >= E (E = 2 without a map, 3 with the map below).
  for (int32_t bad : {-1, 2, 1 << 30}) {
    std::vector<int32_t> v = ti_;
    v[5] = bad;
    moekit_tensor t = make_tensor(v.data(), MOEKIT_I32, {kM, kK});
    EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &t, nullptr, nullptr, &y), fn,
                    "topk_ids", "out of range");
  }
  std::vector<int64_t> ti64 = {0, 1, 1, 0, 0, -5};
  moekit_tensor t64 = make_tensor(ti64.data(), MOEKIT_I64, {kM, kK});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &t64, nullptr, nullptr, &y), fn,
                  "topk_ids", "out of range");
  // Expert map: global ids may reach its length; entries must name local experts or -1.
  moekit_tensor map = make_tensor(map_.data(), MOEKIT_I32, {3});
  std::vector<int32_t> ti_global = {0, 2, 2, 1, 0, 3};
  moekit_tensor tg = make_tensor(ti_global.data(), MOEKIT_I32, {kM, kK});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &tg, &map, nullptr, &y), fn,
                  "topk_ids", "out of range [0, 3)");
  for (int32_t bad : {-2, 2}) {
    std::vector<int32_t> m = map_;
    m[0] = bad;
    moekit_tensor tm = make_tensor(m.data(), MOEKIT_I32, {3});
    EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti, &tm, nullptr, &y), fn,
                    "expert_map", "out of range");
  }
  moekit_tensor map_i64 = make_tensor(map_.data(), MOEKIT_I64, {1});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti, &map_i64, nullptr, &y), fn,
                  "expert_map", "not supported");
  // Strides and sizes.
  moekit_tensor x_strided = make_tensor(x_.data(), MOEKIT_F32, {kM, kH}, {kH, 2});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x_strided, &tw, &ti, nullptr, nullptr, &y),
                  fn, "hidden", "innermost stride");
  moekit_tensor y_rows = make_tensor(y_, MOEKIT_F32, {kM, kH}, {kH - 1, 1});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, nullptr, &y_rows), fn,
                  "out", "smaller than the rows");
  moekit_tensor x_neg = make_tensor(x_.data(), MOEKIT_F32, {-kM, kH});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x_neg, &tw, &ti, nullptr, nullptr, &y), fn,
                  "hidden", "negative");
  moekit_tensor x_huge = make_tensor(x_.data(), MOEKIT_F32, {kHuge, kH});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x_huge, &tw, &ti, nullptr, nullptr, &y), fn,
                  "hidden", "too large");
  // The output over an input.
  moekit_tensor x_on_y = make_tensor(y_, MOEKIT_F32, {kM, kH});
  moekit_tensor y_shift = make_tensor(y_ + 1, MOEKIT_F32, {kM, kH});
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x_on_y, &tw, &ti, nullptr, nullptr, &y_shift),
                  fn, "out", "overlaps an input");
  // The expert map inside out. The map's entries must be valid, so out's first elements hold
  // them here; the buffer must come back unchanged.
  std::vector<float> y_with_map(kM * kH, 0.0f);
  std::memcpy(y_with_map.data(), map_.data(), map_.size() * sizeof(int32_t));
  const std::vector<float> before = y_with_map;
  moekit_tensor map_in_y = make_tensor(y_with_map.data(), MOEKIT_I32, {3});
  moekit_tensor y_over_map = make_tensor(y_with_map.data(), MOEKIT_F32, {kM, kH});
  reset_error();
  EXPECT_TRUE(Rejected(moekit_fused_moe(experts_, &x, &tw, &ti, &map_in_y, nullptr, &y_over_map),
                       fn, "expert_map", "overlaps out"));
  EXPECT_EQ(std::memcmp(y_with_map.data(), before.data(), before.size() * sizeof(float)), 0);
  reset_error();
  EXPECT_TRUE(Rejected(moekit_fused_moe_shared(experts_, nullptr, nullptr, &x, &tw, &ti, &map_in_y,
                                               nullptr, &y_over_map),
                       "moekit_fused_moe_shared", "expert_map", "overlaps out"));
  EXPECT_EQ(std::memcmp(y_with_map.data(), before.data(), before.size() * sizeof(float)), 0);
}

TEST_F(FusedMoeApi, WorkspaceTooSmall) {
  const char* fn = "moekit_fused_moe";
  // A workspace smaller than moekit_moe_workspace_size says.
  const size_t need = moekit_moe_workspace_size(kM, kK, kH, TinyExperts::kI, 0);
  if (need == 0) {
    GTEST_SKIP() << "this build's fused MoE needs no workspace; nothing to undersize";
  }
  // Smaller than one thread needs: refused.
  const size_t need_one = moekit_moe_workspace_size(kM, kK, kH, TinyExperts::kI, 1);
  ASSERT_GT(need_one, size_t{0});
  moekit_workspace* ws = nullptr;
  ASSERT_EQ(moekit_workspace_create(need_one - 1, &ws), MOEKIT_OK);
  EXPECT_REJECTED(out_, moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, ws, &y), fn, "ws",
                  "moekit_moe_workspace_size");
  moekit_workspace_free(ws);
  // One of exactly the size works.
  ASSERT_EQ(moekit_workspace_create(need, &ws), MOEKIT_OK);
  EXPECT_EQ(moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, ws, &y), MOEKIT_OK)
      << moekit_last_error();
  const std::vector<float> full(y_, y_ + kM * kH);
  moekit_workspace_free(ws);
  // One sized for fewer threads than the call runs on (as if moekit_set_num_threads was raised
  // after it was made) is refused, naming the size and the thread count.
  if (moekit_num_threads() > 1 && need_one < need) {
    ASSERT_EQ(moekit_workspace_create(need_one, &ws), MOEKIT_OK);
    std::fill(y_, y_ + kM * kH, -1.0f);
    reset_error();
    const std::string threads = "on " + std::to_string(moekit_num_threads()) + " threads";
    EXPECT_TRUE(Rejected(moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, ws, &y), fn, "ws",
                         threads.c_str()));
    EXPECT_EQ(std::vector<float>(y_, y_ + kM * kH), std::vector<float>(kM * kH, -1.0f));
    moekit_workspace_free(ws);
  }
  ASSERT_EQ(moekit_workspace_create(need, &ws), MOEKIT_OK);
  // A workspace in use by another call is refused, not shared (white box: the flag the entry
  // point sets for the length of a call).
  ws->busy = true;
  std::fill(y_, y_ + kM * kH, -1.0f);
  reset_error();
  EXPECT_TRUE(Rejected(moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, ws, &y), fn, "ws",
                       "in use by another call"));
  EXPECT_EQ(std::vector<float>(y_, y_ + kM * kH), std::vector<float>(kM * kH, -1.0f));
  ws->busy = false;
  EXPECT_EQ(moekit_fused_moe(experts_, &x, &tw, &ti, nullptr, ws, &y), MOEKIT_OK);
  EXPECT_EQ(std::vector<float>(y_, y_ + kM * kH), full);
  moekit_workspace_free(ws);
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

// Bytes of address space this process has mapped (what RLIMIT_AS limits), 0 if unknown.
size_t mapped_bytes() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0;
  statm >> pages;
  return pages * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// Without a workspace the call allocates its own scratch; when it cannot, the call must return
// MOEKIT_ERR_OUT_OF_MEMORY and write nothing. A forked child makes the failure real: it limits
// its address space (RLIMIT_AS) to what it has mapped plus half the scratch, so that the scratch
// cannot fit while the small allocations of an error message still can.
TEST(Api, FusedMoeOutOfMemoryWithoutWorkspace) {
  if (kSanitized) GTEST_SKIP() << "sanitizers reserve their address space up front";
  // One f32 expert, H = 256, I = 16, k = 1, 32768 bf16 tokens: hidden and out take 16 MiB each,
  // the scratch about 66 MiB.
  constexpr int64_t kM = 32768, kH = 256, kI = 16;
  std::vector<float> w13(kI * kH, 0.01f), w2(kH * kI, 0.01f);
  const void* p13[1] = {w13.data()};
  const void* p2[1] = {w2.data()};
  moekit_experts_desc d{};
  d.num_experts = 1;
  d.hidden = kH;
  d.inter = kI;
  d.dtype = MOEKIT_F32;
  d.w1 = d.w3 = p13;
  d.w2 = p2;
  moekit_experts* experts = nullptr;
  ASSERT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &experts), MOEKIT_OK)
      << moekit_last_error();
  std::vector<uint16_t> x(kM * kH, 0x3f80);  // 1.0
  std::vector<float> tw(kM, 1.0f);
  std::vector<int32_t> ti(kM, 0);
  Sentinels out;
  uint16_t* y = out.make<uint16_t>(kM * kH);
  moekit_tensor tx = make_tensor(x.data(), MOEKIT_BF16, {kM, kH});
  moekit_tensor ttw = make_tensor(tw.data(), MOEKIT_F32, {kM, 1});
  moekit_tensor tti = make_tensor(ti.data(), MOEKIT_I32, {kM, 1});
  moekit_tensor ty = make_tensor(y, MOEKIT_BF16, {kM, kH});
  const size_t need = moekit_moe_workspace_size(kM, 1, kH, kI, 0);
  ASSERT_GT(need, size_t{32} << 20);
  const auto call = [&] {
    return moekit_fused_moe(experts, &tx, &ttw, &tti, nullptr, nullptr, &ty);
  };

  // The child's exit code names the first check that failed; its stderr says more.
  const auto child = [&]() -> int {
    reset_error();  // this thread's first allocations, before the limit
    const size_t mapped = mapped_bytes();
    if (mapped == 0) return 2;
    rlimit limit;
    if (getrlimit(RLIMIT_AS, &limit) != 0) return 2;
    limit.rlim_cur = std::min<rlim_t>(limit.rlim_cur, mapped + need / 2);
    if (setrlimit(RLIMIT_AS, &limit) != 0) return 2;
    // Query mode computes nothing and needs no scratch.
    moekit_set_query_only(1);
    const moekit_status query = call();
    moekit_set_query_only(0);
    if (query != MOEKIT_OK) {
      std::fprintf(stderr, "query mode: %s\n", moekit_last_error());
      return 3;
    }
    const moekit_status s = call();
    if (!Rejected(s, "moekit_fused_moe", "ws", "cannot be allocated")) {
      std::fprintf(stderr, "status %s: '%s'\n", moekit_status_name(s), moekit_last_error());
      return 4;
    }
    if (s != MOEKIT_ERR_OUT_OF_MEMORY) return 5;
    if (!out.untouched()) return 6;
    return 0;
  };
  // In a fresh thread: its per-thread scratch is empty, whatever earlier tests grew on this one.
  EXPECT_EXIT(
      {
        int code = 1;
        std::thread([&] { code = child(); }).join();
        std::_Exit(code);
      },
      testing::ExitedWithCode(0), "");

  // Without the limit the same call runs (so the child failed for want of memory only).
  moekit_status unlimited = MOEKIT_ERR_INTERNAL;
  std::thread([&] { unlimited = call(); }).join();  // frees its scratch when it ends
  EXPECT_EQ(unlimited, MOEKIT_OK);
  EXPECT_FALSE(out.untouched());
  moekit_experts_free(experts);
}

}  // namespace
