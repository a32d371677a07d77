// The C++ layer (moekit.hpp): errors become exceptions carrying the C message, handles are
// owned, and calls reach the same kernels as the C API.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "moekit/moekit.hpp"

namespace {

TEST(CppApi, RmsnormComputesAndThrowsOnBadInput) {
  std::vector<float> x = {3.0f, 4.0f}, w = {1.0f, 2.0f}, y(2, 0.0f);
  moekit_tensor tx = moekit::tensor(x.data(), MOEKIT_F32, {1, 2});
  moekit_tensor tw = moekit::tensor(w.data(), MOEKIT_F32, {2});
  moekit_tensor ty = moekit::tensor(y.data(), MOEKIT_F32, {1, 2});
  moekit::rmsnorm(tx, tw, 0.0f, ty);
  // rms = sqrt((9 + 16) / 2) = 3.5355...
  EXPECT_NEAR(y[0], 3.0 / std::sqrt(12.5), 1e-6);
  EXPECT_NEAR(y[1], 8.0 / std::sqrt(12.5), 1e-6);

  moekit_tensor short_w = moekit::tensor(w.data(), MOEKIT_F32, {1});
  try {
    moekit::rmsnorm(tx, short_w, 0.0f, ty);
    FAIL() << "expected moekit::Error";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.status(), MOEKIT_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("weight"), std::string::npos) << e.what();
  }
}

TEST(CppApi, ExpertsAndWorkspaceAreOwned) {
  // One expert, H = 2, I = 1: gate row [1, 0], up row [0, 1], down column [1, 1].
  std::vector<float> w1 = {1.0f, 0.0f}, w3 = {0.0f, 1.0f}, w2 = {1.0f, 1.0f};
  const void* p1[] = {w1.data()};
  const void* p3[] = {w3.data()};
  const void* p2[] = {w2.data()};
  moekit_experts_desc desc{};
  desc.num_experts = 1;
  desc.hidden = 2;
  desc.inter = 1;
  desc.dtype = MOEKIT_F32;
  desc.w1 = p1;
  desc.w3 = p3;
  desc.w2 = p2;
  moekit::Experts experts = moekit::pack_experts(desc);
  ASSERT_NE(experts.get(), nullptr);
  moekit::Workspace ws = moekit::make_workspace(1, 1, 2, 1);
  ASSERT_NE(ws.get(), nullptr);

  std::vector<float> x = {2.0f, 3.0f}, weights = {0.5f}, out(2, NAN);
  std::vector<int32_t> ids = {0};
  moekit_tensor tx = moekit::tensor(x.data(), MOEKIT_F32, {1, 2});
  moekit_tensor tw = moekit::tensor(weights.data(), MOEKIT_F32, {1, 1});
  moekit_tensor ti = moekit::tensor(ids.data(), MOEKIT_I32, {1, 1});
  moekit_tensor to = moekit::tensor(out.data(), MOEKIT_F32, {1, 2});
  moekit::fused_moe(experts, tx, tw, ti, nullptr, ws.get(), to);
  // gate = 2, up = 3, silu(2) * 3 = 2 / (1 + e^-2) * 3; times 0.5, into both outputs.
  const double expected = 0.5 * 3.0 * 2.0 / (1.0 + std::exp(-2.0));
  EXPECT_NEAR(out[0], expected, 1e-5);
  EXPECT_NEAR(out[1], expected, 1e-5);
}

// Runs `f`, which must throw moekit::Error with MOEKIT_ERR_INVALID_ARGUMENT and a message
// holding `words`.
template <class F>
void expect_invalid(F f, const std::string& words) {
  try {
    f();
    ADD_FAILURE() << "expected moekit::Error mentioning '" << words << "'";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.status(), MOEKIT_ERR_INVALID_ARGUMENT) << e.what();
    EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
  }
}

TEST(CppApi, MakeWorkspaceThrowsForSizesOutOfRange) {
  expect_invalid([] { moekit::make_workspace(-1, 2, 64, 32); }, "(M, k, H, I) = (-1, 2, 64, 32)");
  expect_invalid([] { moekit::make_workspace(3, 5000, 64, 32); }, "out of range");
  expect_invalid([] { moekit::make_workspace(3, 2, 64, 32, -1, 16); },
                 "(M, k, H, I, S, I_s) = (3, 2, 64, 32, -1, 16)");
  // In range, including M = 0 and no shared experts: a usable workspace.
  EXPECT_NE(moekit::make_workspace(0, 2, 64, 32).get(), nullptr);
  EXPECT_NE(moekit::make_workspace(3, 2, 64, 32, 0, 16).get(), nullptr);
}

TEST(CppApi, TensorTakesNullDataAndWholeStrides) {
  // nullptr picks its own overload (void* and const void* would be ambiguous).
  const moekit_tensor empty = moekit::tensor(nullptr, MOEKIT_F32, {0, 4});
  EXPECT_EQ(empty.data, nullptr);
  EXPECT_EQ(empty.ndim, 2);
  EXPECT_EQ(empty.shape[1], 4);
  std::vector<float> x(3 * 8);
  const moekit_tensor strided = moekit::tensor(x.data(), MOEKIT_F32, {3, 4}, {8, 1});
  EXPECT_EQ(strided.strides[0], 8);
  EXPECT_EQ(strided.strides[1], 1);
  // A stride per dimension or none: one stride for two dimensions would leave the inner one 0.
  auto outer_stride_only = [&] { moekit::tensor(x.data(), MOEKIT_F32, {3, 4}, {8}); };
  expect_invalid(outer_stride_only, "1 strides given for a 2-D shape");
  auto extra_stride = [&] { moekit::tensor(x.data(), MOEKIT_F32, {3}, {1, 1}); };
  expect_invalid(extra_stride, "2 strides given for a 1-D shape");
  auto five_dims = [&] { moekit::tensor(x.data(), MOEKIT_F32, {1, 1, 1, 1, 1}); };
  expect_invalid(five_dims, "a 5-D shape");
}

}  // namespace
