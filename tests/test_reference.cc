// Hand-computed cases for every op, run through the public C API once per ISA level this CPU
// has (capped with moekit_set_max_isa), so the expected numbers below check whatever each level
// dispatches to; the scalar pass reaches the reference. The arithmetic is worked in comments.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <limits>
#include <string>
#include <vector>

#include "moekit/moekit.h"
#include "reference/numeric.h"
#include "test_util.h"

namespace {

using moekit::bf16_to_f32;
using moekit::f32_to_bf16;
using moekit::fp8_e4m3_to_f32;
using moekit_test::make_tensor;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// True while for_each_level runs its forced-reference pass.
bool g_reference_pass = false;

// Restores the detected level and normal dispatch when a test ends, even after a failed ASSERT.
struct LevelGuard {
  ~LevelGuard() {
    moekit::set_force_reference(false);
    g_reference_pass = false;
    moekit_set_max_isa(moekit_detected_isa());
  }
};

// Runs `body` first on the reference (forced through the internal test hook, since a portable
// fast kernel may win at the scalar level), then once per level from scalar up to the detected
// one. `op` is the op the body calls.
template <class Body>
void for_each_level(const char* op, Body body) {
  LevelGuard guard;
  {
    SCOPED_TRACE("reference forced");
    moekit::set_force_reference(true);
    g_reference_pass = true;
    body();
    g_reference_pass = false;
    moekit::set_force_reference(false);
    EXPECT_EQ(std::string(moekit_last_impl(op)).rfind("ref", 0), 0u)
        << op << " ran " << moekit_last_impl(op);
  }
  for (int level = MOEKIT_ISA_SCALAR; level <= moekit_detected_isa(); ++level) {
    ASSERT_EQ(moekit_set_max_isa(static_cast<moekit_isa>(level)), MOEKIT_OK);
    SCOPED_TRACE(std::string("level ") + moekit_isa_name(static_cast<moekit_isa>(level)));
    body();
  }
}

// Names the implementation that served `op`, for failure messages.
#define TRACE_IMPL(op) SCOPED_TRACE(std::string("impl ") + moekit_last_impl(op))

// bf16 bit patterns of a list of floats.
std::vector<uint16_t> f32_to_bf16_vec(std::initializer_list<float> v) {
  return moekit_test::to_bf16(std::vector<float>(v));
}

double silu(double z) { return z / (1.0 + std::exp(-z)); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// ---- number formats ------------------------------------------------------------------------

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

TEST(Numeric, Bf16RoundsToNearestEven) {
  // 1.0 = 0x3F800000. bf16 keeps 7 mantissa bits, so 1 + 2^-8 is exactly half way between
  // 0x3F80 (even) and 0x3F81 (odd): ties go to the even one.
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f), 0x3F80);
  // 1 + 3*2^-8 is half way between 0x3F81 (odd) and 0x3F82 (even): up to 0x3F82.
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);
  // Just above half way rounds up, just below rounds down.
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3F81);
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f - 0x1p-20f), 0x3F80);
  // 1.2f = 0x3F99999A: the dropped half 0x999A is above 0x8000, so up: 0x3F9A = 1.203125.
  EXPECT_EQ(f32_to_bf16(1.2f), 0x3F9A);
  EXPECT_EQ(bf16_to_f32(0x3F9A), 1.203125f);
  // Negative values round the magnitude the same way.
  EXPECT_EQ(f32_to_bf16(-(1.0f + 3 * 0x1p-8f)), 0xBF82);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  // Infinities stay infinite; the largest float rounds up to infinity (RNE overflow).
  EXPECT_EQ(f32_to_bf16(kInf), 0x7F80);
  EXPECT_EQ(f32_to_bf16(-kInf), 0xFF80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  // NaN stays NaN, including a signalling NaN whose payload lives only in the low 16 bits
  // (truncation would turn 0x7F800001 into infinity).
  for (uint32_t nan_bits : {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu}) {
    const uint16_t h = f32_to_bf16(float_of(nan_bits));
    EXPECT_TRUE(std::isnan(bf16_to_f32(h))) << std::hex << nan_bits << " -> " << h;
    EXPECT_EQ(h & 0x8000, (nan_bits >> 16) & 0x8000) << "sign kept";
  }
  // Round trip of values bf16 holds exactly.
  for (float v : {0.0f, 1.0f, -2.5f, 256.0f, 0x1p-126f, 3.0f * 0x1p100f})
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(v)), v);
}

TEST(Numeric, Fp8E4m3DecodesByHand) {
  // S EEEE MMM, bias 7. 0x00: +0.
  EXPECT_EQ(fp8_e4m3_to_f32(0x00), 0.0f);
  EXPECT_FALSE(std::signbit(fp8_e4m3_to_f32(0x00)));
  // 0x80: -0.
  EXPECT_EQ(fp8_e4m3_to_f32(0x80), 0.0f);
  EXPECT_TRUE(std::signbit(fp8_e4m3_to_f32(0x80)));
  // 0x01: smallest subnormal, 1/8 * 2^(1-7) = 2^-9.
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), 0x1p-9f);
  // 0x07: largest subnormal, 7/8 * 2^-6.
  EXPECT_EQ(fp8_e4m3_to_f32(0x07), 7 * 0x1p-9f);
  // 0x08: E=1, M=0: smallest normal 2^(1-7) = 2^-6.
  EXPECT_EQ(fp8_e4m3_to_f32(0x08), 0x1p-6f);
  // 0x38 = 0 0111 000: 2^(7-7) = 1.
  EXPECT_EQ(fp8_e4m3_to_f32(0x38), 1.0f);
  // 0xB8: -1. 0x3C = 0 0111 100: 1.5.
  EXPECT_EQ(fp8_e4m3_to_f32(0xB8), -1.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x3C), 1.5f);
  // 0x78 = 0 1111 000: E=15 is still finite in e4m3fn: 2^8 = 256.
  EXPECT_EQ(fp8_e4m3_to_f32(0x78), 256.0f);
  // 0x7E = 0 1111 110: 1.75 * 2^8 = 448, the largest finite value.
  EXPECT_EQ(fp8_e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0xFE), -448.0f);
  // S.1111.111 is NaN; there are no infinities.
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(0xFF)));
  int nans = 0;
  for (int v = 0; v < 256; ++v) {
    const float f = fp8_e4m3_to_f32(static_cast<uint8_t>(v));
    EXPECT_FALSE(std::isinf(f)) << v;
    nans += std::isnan(f);
  }
  EXPECT_EQ(nans, 2);
}

// ---- RMSNorm family ------------------------------------------------------------------------

TEST(Rmsnorm, F32RowByHand) {
  for_each_level("rmsnorm", [] {
    // x = [2, -2, 2, -2]: mean(x^2) = 4, rms = 2, x / rms = [1, -1, 1, -1];
    // times w = [1, 2, 0.5, -1] gives [1, -2, 0.5, 1]. eps = 0 keeps it exact.
    std::vector<float> x = {2, -2, 2, -2}, w = {1, 2, 0.5f, -1}, y(4, kNaN);
    moekit_tensor tx = make_tensor(x.data(), MOEKIT_F32, {1, 4});
    moekit_tensor tw = make_tensor(w.data(), MOEKIT_F32, {4});
    moekit_tensor ty = make_tensor(y.data(), MOEKIT_F32, {1, 4});
    ASSERT_EQ(moekit_rmsnorm(&tx, &tw, 0.0f, &ty), MOEKIT_OK) << moekit_last_error();
    TRACE_IMPL("rmsnorm");
    EXPECT_EQ(y, (std::vector<float>{1, -2, 0.5f, 1}));

    // eps sits inside the root: x = [1, 1, 1, 1], eps = 3: sqrt(1 + 3) = 2, y = 0.5.
    std::vector<float> ones(4, 1.0f), w1(4, 1.0f);
    moekit_tensor tones = make_tensor(ones.data(), MOEKIT_F32, {1, 4});
    moekit_tensor tw1 = make_tensor(w1.data(), MOEKIT_F32, {4});
    ASSERT_EQ(moekit_rmsnorm(&tones, &tw1, 3.0f, &ty), MOEKIT_OK);
    EXPECT_EQ(y, (std::vector<float>(4, 0.5f)));

    // x = [3, 4, 0, 0]: mean(x^2) = 25/4, rms = 2.5, y = [1.2, 1.6, 0, 0].
    std::vector<float> x34 = {3, 4, 0, 0};
    moekit_tensor tx34 = make_tensor(x34.data(), MOEKIT_F32, {1, 4});
    ASSERT_EQ(moekit_rmsnorm(&tx34, &tw1, 0.0f, &ty), MOEKIT_OK);
    EXPECT_FLOAT_EQ(y[0], 1.2f);
    EXPECT_FLOAT_EQ(y[1], 1.6f);
    EXPECT_EQ(y[2], 0.0f);
    EXPECT_EQ(y[3], 0.0f);
  });
}

TEST(Rmsnorm, Bf16InPlaceByHand) {
  for_each_level("rmsnorm", [] {
    // Row 0 as in the f32 case (exact in bf16); row 1 = [3, 4, 0, 0] gives 1.2 and 1.6, which
    // bf16 rounds to nearest even: 1.2 -> 0x3F9A (1.203125), 1.6 = 0x3FCCCCCD -> 0x3FCD.
    // Rows are strided (stride 6) to check the row step; the gap must stay untouched.
    std::vector<uint16_t> x = f32_to_bf16_vec({2, -2, 2, -2, 99, 99, 3, 4, 0, 0, 99, 99});
    std::vector<uint16_t> w = f32_to_bf16_vec({1, 2, 0.5f, -1});
    moekit_tensor tx = make_tensor(x.data(), MOEKIT_BF16, {2, 4}, {6, 1});
    moekit_tensor tw = make_tensor(w.data(), MOEKIT_BF16, {4});
    ASSERT_EQ(moekit_rmsnorm(&tx, &tw, 0.0f, &tx), MOEKIT_OK) << moekit_last_error();
    TRACE_IMPL("rmsnorm");
    EXPECT_EQ(bf16_to_f32(x[0]), 1.0f);
    EXPECT_EQ(bf16_to_f32(x[1]), -2.0f);
    EXPECT_EQ(bf16_to_f32(x[2]), 0.5f);
    EXPECT_EQ(bf16_to_f32(x[3]), 1.0f);
    EXPECT_EQ(bf16_to_f32(x[4]), 99.0f);
    // 1.2 * w0 = 1.2 -> 0x3F9A; 1.6 * w1 = 3.2 = 0x404CCCCD -> 0x404D; 0 * 0.5; 0 * -1 = -0.
    EXPECT_EQ(x[6], 0x3F9A);
    EXPECT_EQ(x[7], 0x404D);
    EXPECT_EQ(bf16_to_f32(x[8]), 0.0f);
    EXPECT_EQ(bf16_to_f32(x[9]), 0.0f);
    EXPECT_EQ(bf16_to_f32(x[10]), 99.0f);
  });
}

TEST(Rmsnorm, Bf16InputF32OutputAndMixedWeight) {
  for_each_level("rmsnorm", [] {
    // bf16 x and f32 weight into an f32 y: [3, 4, 0, 0] -> [1.2, 1.6, 0, 0] * [2, 1, 1, 1].
    std::vector<uint16_t> x = f32_to_bf16_vec({3, 4, 0, 0});
    std::vector<float> w = {2, 1, 1, 1}, y(4, kNaN);
    moekit_tensor tx = make_tensor(x.data(), MOEKIT_BF16, {1, 4});
    moekit_tensor tw = make_tensor(w.data(), MOEKIT_F32, {4});
    moekit_tensor ty = make_tensor(y.data(), MOEKIT_F32, {1, 4});
    ASSERT_EQ(moekit_rmsnorm(&tx, &tw, 0.0f, &ty), MOEKIT_OK) << moekit_last_error();
    TRACE_IMPL("rmsnorm");
    EXPECT_FLOAT_EQ(y[0], 2.4f);
    EXPECT_FLOAT_EQ(y[1], 1.6f);
    EXPECT_EQ(y[2], 0.0f);
    EXPECT_EQ(y[3], 0.0f);
  });
}

TEST(FusedAddRmsnorm, F32ByHand) {
  for_each_level("fused_add_rmsnorm", [] {
    // Row 0: residual [1, -1, 1, -1] + x [1, -1, 1, -1] = [2, -2, 2, -2] -> x = [1, -2, 0.5, 1]
    // with w = [1, 2, 0.5, -1]. Row 1: residual [3, 4, -3, 0] + x [0, 0, 3, 0] = [3, 4, 0, 0]
    // -> rms 2.5 -> x = [1.2, 3.2, 0, -0].
    std::vector<float> x = {1, -1, 1, -1, 0, 0, 3, 0};
    std::vector<float> residual = {1, -1, 1, -1, 3, 4, -3, 0};
    std::vector<float> w = {1, 2, 0.5f, -1};
    moekit_tensor tx = make_tensor(x.data(), MOEKIT_F32, {2, 4});
    moekit_tensor tr = make_tensor(residual.data(), MOEKIT_F32, {2, 4});
    moekit_tensor tw = make_tensor(w.data(), MOEKIT_F32, {4});
    ASSERT_EQ(moekit_fused_add_rmsnorm(&tx, &tr, &tw, 0.0f), MOEKIT_OK) << moekit_last_error();
    TRACE_IMPL("fused_add_rmsnorm");
    EXPECT_EQ(residual, (std::vector<float>{2, -2, 2, -2, 3, 4, 0, 0}));
    EXPECT_EQ(x[0], 1.0f);
    EXPECT_EQ(x[1], -2.0f);
    EXPECT_EQ(x[2], 0.5f);
    EXPECT_EQ(x[3], 1.0f);
    EXPECT_FLOAT_EQ(x[4], 1.2f);
    EXPECT_FLOAT_EQ(x[5], 3.2f);
    EXPECT_EQ(x[6], 0.0f);
    EXPECT_EQ(x[7], 0.0f);
  });
}

TEST(FusedAddRmsnorm, Bf16NormReadsTheRoundedResidual) {
  for_each_level("fused_add_rmsnorm", [] {
    // residual = [256, 256, 256, 256], x = [1, 0, 0, 0]: 257 is half way between the bf16
    // neighbours 256 and 258 (step 2 at 2^8) and rounds to the even 256. The stored residual is
    // then all 256, so the norm gives exactly [1, 1, 1, 1] * w. Had the norm read the unrounded
    // 257, x[0] would be 257 / sqrt((257^2 + 3 * 256^2) / 4) = 1.0029.
    std::vector<uint16_t> residual = f32_to_bf16_vec({256, 256, 256, 256});
    std::vector<uint16_t> x = f32_to_bf16_vec({1, 0, 0, 0});
    std::vector<uint16_t> w = f32_to_bf16_vec({1, 2, 3, 4});
    moekit_tensor tx = make_tensor(x.data(), MOEKIT_BF16, {1, 4});
    moekit_tensor tr = make_tensor(residual.data(), MOEKIT_BF16, {1, 4});
    moekit_tensor tw = make_tensor(w.data(), MOEKIT_BF16, {4});
    ASSERT_EQ(moekit_fused_add_rmsnorm(&tx, &tr, &tw, 0.0f), MOEKIT_OK) << moekit_last_error();
    TRACE_IMPL("fused_add_rmsnorm");
    EXPECT_EQ(moekit_test::from_bf16(residual), (std::vector<float>{256, 256, 256, 256}));
    EXPECT_EQ(moekit_test::from_bf16(x), (std::vector<float>{1, 2, 3, 4}));
  });
}

TEST(QkNorm, WholeWidthNotPerHead) {
  for_each_level("qk_norm", [] {
    // q: 2 heads of head_dim 2 per token, [1, 1, 7, 7]. Over the whole width mean(q^2) =
    // (1 + 1 + 49 + 49) / 4 = 25, rms 5: q / 5 = [0.2, 0.2, 1.4, 1.4], times q_w = [1, 2, 1, 2]
    // -> [0.2, 0.4, 1.4, 2.8]. (Per head would give [1, 1, 1, 1] * w instead.)
    // k: one kv head [2, -2]: rms 2 -> [1, -1] * [3, 0.5] = [3, -0.5].
    std::vector<float> q = {1, 1, 7, 7}, k = {2, -2};
    std::vector<float> qw = {1, 2, 1, 2}, kw = {3, 0.5f};
    moekit_tensor tq = make_tensor(q.data(), MOEKIT_F32, {1, 4});
    moekit_tensor tk = make_tensor(k.data(), MOEKIT_F32, {1, 2});
    moekit_tensor tqw = make_tensor(qw.data(), MOEKIT_F32, {4});
    moekit_tensor tkw = make_tensor(kw.data(), MOEKIT_F32, {2});
    ASSERT_EQ(moekit_qk_norm(&tq, &tk, &tqw, &tkw, 0.0f), MOEKIT_OK) << moekit_last_error();
    TRACE_IMPL("qk_norm");
    EXPECT_FLOAT_EQ(q[0], 0.2f);
    EXPECT_FLOAT_EQ(q[1], 0.4f);
    EXPECT_FLOAT_EQ(q[2], 1.4f);
    EXPECT_FLOAT_EQ(q[3], 2.8f);
    EXPECT_EQ(k[0], 3.0f);
    EXPECT_EQ(k[1], -0.5f);
  });
}

// Two tokens of q (width 4) and k (width 4), split over two ranks of width 2 each.
TEST(QkNorm, TensorParallelSplitEqualsFull) {
  for_each_level("qk_norm", [] {
    const std::vector<float> q_full = {1, 1, 7, 7, 3, 0, 4, 0};
    const std::vector<float> k_full = {2, -2, 2, -2, 1, 2, 3, 4};
    const std::vector<float> qw = {1, 2, 1, 2}, kw = {0.5f, 1, 2, 4};
    std::vector<float> q_expect = q_full, k_expect = k_full;
    {
      moekit_tensor tq = make_tensor(q_expect.data(), MOEKIT_F32, {2, 4});
      moekit_tensor tk = make_tensor(k_expect.data(), MOEKIT_F32, {2, 4});
      moekit_tensor tqw = make_tensor(const_cast<float*>(qw.data()), MOEKIT_F32, {4});
      moekit_tensor tkw = make_tensor(const_cast<float*>(kw.data()), MOEKIT_F32, {4});
      ASSERT_EQ(moekit_qk_norm(&tq, &tk, &tqw, &tkw, 1e-6f), MOEKIT_OK);
    }
    // Each rank holds columns [2r, 2r+2) of every row. Step 1: per-rank partial sums.
    // Token 0, q: rank 0 has [1, 1] -> 2, rank 1 has [7, 7] -> 98; all-reduced: 100.
    std::vector<float> q_rank[2], k_rank[2], q_ss[2], k_ss[2];
    for (int r = 0; r < 2; ++r) {
      for (int t = 0; t < 2; ++t)
        for (int c = 0; c < 2; ++c) {
          q_rank[r].push_back(q_full[t * 4 + 2 * r + c]);
          k_rank[r].push_back(k_full[t * 4 + 2 * r + c]);
        }
      q_ss[r].assign(2, kNaN);
      k_ss[r].assign(2, kNaN);
      moekit_tensor tq = make_tensor(q_rank[r].data(), MOEKIT_F32, {2, 2});
      moekit_tensor tk = make_tensor(k_rank[r].data(), MOEKIT_F32, {2, 2});
      moekit_tensor tqs = make_tensor(q_ss[r].data(), MOEKIT_F32, {2});
      moekit_tensor tks = make_tensor(k_ss[r].data(), MOEKIT_F32, {2});
      ASSERT_EQ(moekit_qk_norm_partial_sumsq(&tq, &tk, &tqs, &tks), MOEKIT_OK)
          << moekit_last_error();
    }
    TRACE_IMPL("qk_norm");
    EXPECT_EQ(q_ss[0][0], 2.0f);
    EXPECT_EQ(q_ss[1][0], 98.0f);
    EXPECT_EQ(q_ss[0][1], 9.0f);
    EXPECT_EQ(q_ss[1][1], 16.0f);
    EXPECT_EQ(k_ss[0][1], 5.0f);
    EXPECT_EQ(k_ss[1][1], 25.0f);
    // The all-reduce, then step 2 on each rank with the global width 4 and its weight slice.
    std::vector<float> q_sum(2), k_sum(2);
    for (int t = 0; t < 2; ++t) {
      q_sum[t] = q_ss[0][t] + q_ss[1][t];
      k_sum[t] = k_ss[0][t] + k_ss[1][t];
    }
    for (int r = 0; r < 2; ++r) {
      moekit_tensor tq = make_tensor(q_rank[r].data(), MOEKIT_F32, {2, 2});
      moekit_tensor tk = make_tensor(k_rank[r].data(), MOEKIT_F32, {2, 2});
      moekit_tensor tqs = make_tensor(q_sum.data(), MOEKIT_F32, {2});
      moekit_tensor tks = make_tensor(k_sum.data(), MOEKIT_F32, {2});
      moekit_tensor tqw = make_tensor(const_cast<float*>(qw.data() + 2 * r), MOEKIT_F32, {2});
      moekit_tensor tkw = make_tensor(const_cast<float*>(kw.data() + 2 * r), MOEKIT_F32, {2});
      ASSERT_EQ(moekit_qk_norm_apply(&tq, &tk, &tqs, &tks, 4, 4, &tqw, &tkw, 1e-6f), MOEKIT_OK)
          << moekit_last_error();
      for (int t = 0; t < 2; ++t)
        for (int c = 0; c < 2; ++c) {
          EXPECT_FLOAT_EQ(q_rank[r][t * 2 + c], q_expect[t * 4 + 2 * r + c]) << r << t << c;
          EXPECT_FLOAT_EQ(k_rank[r][t * 2 + c], k_expect[t * 4 + 2 * r + c]) << r << t << c;
        }
    }
    // Token 0 of q by hand: rms 5, [0.2, 0.4, 1.4, 2.8].
    EXPECT_FLOAT_EQ(q_rank[1][0], 1.4f);
    EXPECT_FLOAT_EQ(q_rank[1][1], 2.8f);
  });
}

TEST(QkNorm, PaddedHeadsUseTheTrueGlobalWidth) {
  for_each_level("qk_norm", [] {
    // 3 q heads of head_dim 2 (true width 6) padded to 4 heads over 2 ranks: rank 0 holds heads
    // 0-1, rank 1 holds head 2 and a zero padding head. q = 2 everywhere: sums 16 + 8 = 24,
    // mean over the true width 24 / 6 = 4, rms 2, q -> 1 (dividing by 8 would give 24/8 = 3).
    std::vector<float> q0 = {2, 2, 2, 2}, q1 = {2, 2, 0, 0};
    std::vector<float> k0 = {2, -2}, k1 = {2, -2};
    std::vector<float> ss(4, kNaN);
    for (int r = 0; r < 2; ++r) {
      moekit_tensor tq = make_tensor(r ? q1.data() : q0.data(), MOEKIT_F32, {1, 4});
      moekit_tensor tk = make_tensor(r ? k1.data() : k0.data(), MOEKIT_F32, {1, 2});
      moekit_tensor tqs = make_tensor(&ss[r], MOEKIT_F32, {1});
      moekit_tensor tks = make_tensor(&ss[2 + r], MOEKIT_F32, {1});
      ASSERT_EQ(moekit_qk_norm_partial_sumsq(&tq, &tk, &tqs, &tks), MOEKIT_OK);
    }
    EXPECT_EQ(ss[0], 16.0f);
    EXPECT_EQ(ss[1], 8.0f);
    float q_sum = ss[0] + ss[1], k_sum = ss[2] + ss[3];
    std::vector<float> ones(4, 1.0f);
    for (int r = 0; r < 2; ++r) {
      moekit_tensor tq = make_tensor(r ? q1.data() : q0.data(), MOEKIT_F32, {1, 4});
      moekit_tensor tk = make_tensor(r ? k1.data() : k0.data(), MOEKIT_F32, {1, 2});
      moekit_tensor tqs = make_tensor(&q_sum, MOEKIT_F32, {1});
      moekit_tensor tks = make_tensor(&k_sum, MOEKIT_F32, {1});
      moekit_tensor tqw = make_tensor(ones.data(), MOEKIT_F32, {4});
      moekit_tensor tkw = make_tensor(ones.data(), MOEKIT_F32, {2});
      ASSERT_EQ(moekit_qk_norm_apply(&tq, &tk, &tqs, &tks, 6, 4, &tqw, &tkw, 0.0f), MOEKIT_OK)
          << moekit_last_error();
    }
    TRACE_IMPL("qk_norm");
    EXPECT_EQ(q0, (std::vector<float>{1, 1, 1, 1}));
    EXPECT_EQ(q1, (std::vector<float>{1, 1, 0, 0}));
    // k: sums 8 + 8 = 16 over width 4: rms 2.
    EXPECT_EQ(k0, (std::vector<float>{1, -1}));
    EXPECT_EQ(k1, (std::vector<float>{1, -1}));
    // The same as the unpadded whole-width norm of the 6 real values.
    std::vector<float> q6(6, 2.0f), k4 = {2, -2, 2, -2};
    moekit_tensor tq = make_tensor(q6.data(), MOEKIT_F32, {1, 6});
    moekit_tensor tk = make_tensor(k4.data(), MOEKIT_F32, {1, 4});
    std::vector<float> w6(6, 1.0f);
    moekit_tensor tqw = make_tensor(w6.data(), MOEKIT_F32, {6});
    moekit_tensor tkw = make_tensor(w6.data(), MOEKIT_F32, {4});
    ASSERT_EQ(moekit_qk_norm(&tq, &tk, &tqw, &tkw, 0.0f), MOEKIT_OK);
    EXPECT_EQ(q6, (std::vector<float>(6, 1.0f)));
  });
}

TEST(QkNorm, KvWeightSlice) {
  int64_t begin = -7, len = -7;
  // 8 kv heads of 128 over 4 ranks: 2 heads each.
  for (int64_t r = 0; r < 4; ++r) {
    ASSERT_EQ(moekit_qk_norm_kv_weight_slice(8, 128, r, 4, &begin, &len), MOEKIT_OK);
    EXPECT_EQ(begin, r * 256);
    EXPECT_EQ(len, 256);
  }
  // As many heads as ranks: one each.
  ASSERT_EQ(moekit_qk_norm_kv_weight_slice(4, 64, 3, 4, &begin, &len), MOEKIT_OK);
  EXPECT_EQ(begin, 192);
  EXPECT_EQ(len, 64);
  // 2 kv heads over 8 ranks: each head replicated on 4 consecutive ranks (0-3 head 0,
  // 4-7 head 1), and ranks holding the same head get the same slice.
  for (int64_t r = 0; r < 8; ++r) {
    ASSERT_EQ(moekit_qk_norm_kv_weight_slice(2, 128, r, 8, &begin, &len), MOEKIT_OK);
    EXPECT_EQ(begin, r < 4 ? 0 : 128) << r;
    EXPECT_EQ(len, 128);
  }
  // MiniMax-M2: 8 kv heads on 16 ranks: rank 5 -> head 2.
  ASSERT_EQ(moekit_qk_norm_kv_weight_slice(8, 128, 5, 16, &begin, &len), MOEKIT_OK);
  EXPECT_EQ(begin, 256);
  EXPECT_EQ(len, 128);
}

// ---- top-k routing -------------------------------------------------------------------------

struct RouteResult {
  std::vector<float> weights;
  std::vector<int64_t> ids;
};

// Routes `logits` ([M, E] f32) and returns the outputs (ids widened to i64).
RouteResult route(const std::vector<float>& logits, int64_t M, int64_t E,
                  const moekit_route_params& p, const float* bias = nullptr,
                  moekit_dtype ids_dtype = MOEKIT_I32) {
  RouteResult r;
  std::vector<float> in = logits;
  std::vector<float> b;
  r.weights.assign(M * p.top_k, -12345.0f);
  std::vector<int32_t> ids32(M * p.top_k, -99);
  std::vector<int64_t> ids64(M * p.top_k, -99);
  moekit_tensor tl = make_tensor(in.data(), MOEKIT_F32, {M, E});
  moekit_tensor tb{};
  if (bias) {
    b.assign(bias, bias + E);
    tb = make_tensor(b.data(), MOEKIT_F32, {E});
  }
  moekit_tensor tw = make_tensor(r.weights.data(), MOEKIT_F32, {M, p.top_k});
  moekit_tensor ti = ids_dtype == MOEKIT_I64
                         ? make_tensor(ids64.data(), MOEKIT_I64, {M, p.top_k})
                         : make_tensor(ids32.data(), MOEKIT_I32, {M, p.top_k});
  const moekit_status s = moekit_topk_route(&tl, bias ? &tb : nullptr, &p, &tw, &ti);
  EXPECT_EQ(s, MOEKIT_OK) << moekit_last_error();
  if (ids_dtype == MOEKIT_I64)
    r.ids = ids64;
  else
    r.ids.assign(ids32.begin(), ids32.end());
  return r;
}

moekit_route_params params(int top_k, moekit_scoring scoring) {
  moekit_route_params p = moekit_route_params_default();
  p.top_k = top_k;
  p.scoring = scoring;
  return p;
}

TEST(TopkRoute, SoftmaxByHand) {
  for_each_level("topk_route", [] {
    // exp(logits) = [1, 2, 4, 1]: sum 8, softmax [1/8, 2/8, 4/8, 1/8]. Top-2: experts 2, 1
    // with 0.5 and 0.25.
    const float logits[] = {0.0f, std::log(2.0f), std::log(4.0f), 0.0f};
    RouteResult r = route({logits, logits + 4}, 1, 4, params(2, MOEKIT_SCORING_SOFTMAX));
    TRACE_IMPL("topk_route");
    EXPECT_EQ(r.ids, (std::vector<int64_t>{2, 1}));
    EXPECT_NEAR(r.weights[0], 0.5f, 1e-6f);
    EXPECT_NEAR(r.weights[1], 0.25f, 1e-6f);
    // Softmax is shift-invariant: adding 100 to every logit changes nothing.
    const float shifted[] = {100.0f, 100.0f + std::log(2.0f), 100.0f + std::log(4.0f), 100.0f};
    RouteResult s = route({shifted, shifted + 4}, 1, 4, params(2, MOEKIT_SCORING_SOFTMAX));
    EXPECT_EQ(s.ids, r.ids);
    EXPECT_NEAR(s.weights[0], 0.5f, 1e-5f);
    EXPECT_NEAR(s.weights[1], 0.25f, 1e-5f);
  });
}

TEST(TopkRoute, SigmoidByHand) {
  for_each_level("topk_route", [] {
    // sigmoid([0, 2, -1, 1]) = [0.5, 0.8808, 0.2689, 0.7311]: top-2 = experts 1, 3.
    const std::vector<float> logits = {0, 2, -1, 1};
    RouteResult r = route(logits, 1, 4, params(2, MOEKIT_SCORING_SIGMOID));
    TRACE_IMPL("topk_route");
    EXPECT_EQ(r.ids, (std::vector<int64_t>{1, 3}));
    EXPECT_NEAR(r.weights[0], sigmoid(2), 1e-6);  // 0.88079708
    EXPECT_NEAR(r.weights[1], sigmoid(1), 1e-6);  // 0.73105858
    EXPECT_NEAR(sigmoid(2), 0.88079708, 1e-8);
    // Renormalized: 0.880797 / (0.880797 + 0.731059) = 0.546449, and 0.453551.
    moekit_route_params p = params(2, MOEKIT_SCORING_SIGMOID);
    p.renormalize = 1;
    RouteResult n = route(logits, 1, 4, p);
    EXPECT_EQ(n.ids, r.ids);
    const double total = sigmoid(2) + sigmoid(1);
    EXPECT_NEAR(n.weights[0], sigmoid(2) / total, 1e-6);
    EXPECT_NEAR(n.weights[1], sigmoid(1) / total, 1e-6);
    EXPECT_NEAR(sigmoid(2) / total, 0.546449, 1e-6);
    // Scaling multiplies the final weights (after renormalizing): 2.5 * [0.546449, 0.453551].
    p.routed_scaling_factor = 2.5f;
    RouteResult sc = route(logits, 1, 4, p);
    EXPECT_NEAR(sc.weights[0], 2.5 * sigmoid(2) / total, 1e-5);
    EXPECT_NEAR(sc.weights[1], 2.5 * sigmoid(1) / total, 1e-5);
  });
}

TEST(TopkRoute, TiesGoToTheLowerIndex) {
  for_each_level("topk_route", [] {
    for (moekit_scoring scoring : {MOEKIT_SCORING_SOFTMAX, MOEKIT_SCORING_SIGMOID}) {
      SCOPED_TRACE(scoring);
      // Experts 1, 2, 3 tie at the top: the two lowest win, in index order.
      RouteResult r = route({1, 3, 3, 3, 0}, 1, 5, params(2, scoring));
      TRACE_IMPL("topk_route");
      EXPECT_EQ(r.ids, (std::vector<int64_t>{1, 2}));
      EXPECT_EQ(r.weights[0], r.weights[1]);
      // A tie split around a lower score: [3, 0, 3, 3] -> 0, 2, 3.
      RouteResult s = route({3, 0, 3, 3}, 1, 4, params(3, scoring));
      EXPECT_EQ(s.ids, (std::vector<int64_t>{0, 2, 3}));
      // All equal, k = E: identity order.
      RouteResult t = route({0.5f, 0.5f, 0.5f, 0.5f}, 1, 4, params(4, scoring));
      EXPECT_EQ(t.ids, (std::vector<int64_t>{0, 1, 2, 3}));
    }
  });
}

TEST(TopkRoute, CorrectionBiasChangesTheChoiceNotTheWeights) {
  for_each_level("topk_route", [] {
    // sigmoid([2, 1, 0, -1]) = [0.8808, 0.7311, 0.5, 0.2689]; bias +5 on expert 2 makes its
    // selection score 5.5, first. The weights are the unbiased scores: [0.5, 0.8808].
    const std::vector<float> logits = {2, 1, 0, -1};
    const float bias[] = {0, 0, 5, 0};
    RouteResult r = route(logits, 1, 4, params(2, MOEKIT_SCORING_SIGMOID), bias);
    TRACE_IMPL("topk_route");
    EXPECT_EQ(r.ids, (std::vector<int64_t>{2, 0}));
    EXPECT_NEAR(r.weights[0], 0.5, 1e-6);
    EXPECT_NEAR(r.weights[1], sigmoid(2), 1e-6);
    // A negative bias demotes: expert 0's selection score 0.8808 - 1 falls below 0.2689.
    const float demote[] = {-1, 0, 0, 0};
    RouteResult d = route(logits, 1, 4, params(3, MOEKIT_SCORING_SIGMOID), demote);
    EXPECT_EQ(d.ids, (std::vector<int64_t>{1, 2, 3}));
    EXPECT_NEAR(d.weights[0], sigmoid(1), 1e-6);
    // Renormalize and scale use the unbiased scores too: 2 * [0.5, 0.8808] / 1.3808.
    moekit_route_params p = params(2, MOEKIT_SCORING_SIGMOID);
    p.renormalize = 1;
    p.routed_scaling_factor = 2.0f;
    RouteResult n = route(logits, 1, 4, p, bias);
    EXPECT_EQ(n.ids, (std::vector<int64_t>{2, 0}));
    EXPECT_NEAR(n.weights[0], 2 * 0.5 / (0.5 + sigmoid(2)), 1e-6);
    EXPECT_NEAR(n.weights[1], 2 * sigmoid(2) / (0.5 + sigmoid(2)), 1e-6);
  });
}

TEST(TopkRoute, GroupedSelectionUsesTheSumOfTheTopTwo) {
  for_each_level("topk_route", [] {
    // 12 experts in 4 groups of 3, keep 2 groups (DeepSeek-V3 style), sigmoid scores:
    //   group 0: logits [3, -5, -5] -> [0.9526, 0.0067, 0.0067]: top-2 sum 0.9593
    //   group 1: logits [1, 1, -5]  -> [0.7311, 0.7311, 0.0067]: top-2 sum 1.4621
    //   group 2: logits [.5, .5, .5] -> 0.6225 each:               top-2 sum 1.2449
    //   group 3: logits [-5, -5, -5]:                              top-2 sum 0.0134
    // Groups 1 and 2 are kept (by the group maximum it would be 0 and 1; by the sum of all
    // three, 2 and 1 with a different order: only the top-2 sum gives this ranking).
    // Top-3 among experts 3..8: 3 and 4 (0.7311), then 6 (first of the 0.6225 ties).
    const std::vector<float> logits = {3, -5, -5, 1, 1, -5, 0.5f, 0.5f, 0.5f, -5, -5, -5};
    moekit_route_params p = params(3, MOEKIT_SCORING_SIGMOID);
    p.num_expert_group = 4;
    p.topk_group = 2;
    RouteResult r = route(logits, 1, 12, p);
    TRACE_IMPL("topk_route");
    EXPECT_EQ(r.ids, (std::vector<int64_t>{3, 4, 6}));
    EXPECT_NEAR(r.weights[0], sigmoid(1), 1e-6);
    EXPECT_NEAR(r.weights[1], sigmoid(1), 1e-6);
    EXPECT_NEAR(r.weights[2], sigmoid(0.5), 1e-6);
    // Without grouping expert 0 wins.
    RouteResult flat = route(logits, 1, 12, params(3, MOEKIT_SCORING_SIGMOID));
    EXPECT_EQ(flat.ids, (std::vector<int64_t>{0, 3, 4}));
    // num_expert_group = 1 means no grouping.
    p.num_expert_group = 1;
    RouteResult one = route(logits, 1, 12, p);
    EXPECT_EQ(one.ids, flat.ids);
    // Keeping 1 group: only group 1, whose third member (-5) comes last.
    p.num_expert_group = 4;
    p.topk_group = 1;
    RouteResult g1 = route(logits, 1, 12, p);
    EXPECT_EQ(g1.ids, (std::vector<int64_t>{3, 4, 5}));
    // The group score uses the biased selection scores: +1 on expert 9 lifts group 3 to
    // 1.0067 + 0.0067 = 1.0134, still below group 2, but +2 (2.0201) puts it first.
    std::vector<float> bias(12, 0.0f);
    bias[9] = 2.0f;
    p.topk_group = 2;
    RouteResult b = route(logits, 1, 12, p, bias.data());
    EXPECT_EQ(b.ids, (std::vector<int64_t>{9, 3, 4}));
    EXPECT_NEAR(b.weights[0], sigmoid(-5), 1e-6);
  });
}

TEST(TopkRoute, NegativeInfinityIsAnOrdinaryLowestNumber) {
  for_each_level("topk_route", [] {
    // Softmax of [-inf, 0, -inf, 0] = [0, 0.5, 0, 0.5]; k = 3 takes the two zeros' lower index.
    RouteResult r = route({-kInf, 0, -kInf, 0}, 1, 4, params(3, MOEKIT_SCORING_SOFTMAX));
    TRACE_IMPL("topk_route");
    EXPECT_EQ(r.ids, (std::vector<int64_t>{1, 3, 0}));
    EXPECT_EQ(r.weights[0], 0.5f);
    EXPECT_EQ(r.weights[1], 0.5f);
    EXPECT_EQ(r.weights[2], 0.0f);
    // Sigmoid(-inf) = 0.
    RouteResult s = route({-kInf, 0, 1}, 1, 3, params(3, MOEKIT_SCORING_SIGMOID));
    EXPECT_EQ(s.ids, (std::vector<int64_t>{2, 1, 0}));
    EXPECT_EQ(s.weights[2], 0.0f);
  });
}

TEST(TopkRoute, AllNegativeInfinityRow) {
  for_each_level("topk_route", [] {
    // Softmax: max is -inf, exp(-inf - -inf) = NaN: weight NaN (as torch.softmax), ids the lowest
    // (all selection scores are NaN, ties to the lower index). Sigmoid(-inf) = 0: weight 0.
    RouteResult s = route({-kInf, -kInf, -kInf, -kInf}, 1, 4, params(2, MOEKIT_SCORING_SOFTMAX));
    TRACE_IMPL("topk_route");
    EXPECT_EQ(s.ids, (std::vector<int64_t>{0, 1}));
    EXPECT_TRUE(std::isnan(s.weights[0]));
    EXPECT_TRUE(std::isnan(s.weights[1]));
    RouteResult g = route({-kInf, -kInf, -kInf, -kInf}, 1, 4, params(2, MOEKIT_SCORING_SIGMOID));
    EXPECT_EQ(g.ids, (std::vector<int64_t>{0, 1}));
    EXPECT_EQ(g.weights[0], 0.0f);
    EXPECT_EQ(g.weights[1], 0.0f);
  });
}

TEST(TopkRoute, NaNRanksBelowEveryNumber) {
  for_each_level("topk_route", [] {
    // [NaN, -inf, 1, NaN], sigmoid: 1 first, then -inf (score 0), then the NaNs by index.
    RouteResult s = route({kNaN, -kInf, 1, kNaN}, 1, 4, params(4, MOEKIT_SCORING_SIGMOID));
    TRACE_IMPL("topk_route");
    EXPECT_EQ(s.ids, (std::vector<int64_t>{2, 1, 0, 3}));
    EXPECT_NEAR(s.weights[0], sigmoid(1), 1e-6);
    EXPECT_EQ(s.weights[1], 0.0f);
    EXPECT_TRUE(std::isnan(s.weights[2]));
    EXPECT_TRUE(std::isnan(s.weights[3]));
    // Softmax over the non-NaN logits: exp([-inf, 1] - 1) = [0, 1], sum 1.
    RouteResult m = route({kNaN, -kInf, 1, kNaN}, 1, 4, params(3, MOEKIT_SCORING_SOFTMAX));
    EXPECT_EQ(m.ids, (std::vector<int64_t>{2, 1, 0}));
    EXPECT_NEAR(m.weights[0], 1.0f, 1e-6f);
    EXPECT_EQ(m.weights[1], 0.0f);
    EXPECT_TRUE(std::isnan(m.weights[2]));
    // A NaN bias makes that expert's selection score NaN: it drops to the end.
    const float bias[] = {kNaN, 0, 0, 0};
    RouteResult b = route({5, 1, 2, 3}, 1, 4, params(2, MOEKIT_SCORING_SIGMOID), bias);
    EXPECT_EQ(b.ids, (std::vector<int64_t>{3, 2}));
  });
}

TEST(TopkRoute, AllNaNRowGivesTheLowestIdsWithNaNWeights) {
  for_each_level("topk_route", [] {
    // moekit.h: "a row of all NaN gives the lowest ids with weight NaN". Row 1 is ordinary and
    // must not be disturbed by its neighbour.
    for (moekit_scoring scoring : {MOEKIT_SCORING_SOFTMAX, MOEKIT_SCORING_SIGMOID}) {
      SCOPED_TRACE(scoring);
      moekit_route_params p = params(2, scoring);
      p.renormalize = 1;
      RouteResult r = route({kNaN, kNaN, kNaN, kNaN, 0, 0, 5, 0}, 2, 4, p);
      TRACE_IMPL("topk_route");
      EXPECT_EQ(r.ids, (std::vector<int64_t>{0, 1, 2, 0}));
      EXPECT_TRUE(std::isnan(r.weights[0]));
      EXPECT_TRUE(std::isnan(r.weights[1]));
      EXPECT_FALSE(std::isnan(r.weights[2]));
      EXPECT_FALSE(std::isnan(r.weights[3]));
    }
  });
}

TEST(TopkRoute, Int64IdsBf16LogitsAndStridedRows) {
  for_each_level("topk_route", [] {
    const std::vector<float> logits = {0, 2, -1, 1, 9, 8, 7, 6};
    RouteResult r = route(logits, 2, 4, params(2, MOEKIT_SCORING_SIGMOID), nullptr, MOEKIT_I64);
    TRACE_IMPL("topk_route");
    EXPECT_EQ(r.ids, (std::vector<int64_t>{1, 3, 0, 1}));
    // The same through bf16 logits (all exact in bf16), rows strided by 6 and i64 ids with a
    // row stride of 3 (the gap must stay untouched).
    std::vector<uint16_t> lb = f32_to_bf16_vec({0, 2, -1, 1, 0, 0, 9, 8, 7, 6, 0, 0});
    std::vector<float> w(6, -1.0f);
    std::vector<int64_t> ids(6, -1);
    moekit_tensor tl = make_tensor(lb.data(), MOEKIT_BF16, {2, 4}, {6, 1});
    moekit_tensor tw = make_tensor(w.data(), MOEKIT_F32, {2, 2}, {3, 1});
    moekit_tensor ti = make_tensor(ids.data(), MOEKIT_I64, {2, 2}, {3, 1});
    moekit_route_params p = params(2, MOEKIT_SCORING_SIGMOID);
    ASSERT_EQ(moekit_topk_route(&tl, nullptr, &p, &tw, &ti), MOEKIT_OK) << moekit_last_error();
    EXPECT_EQ(ids, (std::vector<int64_t>{1, 3, -1, 0, 1, -1}));
    EXPECT_NEAR(w[0], sigmoid(2), 1e-6);
    EXPECT_NEAR(w[3], sigmoid(9), 1e-6);
    EXPECT_EQ(w[2], -1.0f);
    EXPECT_EQ(w[5], -1.0f);
  });
}

TEST(RouterTopk, GemmThenRoute) {
  for_each_level("router_topk", [] {
    // hidden [1, 2] = [1, 2]; gate rows [1, 0], [0, 1], [1, 1]: logits [1, 2, 3].
    std::vector<float> hidden = {1, 2}, gate = {1, 0, 0, 1, 1, 1};
    std::vector<float> w(2, kNaN), logits(3, kNaN);
    std::vector<int32_t> ids(2, -1);
    moekit_tensor th = make_tensor(hidden.data(), MOEKIT_F32, {1, 2});
    moekit_tensor tg = make_tensor(gate.data(), MOEKIT_F32, {3, 2});
    moekit_tensor tw = make_tensor(w.data(), MOEKIT_F32, {1, 2});
    moekit_tensor ti = make_tensor(ids.data(), MOEKIT_I32, {1, 2});
    moekit_tensor tlo = make_tensor(logits.data(), MOEKIT_F32, {1, 3});
    moekit_route_params p = params(2, MOEKIT_SCORING_SIGMOID);
    ASSERT_EQ(moekit_router_topk(&th, &tg, nullptr, &p, &tw, &ti, &tlo), MOEKIT_OK)
        << moekit_last_error();
    TRACE_IMPL("router_topk");
    EXPECT_EQ(logits, (std::vector<float>{1, 2, 3}));
    EXPECT_EQ(ids, (std::vector<int32_t>{2, 1}));
    EXPECT_NEAR(w[0], sigmoid(3), 1e-6);
    EXPECT_NEAR(w[1], sigmoid(2), 1e-6);
  });
}

// ---- moe_align -----------------------------------------------------------------------------

struct AlignResult {
  std::vector<int32_t> sorted, blocks;
  int32_t num_rows = -1;
};

AlignResult align(const std::vector<int64_t>& ids, int64_t M, int64_t k, int64_t E,
                  const std::vector<int32_t>* map, int64_t block_m, moekit_dtype ids_dtype) {
  std::vector<int32_t> ids32(ids.begin(), ids.end());
  std::vector<int64_t> ids64 = ids;
  int64_t num_local = E;
  if (map) {
    num_local = 0;
    for (int32_t v : *map) num_local = std::max<int64_t>(num_local, v + 1);
  }
  const int64_t capacity = moekit_moe_align_capacity(M, k, num_local, block_m);
  EXPECT_GT(capacity, 0);
  AlignResult r;
  r.sorted.assign(capacity, -7);
  r.blocks.assign(capacity / block_m, -7);
  moekit_tensor ti = ids_dtype == MOEKIT_I64 ? make_tensor(ids64.data(), MOEKIT_I64, {M, k})
                                             : make_tensor(ids32.data(), MOEKIT_I32, {M, k});
  std::vector<int32_t> map_copy = map ? *map : std::vector<int32_t>();
  moekit_tensor tm = make_tensor(map_copy.data(), MOEKIT_I32, {E});
  moekit_tensor ts = make_tensor(r.sorted.data(), MOEKIT_I32, {capacity});
  moekit_tensor tb = make_tensor(r.blocks.data(), MOEKIT_I32, {capacity / block_m});
  moekit_tensor tn = make_tensor(&r.num_rows, MOEKIT_I32, {1});
  EXPECT_EQ(moekit_moe_align(&ti, E, map ? &tm : nullptr, block_m, &ts, &tb, &tn), MOEKIT_OK)
      << moekit_last_error();
  r.sorted.resize(std::max(0, r.num_rows));
  r.blocks.resize(std::max<int64_t>(0, r.num_rows / block_m));
  return r;
}

TEST(MoeAlign, OrderPaddingAndBlocksByHand) {
  for_each_level("moe_align", [] {
    for (moekit_dtype dt : {MOEKIT_I32, MOEKIT_I64}) {
      SCOPED_TRACE(moekit_dtype_name(dt));
      // ids [[1, 0], [1, 2], [0, 1]]: pair p = token * 2 + slot goes to expert ids[p]:
      //   expert 0: pairs 1, 4      -> one block of 2
      //   expert 1: pairs 0, 2, 5   -> two blocks: [0, 2], [5, -1]
      //   expert 2: pair 3          -> one block: [3, -1]
      const std::vector<int64_t> ids = {1, 0, 1, 2, 0, 1};
      // capacity = 6 pairs + min(3 experts, 6) * (2 - 1) = 9, rounded up to 10.
      EXPECT_EQ(moekit_moe_align_capacity(3, 2, 3, 2), 10);
      AlignResult r = align(ids, 3, 2, 3, nullptr, 2, dt);
      TRACE_IMPL("moe_align");
      EXPECT_EQ(r.num_rows, 8);
      EXPECT_EQ(r.sorted, (std::vector<int32_t>{1, 4, 0, 2, 5, -1, 3, -1}));
      EXPECT_EQ(r.blocks, (std::vector<int32_t>{0, 1, 1, 2}));
      // block_m = 4: every expert gets one block.
      AlignResult b4 = align(ids, 3, 2, 3, nullptr, 4, dt);
      EXPECT_EQ(b4.num_rows, 12);
      EXPECT_EQ(b4.sorted,
                (std::vector<int32_t>{1, 4, -1, -1, 0, 2, 5, -1, 3, -1, -1, -1}));
      EXPECT_EQ(b4.blocks, (std::vector<int32_t>{0, 1, 2}));
      // block_m = 1: no padding at all.
      AlignResult b1 = align(ids, 3, 2, 3, nullptr, 1, dt);
      EXPECT_EQ(b1.sorted, (std::vector<int32_t>{1, 4, 0, 2, 5, 3}));
      EXPECT_EQ(b1.blocks, (std::vector<int32_t>{0, 0, 1, 1, 1, 2}));
      // An expert with no tokens gets no block: E = 5, experts 3 and 4 unused.
      AlignResult e5 = align(ids, 3, 2, 5, nullptr, 2, dt);
      EXPECT_EQ(e5.sorted, r.sorted);
      EXPECT_EQ(e5.blocks, r.blocks);
    }
  });
}

TEST(MoeAlign, ExpertMapDropsRemoteExperts) {
  for_each_level("moe_align", [] {
    // Global expert 0 lives on another rank (-1); 1 -> local 0, 2 -> local 1.
    const std::vector<int64_t> ids = {1, 0, 1, 2, 0, 1};
    const std::vector<int32_t> map = {-1, 0, 1};
    // capacity for 2 local experts: 6 + 2 * 1 = 8.
    EXPECT_EQ(moekit_moe_align_capacity(3, 2, 2, 2), 8);
    AlignResult r = align(ids, 3, 2, 3, &map, 2, MOEKIT_I32);
    TRACE_IMPL("moe_align");
    EXPECT_EQ(r.num_rows, 6);
    EXPECT_EQ(r.sorted, (std::vector<int32_t>{0, 2, 5, -1, 3, -1}));
    EXPECT_EQ(r.blocks, (std::vector<int32_t>{0, 0, 1}));
    // A map that reorders: global 2 -> local 0, global 0 -> local 1, global 1 off this rank.
    const std::vector<int32_t> swap = {1, -1, 0};
    AlignResult s = align(ids, 3, 2, 3, &swap, 2, MOEKIT_I32);
    EXPECT_EQ(s.sorted, (std::vector<int32_t>{3, -1, 1, 4}));
    EXPECT_EQ(s.blocks, (std::vector<int32_t>{0, 1}));
  });
}

// ---- fused MoE -----------------------------------------------------------------------------

// Two experts, H = 2, I = 2, integer weights (row-major, Hugging Face layout):
//   expert 0: w1 = [[1, 0], [0, 1]], w3 = [[0, 1], [1, 0]], w2 = [[1, 0], [2, 1]]
//     gate = [x0, x1], up = [x1, x0], act = [silu(x0) * x1, silu(x1) * x0],
//     out = [act0, 2 * act0 + act1]
//   expert 1: w1 = [[1, 1], [0, 0]], w3 = [[1, -1], [0, 0]], w2 = [[-1, 5], [1, 5]]
//     act = [silu(x0 + x1) * (x0 - x1), silu(0) * 0 = 0], out = [-act0, act0]
const float kW1[2][4] = {{1, 0, 0, 1}, {1, 1, 0, 0}};
const float kW3[2][4] = {{0, 1, 1, 0}, {1, -1, 0, 0}};
const float kW2[2][4] = {{1, 0, 2, 1}, {-1, 5, 1, 5}};

// Tokens and routing (weights exact in binary):
//   t0 = [1, 2] -> experts [0, 1] with [0.75, 0.25]
//   t1 = [2, 1] -> experts [1, 0] with [0.5, 0.5]
//   t2 = [0, 3] -> experts [1, 0] with [0.625, 0.375]
const float kHidden[6] = {1, 2, 2, 1, 0, 3};
const float kTopkW[6] = {0.75f, 0.25f, 0.5f, 0.5f, 0.625f, 0.375f};
const int32_t kTopkIds[6] = {0, 1, 1, 0, 1, 0};

// Expert outputs per token, worked out with silu(z) = z / (1 + e^-z):
//   silu(1) = 0.7310586, silu(2) = 1.7615942, silu(3) = 2.8577224
//   t0: e0 = [silu(1)*2, 2*silu(1)*2 + silu(2)*1] = [1.4621172, 4.6858285]
//       e1 = silu(3) * (1 - 2) = -2.8577224 -> [2.8577224, -2.8577224]
//   t1: e0 = [silu(2)*1, 2*silu(2) + silu(1)*2] = [1.7615942, 4.9853055]
//       e1 = silu(3) * (2 - 1) -> [-2.8577224, 2.8577224]
//   t2: e0 = [silu(0)*3, 2*0 + silu(3)*0] = [0, 0]
//       e1 = silu(3) * (0 - 3) = -8.5731671 -> [8.5731671, -8.5731671]
std::vector<double> expert_out(int e, const float* x) {
  if (e == 0) {
    const double act0 = silu(x[0]) * x[1], act1 = silu(x[1]) * x[0];
    return {act0, 2 * act0 + act1};
  }
  const double act0 = silu(x[0] + x[1]) * (x[0] - x[1]);
  return {-act0, act0};
}

// The weighted sums, with `use[e]` false for experts skipped on this rank:
//   t0: 0.75 * e0 + 0.25 * e1 = [1.8110185, 2.7999408]
//   t1: 0.5 * e1 + 0.5 * e0  = [-0.5480641, 3.9215139]
//   t2: 0.625 * e1 + 0.375 * e0 = [5.3582295, -5.3582295]
std::vector<double> expected_moe(bool use0, bool use1) {
  std::vector<double> y(6, 0.0);
  for (int m = 0; m < 3; ++m)
    for (int j = 0; j < 2; ++j) {
      const int e = kTopkIds[m * 2 + j];
      if ((e == 0 && !use0) || (e == 1 && !use1)) continue;
      const std::vector<double> o = expert_out(e, &kHidden[m * 2]);
      for (int h = 0; h < 2; ++h) y[m * 2 + h] += kTopkW[m * 2 + j] * o[h];
    }
  return y;
}

TEST(FusedMoe, HandArithmeticMatchesTheFormula) {
  const std::vector<double> y = expected_moe(true, true);
  const double hand[6] = {1.8110185, 2.7999408, -0.5480641, 3.9215139, 5.3582295, -5.3582295};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(y[i], hand[i], 1e-6) << i;
}

// Packs the experts listed in `which` (local order) from the float matrices above, stored as
// `dtype` (F32 or BF16: the integers are exact in both).
moekit_experts* pack_plain(const std::vector<int>& which, moekit_dtype dtype) {
  std::vector<std::vector<uint16_t>> bf16_store;
  std::vector<const void*> w1, w3, w2;
  std::vector<std::vector<float>> f32;
  for (int e : which)
    for (const float* m : {kW1[e], kW3[e], kW2[e]}) {
      if (dtype == MOEKIT_BF16)
        bf16_store.push_back(moekit_test::to_bf16(std::vector<float>(m, m + 4)));
      else
        f32.emplace_back(m, m + 4);
    }
  for (size_t i = 0; i < which.size(); ++i) {
    const void* p[3];
    for (int j = 0; j < 3; ++j)
      p[j] = dtype == MOEKIT_BF16 ? static_cast<const void*>(bf16_store[i * 3 + j].data())
                                  : static_cast<const void*>(f32[i * 3 + j].data());
    w1.push_back(p[0]);
    w3.push_back(p[1]);
    w2.push_back(p[2]);
  }
  moekit_experts_desc d{};
  d.num_experts = static_cast<int64_t>(which.size());
  d.hidden = 2;
  d.inter = 2;
  d.dtype = dtype;
  d.w1 = w1.data();
  d.w3 = w3.data();
  d.w2 = w2.data();
  moekit_experts* out = nullptr;
  EXPECT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &out), MOEKIT_OK) << moekit_last_error();
  return out;  // the source may be freed after packing
}

// Relative tolerance of the f32 result: the reference accumulates in double; kernels with bf16 or
// FP8 weights round the activations and the SiLU*up intermediate to bf16 (as engines do), which
// costs a few 2^-8 relative steps on each term.
double weight_tol(moekit_dtype weights, double exact_tol) {
  return g_reference_pass || weights == MOEKIT_F32 ? exact_tol : std::max(exact_tol, 1.0 / 64);
}

struct ExpertsDeleter {
  void operator()(moekit_experts* e) const { moekit_experts_free(e); }
};
using ExpertsPtr = std::unique_ptr<moekit_experts, ExpertsDeleter>;

// Runs the MoE on the tokens above and checks against `want` (relative tolerance `tol`).
void run_and_check(const moekit_experts* experts, moekit_dtype x_dtype, moekit_dtype out_dtype,
                   const std::vector<int32_t>* map, const std::vector<double>& want, double tol) {
  std::vector<float> xf(kHidden, kHidden + 6);
  std::vector<uint16_t> xb = moekit_test::to_bf16(xf);
  std::vector<float> tw(kTopkW, kTopkW + 6);
  std::vector<int32_t> ti(kTopkIds, kTopkIds + 6);
  std::vector<float> yf(6, kNaN);
  std::vector<uint16_t> yb(6, 0x7FC1);
  std::vector<int32_t> map_copy = map ? *map : std::vector<int32_t>();
  moekit_tensor th = x_dtype == MOEKIT_BF16 ? make_tensor(xb.data(), MOEKIT_BF16, {3, 2})
                                            : make_tensor(xf.data(), MOEKIT_F32, {3, 2});
  moekit_tensor tw_t = make_tensor(tw.data(), MOEKIT_F32, {3, 2});
  moekit_tensor ti_t = make_tensor(ti.data(), MOEKIT_I32, {3, 2});
  moekit_tensor tm = make_tensor(map_copy.data(), MOEKIT_I32, {2});
  moekit_tensor ty = out_dtype == MOEKIT_BF16 ? make_tensor(yb.data(), MOEKIT_BF16, {3, 2})
                                              : make_tensor(yf.data(), MOEKIT_F32, {3, 2});
  ASSERT_EQ(moekit_fused_moe(experts, &th, &tw_t, &ti_t, map ? &tm : nullptr, nullptr, &ty),
            MOEKIT_OK)
      << moekit_last_error();
  TRACE_IMPL("fused_moe");
  for (int i = 0; i < 6; ++i) {
    const double got = out_dtype == MOEKIT_BF16 ? bf16_to_f32(yb[i]) : yf[i];
    EXPECT_NEAR(got, want[i], tol * std::max(1.0, std::fabs(want[i]))) << "element " << i;
  }
}

TEST(FusedMoe, TwoExpertsThreeTokensByHand) {
  for_each_level("fused_moe", [] {
    for (moekit_dtype wt : {MOEKIT_F32, MOEKIT_BF16}) {
      SCOPED_TRACE(std::string("weights ") + moekit_dtype_name(wt));
      ExpertsPtr experts(pack_plain({0, 1}, wt));
      ASSERT_TRUE(experts);
      const std::vector<double> want = expected_moe(true, true);
      // f32 out: tight; bf16 out: one rounding of the sum (8 bits of mantissa: 2^-8 relative).
      run_and_check(experts.get(), MOEKIT_F32, MOEKIT_F32, nullptr, want, weight_tol(wt, 1e-6));
      run_and_check(experts.get(), MOEKIT_BF16, MOEKIT_F32, nullptr, want, weight_tol(wt, 1e-6));
      run_and_check(experts.get(), MOEKIT_F32, MOEKIT_BF16, nullptr, want, weight_tol(wt, 1.0 / 256));
      run_and_check(experts.get(), MOEKIT_BF16, MOEKIT_BF16, nullptr, want, weight_tol(wt, 1.0 / 256));
    }
  });
}

TEST(FusedMoe, Bf16OutputIsRoundedOnceToNearest) {
  for_each_level("fused_moe", [] {
    // The bf16 output must be the nearest bf16 of the exact sum (not a truncation, and not a
    // sum of per-expert rounded terms): compare with f32_to_bf16 of the double result.
    ExpertsPtr experts(pack_plain({0, 1}, MOEKIT_F32));
    std::vector<float> x(kHidden, kHidden + 6), tw(kTopkW, kTopkW + 6);
    std::vector<int32_t> ti(kTopkIds, kTopkIds + 6);
    std::vector<uint16_t> y(6, 0);
    moekit_tensor th = make_tensor(x.data(), MOEKIT_F32, {3, 2});
    moekit_tensor tw_t = make_tensor(tw.data(), MOEKIT_F32, {3, 2});
    moekit_tensor ti_t = make_tensor(ti.data(), MOEKIT_I32, {3, 2});
    moekit_tensor ty = make_tensor(y.data(), MOEKIT_BF16, {3, 2});
    ASSERT_EQ(moekit_fused_moe(experts.get(), &th, &tw_t, &ti_t, nullptr, nullptr, &ty),
              MOEKIT_OK);
    TRACE_IMPL("fused_moe");
    const std::vector<double> want = expected_moe(true, true);
    for (int i = 0; i < 6; ++i) {
      // Within half a bf16 ulp (2^(e - 8) for |want| in [2^e, 2^(e+1))) of the exact value.
      const double half_ulp = std::ldexp(1.0, std::ilogb(want[i]) - 8);
      EXPECT_LE(std::fabs(bf16_to_f32(y[i]) - want[i]), half_ulp * (1 + 1e-6))
          << i << ": " << want[i] << " stored as " << bf16_to_f32(y[i]);
    }
  });
}

TEST(FusedMoe, ExpertMapSkipsExperts) {
  for_each_level("fused_moe", [] {
    // Both experts local, but the map sends global 1 nowhere: only expert 0's terms remain.
    //   t0: 0.75 * [1.4621172, 4.6858285] = [1.0965879, 3.5143713]
    ExpertsPtr both(pack_plain({0, 1}, MOEKIT_F32));
    const std::vector<int32_t> drop1 = {0, -1};
    const std::vector<double> only0 = expected_moe(true, false);
    EXPECT_NEAR(only0[0], 1.0965879, 1e-6);
    run_and_check(both.get(), MOEKIT_F32, MOEKIT_F32, &drop1, only0, 1e-6);
    // Expert parallel: this rank holds only global expert 1, as its local expert 0.
    //   t2: 0.625 * [8.5731671, -8.5731671] = [5.3582295, -5.3582295]
    ExpertsPtr one(pack_plain({1}, MOEKIT_F32));
    const std::vector<int32_t> ep = {-1, 0};
    const std::vector<double> only1 = expected_moe(false, true);
    EXPECT_NEAR(only1[4], 5.3582295, 1e-6);
    run_and_check(one.get(), MOEKIT_F32, MOEKIT_F32, &ep, only1, 1e-6);
    // Every slot skipped: the output is all zeros (written, not left alone).
    const std::vector<int32_t> none = {-1, -1};
    run_and_check(both.get(), MOEKIT_F32, MOEKIT_F32, &none, std::vector<double>(6, 0.0), 0);
  });
}

// The e4m3 code of `v`, which must be exactly representable.
uint8_t fp8_code(float v) {
  for (int c = 0; c < 256; ++c)
    if (fp8_e4m3_to_f32(static_cast<uint8_t>(c)) == v)
      return static_cast<uint8_t>(c);
  ADD_FAILURE() << v << " is not an e4m3 value";
  return 0;
}

// The experts above stored as FP8 with block scales: code = value / scale, and the
// dequantized weight q * scale[n / block_n][k / block_k] is the original integer again.
TEST(FusedMoe, Fp8WeightsWithBlockScales) {
  // Spot checks of the encoder: 2 = 0 1000 000 = 0x40, 4 = 0x48, -4 = 0xC8,
  // 40 = 1.25 * 2^5 = 0 1100 010 = 0x62.
  EXPECT_EQ(fp8_code(2.0f), 0x40);
  EXPECT_EQ(fp8_code(4.0f), 0x48);
  EXPECT_EQ(fp8_code(-4.0f), 0xC8);
  EXPECT_EQ(fp8_code(40.0f), 0x62);
  for_each_level("fused_moe", [] {
    struct Blocking {
      int64_t block_n, block_k;
    };
    // 128 x 128 (MiniMax-M2): one scale per 2 x 2 matrix. 1 x 1: a scale per element, which
    // checks the [n / block_n][k / block_k] indexing. 1 x 2: one scale per row.
    for (Blocking b : {Blocking{128, 128}, Blocking{1, 1}, Blocking{1, 2}}) {
      SCOPED_TRACE("block " + std::to_string(b.block_n) + "x" + std::to_string(b.block_k));
      const int64_t sn = (2 + b.block_n - 1) / b.block_n, sk = (2 + b.block_k - 1) / b.block_k;
      std::vector<std::vector<uint8_t>> codes;
      std::vector<std::vector<float>> scales;
      std::vector<const void*> w[3];
      std::vector<const float*> s[3];
      codes.reserve(6);
      scales.reserve(6);
      for (int e = 0; e < 2; ++e) {
        const float* mats[3] = {kW1[e], kW3[e], kW2[e]};
        for (int m = 0; m < 3; ++m) {
          // Scales 2^-(1 + m + n + k): powers of two keep value / scale exact.
          std::vector<float> grid(sn * sk);
          for (int64_t n = 0; n < sn; ++n)
            for (int64_t k = 0; k < sk; ++k) grid[n * sk + k] = std::ldexp(1.0f, -(1 + m + int(n + k)));
          std::vector<uint8_t> q(4);
          for (int n = 0; n < 2; ++n)
            for (int k = 0; k < 2; ++k)
              q[n * 2 + k] = fp8_code(mats[m][n * 2 + k] / grid[(n / b.block_n) * sk + k / b.block_k]);
          codes.push_back(q);
          scales.push_back(grid);
          w[m].push_back(codes.back().data());
          s[m].push_back(scales.back().data());
        }
      }
      moekit_experts_desc d{};
      d.num_experts = 2;
      d.hidden = 2;
      d.inter = 2;
      d.dtype = MOEKIT_FP8_E4M3;
      d.w1 = w[0].data();
      d.w3 = w[1].data();
      d.w2 = w[2].data();
      d.w1_scale = s[0].data();
      d.w3_scale = s[1].data();
      d.w2_scale = s[2].data();
      d.block_n = b.block_n;
      d.block_k = b.block_k;
      moekit_experts* raw = nullptr;
      ASSERT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &raw), MOEKIT_OK)
          << moekit_last_error();
      ExpertsPtr experts(raw);
      const std::vector<double> want = expected_moe(true, true);
      run_and_check(experts.get(), MOEKIT_F32, MOEKIT_F32, nullptr, want,
                    weight_tol(MOEKIT_FP8_E4M3, 1e-6));
      run_and_check(experts.get(), MOEKIT_BF16, MOEKIT_BF16, nullptr, want,
                    weight_tol(MOEKIT_FP8_E4M3, 1.0 / 256));
    }
  });
}

}  // namespace
