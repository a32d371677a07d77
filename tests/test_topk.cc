// Top-k routing and the fused router: every implementation of the dispatch tables against the
// reference (exact ids, weights within 1e-6 relative), over the scoring variants, expert counts,
// k, token counts, dtypes, strides, ties, special values and grouped selection; and the C API's
// argument checks.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/topk/topk.h"
#include "reference/reference.h"
#include "tests/test_util.h"

namespace {

using moekit::RouterTopkArgs;
using moekit::TopkArgs;
using moekit_test::make_tensor;

constexpr float kWeightRelTol = 1e-6f;
constexpr float kSentinelWeight = -12345.0f;
constexpr int64_t kSentinelId = -77;

enum class Input { kContinuous, kSmallInts, kSpecial };

// Random logits of one kind. kSmallInts makes many exact ties; kSpecial mixes NaN, -inf and
// +inf into ordinary values, with whole rows of NaN and of -inf.
std::vector<float> make_logits(int64_t M, int64_t stride, Input kind, uint32_t seed) {
  std::vector<float> v = moekit_test::random_floats(static_cast<size_t>(M * stride), seed, -4, 4);
  if (kind == Input::kSmallInts) {
    v = moekit_test::random_ints(v.size(), seed, -3, 3);
  } else if (kind == Input::kSpecial) {
    std::mt19937 rng(seed ^ 0x9e3779b9u);
    std::uniform_int_distribution<int> pick(0, 19);
    for (float& x : v) {
      const int p = pick(rng);
      if (p == 0 || p == 1) x = std::numeric_limits<float>::quiet_NaN();
      if (p == 2) x = -INFINITY;
      if (p == 3) x = INFINITY;
    }
    const float fill[2] = {std::numeric_limits<float>::quiet_NaN(), -INFINITY};
    for (int64_t m = 1; m < M && m < 3; ++m)
      for (int64_t e = 0; e < stride; ++e) v[m * stride + e] = fill[m - 1];
  }
  return v;
}

struct RouteCase {
  int64_t M = 1, E = 1;
  int k = 1;
  moekit_scoring scoring = MOEKIT_SCORING_SOFTMAX;
  bool bias = false, renormalize = false;
  int groups = 0, topk_group = 0;
  float scaling = 1.0f;
  bool bf16 = false, ids64 = false, strided = false;
  Input input = Input::kContinuous;
  uint32_t seed = 1;

  std::string str() const {
    return "M=" + std::to_string(M) + " E=" + std::to_string(E) + " k=" + std::to_string(k) +
           (scoring == MOEKIT_SCORING_SIGMOID ? " sigmoid" : " softmax") + (bias ? " bias" : "") +
           (renormalize ? " renorm" : "") + " groups=" + std::to_string(groups) + "/" +
           std::to_string(topk_group) + " scale=" + std::to_string(scaling) +
           (bf16 ? " bf16" : " f32") + (ids64 ? " i64" : " i32") + (strided ? " strided" : "") +
           " input=" + std::to_string(static_cast<int>(input));
  }
};

// Inputs and outputs of one routing call; outputs start as sentinels.
struct RouteBuffers {
  std::vector<float> logits_f32;
  std::vector<uint16_t> logits_bf16;
  std::vector<float> bias;
  std::vector<float> weights;
  std::vector<int32_t> ids32;
  std::vector<int64_t> ids64;
  TopkArgs args;

  RouteBuffers(const RouteCase& c) {
    const int64_t ls = c.strided ? c.E + 3 : c.E, ws = c.strided ? c.k + 2 : c.k,
                  is = c.strided ? c.k + 1 : c.k;
    logits_f32 = make_logits(c.M, ls, c.input, c.seed);
    if (c.bf16) logits_bf16 = moekit_test::to_bf16(logits_f32);
    if (c.bias)
      bias = moekit_test::random_floats(static_cast<size_t>(c.E), c.seed + 7, -0.5f, 0.5f);
    weights.assign(static_cast<size_t>(c.M * ws), kSentinelWeight);
    ids32.assign(static_cast<size_t>(c.M * is), static_cast<int32_t>(kSentinelId));
    ids64.assign(static_cast<size_t>(c.M * is), kSentinelId);
    args.M = c.M;
    args.E = c.E;
    args.logits = c.bf16 ? static_cast<const void*>(logits_bf16.data()) : logits_f32.data();
    args.logits_stride = ls;
    args.logits_dtype = c.bf16 ? MOEKIT_BF16 : MOEKIT_F32;
    args.bias = c.bias ? bias.data() : nullptr;
    args.k = c.k;
    args.scoring = c.scoring;
    args.renormalize = c.renormalize;
    args.num_expert_group = c.groups;
    args.topk_group = c.topk_group;
    args.scaling = c.scaling;
    args.weights = weights.data();
    args.weights_stride = ws;
    args.ids = c.ids64 ? static_cast<void*>(ids64.data()) : ids32.data();
    args.ids_stride = is;
    args.ids_dtype = c.ids64 ? MOEKIT_I64 : MOEKIT_I32;
  }
  int64_t id(int64_t m, int j) const {
    return args.ids_dtype == MOEKIT_I64 ? ids64[m * args.ids_stride + j]
                                        : ids32[m * args.ids_stride + j];
  }
  float weight(int64_t m, int j) const { return weights[m * args.weights_stride + j]; }
};

bool weight_close(float got, float want) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= kWeightRelTol * std::fabs(want);
}

// Compares two routings of the same problem, including the untouched stride gaps.
void expect_same_routing(const RouteBuffers& got, const RouteBuffers& want,
                         const std::string& what) {
  const TopkArgs& a = want.args;
  int reported = 0;
  for (int64_t m = 0; m < a.M && reported < 5; ++m) {
    for (int j = 0; j < a.k; ++j) {
      if (got.id(m, j) != want.id(m, j) || !weight_close(got.weight(m, j), want.weight(m, j))) {
        ADD_FAILURE() << what << ": row " << m << " slot " << j << ": id " << got.id(m, j)
                      << " weight " << got.weight(m, j) << ", reference id " << want.id(m, j)
                      << " weight " << want.weight(m, j);
        ++reported;
        break;
      }
    }
    for (int64_t j = a.k; j < a.weights_stride; ++j)
      EXPECT_EQ(got.weights[m * a.weights_stride + j], kSentinelWeight) << what << ": gap written";
    for (int64_t j = a.k; j < a.ids_stride; ++j)
      EXPECT_EQ(got.id(m, static_cast<int>(j)), kSentinelId) << what << ": gap written";
  }
}

// ---- topk_route: every implementation against the reference --------------------------------

class TopkRoute : public testing::TestWithParam<int> {
 protected:
  const moekit::Impl<TopkArgs>& impl() const { return moekit::topk_route_impls()[GetParam()]; }

  void check(const RouteCase& c) {
    RouteBuffers got(c), want(c);
    const char* why = impl().supports ? impl().supports(got.args) : nullptr;
    ASSERT_EQ(why, nullptr) << impl().name << " refused " << c.str() << ": " << why;
    impl().run(got.args);
    moekit::ref_topk_route(want.args);
    expect_same_routing(got, want, std::string(impl().name) + " " + c.str());
  }
};

std::vector<int> divisors_above_one(int64_t n) {
  std::vector<int> d;
  for (int64_t g = 2; g <= n; ++g)
    if (n % g == 0) d.push_back(static_cast<int>(g));
  return d;
}

std::vector<int> k_values(int64_t E) {
  std::vector<int> ks;
  for (int k : {1, 2, 4, 6, 8, static_cast<int>(std::min<int64_t>(E, 32))})
    if (k <= E && (ks.empty() || ks.back() < k)) ks.push_back(k);
  return ks;
}

const int64_t kExpertCounts[] = {1, 2, 7, 8, 16, 60, 64, 128, 160, 256, 384, 512, 1000};

// The (bf16, ids64, strided) combinations a sweep checked, to assert that it checked all 8: the
// sweeps draw these flags from independent random bits (residues of one shared counter had tied
// them together, so some combinations never occurred). std::mt19937's raw output is fixed by
// the standard, so every platform checks the same cases.
struct LayoutCoverage {
  bool seen[2][2][2] = {};
  void add(const RouteCase& c) { seen[c.bf16][c.ids64][c.strided] = true; }
  void expect_all() const {
    for (int b = 0; b < 2; ++b)
      for (int i = 0; i < 2; ++i)
        for (int s = 0; s < 2; ++s)
          EXPECT_TRUE(seen[b][i][s])
              << "never checked: bf16 " << b << " ids64 " << i << " strided " << s;
  }
};

TEST_P(TopkRoute, UngroupedSweep) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  uint32_t seed = 1;
  std::mt19937 flag_bits(1);
  LayoutCoverage coverage;
  for (int64_t E : kExpertCounts) {
    for (int k : k_values(E)) {
      for (int variant = 0; variant < 16; ++variant) {
        RouteCase c;
        c.E = E;
        c.k = k;
        c.scoring = variant & 1 ? MOEKIT_SCORING_SIGMOID : MOEKIT_SCORING_SOFTMAX;
        c.bias = variant & 2;
        c.renormalize = variant & 4;
        c.scaling = variant & 8 ? 2.5f : 1.0f;
        const uint32_t bits = flag_bits();
        c.bf16 = bits & 1;
        c.ids64 = bits & 2;
        c.strided = bits & 4;
        for (Input input : {Input::kContinuous, Input::kSmallInts, Input::kSpecial}) {
          c.input = input;
          c.seed = seed++;
          for (int64_t M : {1, 5}) {
            c.M = M;
            check(c);
          }
        }
        if (HasFailure()) return;
        coverage.add(c);
      }
    }
  }
  coverage.expect_all();
}

TEST_P(TopkRoute, GroupedSweep) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  uint32_t seed = 1000;
  std::mt19937 flag_bits(1000);
  LayoutCoverage coverage;
  bool scoring_ids64[2][2] = {};  // [sigmoid][ids64]
  for (int64_t E : kExpertCounts) {
    for (int groups : divisors_above_one(E)) {
      const int64_t group_size = E / groups;
      for (int topk_group : {1, std::max(1, groups / 2), groups}) {
        for (int k : k_values(E)) {
          if (k > topk_group * group_size) continue;
          RouteCase c;
          c.M = 5;
          c.E = E;
          c.k = k;
          c.groups = groups;
          c.topk_group = topk_group;
          // Each flag from its own bits: renormalize 3 cases in 4, scaling 1 in 4.
          const uint32_t bits = flag_bits();
          c.scoring = bits & 1 ? MOEKIT_SCORING_SIGMOID : MOEKIT_SCORING_SOFTMAX;
          c.bias = bits & 2;
          c.renormalize = (bits >> 2 & 3) != 0;
          c.scaling = (bits >> 4 & 3) == 0 ? 2.5f : 1.0f;
          c.bf16 = bits & 64;
          c.ids64 = bits & 128;
          c.strided = bits & 256;
          c.input = static_cast<Input>((bits >> 9) % 3);
          c.seed = seed++;
          check(c);
          if (HasFailure()) return;
          coverage.add(c);
          scoring_ids64[c.scoring == MOEKIT_SCORING_SIGMOID][c.ids64] = true;
        }
      }
    }
  }
  coverage.expect_all();
  for (int sigmoid = 0; sigmoid < 2; ++sigmoid)
    for (int ids64 = 0; ids64 < 2; ++ids64)
      EXPECT_TRUE(scoring_ids64[sigmoid][ids64])
          << "never checked: " << (sigmoid ? "sigmoid" : "softmax") << " with ids64 " << ids64;
}

// Many tokens (the threaded path) on the production shapes and a few others.
TEST_P(TopkRoute, ManyTokens) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  uint32_t seed = 5000;
  for (int64_t E : {8, 64, 256, 1000}) {
    for (int variant = 0; variant < 4; ++variant) {
      RouteCase c;
      c.M = 333;
      c.E = E;
      c.k = static_cast<int>(std::min<int64_t>(E, 8));
      c.scoring = variant & 1 ? MOEKIT_SCORING_SIGMOID : MOEKIT_SCORING_SOFTMAX;
      c.bias = variant & 2;
      c.renormalize = true;
      if (variant == 3 && E % 8 == 0) {
        c.groups = 8;
        c.topk_group = 4;
        c.scaling = 2.5f;
        c.k = static_cast<int>(std::min<int64_t>(c.k, 4 * (E / 8)));
      }
      c.bf16 = variant == 1;
      c.ids64 = variant == 2;
      c.strided = variant == 0;
      c.input = static_cast<Input>(variant % 3);
      c.seed = seed++;
      check(c);
    }
  }
}

// A bias that flips the choice: the unbiased best expert loses, and the weights stay the
// unbiased scores.
TEST_P(TopkRoute, BiasFlipsChoiceWeightsStayUnbiased) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const int64_t E = 40;
  std::vector<float> logits(E, -2.0f), bias(E, 0.0f);
  logits[3] = 3.0f;   // best unbiased
  logits[17] = 1.0f;  // second
  bias[17] = 1.0f;    // sigmoid(1) + 1 > sigmoid(3)
  bias[3] = -0.5f;
  std::vector<float> weights(2, kSentinelWeight);
  std::vector<int32_t> ids(2, -1);
  TopkArgs a;
  a.M = 1;
  a.E = E;
  a.logits = logits.data();
  a.logits_stride = E;
  a.bias = bias.data();
  a.k = 2;
  a.scoring = MOEKIT_SCORING_SIGMOID;
  a.weights = weights.data();
  a.weights_stride = 2;
  a.ids = ids.data();
  a.ids_stride = 2;
  impl().run(a);
  EXPECT_EQ(ids[0], 17);
  EXPECT_EQ(ids[1], 3);
  EXPECT_EQ(weights[0], 1.0f / (1.0f + std::exp(-1.0f)));
  EXPECT_EQ(weights[1], 1.0f / (1.0f + std::exp(-3.0f)));
}

// Deliberate ties: equal scores go to the lower index; -0 and +0 are equal; NaN ranks last and
// an all-NaN row gives the lowest ids with NaN weights.
TEST_P(TopkRoute, TiesZerosAndNaN) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const int64_t E = 37;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> logits(3 * E, 0.5f);
  logits[5] = logits[30] = logits[12] = 2.0f;  // row 0: three-way tie at the top
  logits[E + 9] = -0.0f;                       // row 1: -0 and +0 tie, all else NaN
  logits[E + 4] = 0.0f;
  for (int64_t e = 0; e < E; ++e)
    if (e != 9 && e != 4) logits[E + e] = nan;
  for (int64_t e = 0; e < E; ++e) logits[2 * E + e] = nan;  // row 2: all NaN
  for (moekit_scoring scoring : {MOEKIT_SCORING_SOFTMAX, MOEKIT_SCORING_SIGMOID}) {
    std::vector<float> weights(3 * 4, kSentinelWeight);
    std::vector<int32_t> ids(3 * 4, -1);
    TopkArgs a;
    a.M = 3;
    a.E = E;
    a.logits = logits.data();
    a.logits_stride = E;
    a.k = 4;
    a.scoring = scoring;
    a.weights = weights.data();
    a.weights_stride = 4;
    a.ids = ids.data();
    a.ids_stride = 4;
    impl().run(a);
    EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + 4),
              (std::vector<int32_t>{5, 12, 30, 0}));
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + 4, ids.begin() + 8),
              (std::vector<int32_t>{4, 9, 0, 1}));
    EXPECT_TRUE(std::isnan(weights[6]) && std::isnan(weights[7]));
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + 8, ids.end()), (std::vector<int32_t>{0, 1, 2, 3}));
    for (int j = 8; j < 12; ++j) EXPECT_TRUE(std::isnan(weights[j])) << j;
  }
}

// The fast paths refuse what they do not handle, with a reason, so the reference runs.
TEST_P(TopkRoute, RefusesWithReason) {
  if (impl().supports == nullptr) GTEST_SKIP() << impl().name << " accepts everything";
  TopkArgs a;
  a.M = 1;
  a.E = 2048;
  a.k = 8;
  EXPECT_NE(impl().supports(a), nullptr);
  a.E = 256;
  a.k = 33;
  EXPECT_NE(impl().supports(a), nullptr);
  a.k = 8;
  a.num_expert_group = 3;  // does not divide 256
  a.topk_group = 1;
  EXPECT_NE(impl().supports(a), nullptr);
  a.num_expert_group = 8;
  a.topk_group = 4;
  EXPECT_EQ(impl().supports(a), nullptr);
  const moekit::Impl<TopkArgs>& chosen =
      moekit::choose("topk_route", moekit::topk_route_impls(), a, MOEKIT_ISA_AMX);
  EXPECT_NE(std::string(chosen.name).rfind("ref", 0), 0u) << "a fast path should take E=256, k=8";
  a.k = 33;
  EXPECT_EQ(
      std::string(moekit::choose("topk_route", moekit::topk_route_impls(), a, MOEKIT_ISA_AMX).name),
      "ref_topk_route");
}

INSTANTIATE_TEST_SUITE_P(Impls, TopkRoute,
                         testing::ValuesIn(moekit_test::impl_indices(moekit::topk_route_impls())),
                         (moekit_test::impl_test_name<TopkArgs, moekit::topk_route_impls>));

// ---- router_topk ------------------------------------------------------------------------------

struct RouterCase {
  int64_t M = 1, E = 8, H = 16;
  int k = 2;
  bool bf16 = false, strided = false, ints = false, logits_out = true, grouped = false;
  uint32_t seed = 1;
  std::string str() const {
    return "M=" + std::to_string(M) + " E=" + std::to_string(E) + " H=" + std::to_string(H) +
           " k=" + std::to_string(k) + (bf16 ? " bf16" : " f32") + (strided ? " strided" : "") +
           (ints ? " ints" : " floats") + (logits_out ? " logits_out" : "") +
           (grouped ? " grouped" : "");
  }
};

struct RouterBuffers {
  std::vector<float> hidden_f32, gate, bias, weights, logits;
  std::vector<uint16_t> hidden_bf16;
  std::vector<int32_t> ids;
  RouterTopkArgs args;

  RouterBuffers(const RouterCase& c) {
    const int64_t hs = c.strided ? c.H + 5 : c.H, gs = c.strided ? c.H + 3 : c.H;
    if (c.ints) {
      // Small integers: every product and partial sum is exact in f32, so the logits do not
      // depend on the summation order and the routing must equal the reference's exactly.
      hidden_f32 = moekit_test::random_ints(static_cast<size_t>(c.M * hs), c.seed, -3, 3);
      gate = moekit_test::random_ints(static_cast<size_t>(c.E * gs), c.seed + 1, -3, 3);
    } else {
      hidden_f32 = moekit_test::random_floats(static_cast<size_t>(c.M * hs), c.seed, -1, 1);
      gate = moekit_test::random_floats(static_cast<size_t>(c.E * gs), c.seed + 1, -0.1f, 0.1f);
    }
    if (c.bf16) {
      hidden_bf16 = moekit_test::to_bf16(hidden_f32);
      hidden_f32 = moekit_test::from_bf16(hidden_bf16);
    }
    bias = moekit_test::random_floats(static_cast<size_t>(c.E), c.seed + 2, -0.2f, 0.2f);
    weights.assign(static_cast<size_t>(c.M * c.k), kSentinelWeight);
    ids.assign(static_cast<size_t>(c.M * c.k), -1);
    logits.assign(static_cast<size_t>(c.M * (c.E + 1)), std::numeric_limits<float>::quiet_NaN());
    args.H = c.H;
    args.hidden = c.bf16 ? static_cast<const void*>(hidden_bf16.data()) : hidden_f32.data();
    args.hidden_stride = hs;
    args.hidden_dtype = c.bf16 ? MOEKIT_BF16 : MOEKIT_F32;
    args.gate = gate.data();
    args.gate_stride = gs;
    args.logits_out = c.logits_out ? logits.data() : nullptr;
    args.logits_out_stride = c.E + 1;
    TopkArgs& r = args.route;
    r.M = c.M;
    r.E = c.E;
    r.bias = bias.data();
    r.k = c.k;
    r.scoring = MOEKIT_SCORING_SIGMOID;
    r.renormalize = true;
    if (c.grouped) {
      r.num_expert_group = 4;
      r.topk_group = 2;
      r.scaling = 2.5f;
    }
    r.weights = weights.data();
    r.weights_stride = c.k;
    r.ids = ids.data();
    r.ids_stride = c.k;
    r.ids_dtype = MOEKIT_I32;
  }
};

class RouterTopk : public testing::TestWithParam<int> {
 protected:
  const moekit::Impl<RouterTopkArgs>& impl() const {
    return moekit::router_topk_impls()[GetParam()];
  }

  void check(const RouterCase& c) {
    RouterBuffers got(c), want(c);
    const std::string what = std::string(impl().name) + " " + c.str();
    const char* why = impl().supports ? impl().supports(got.args) : nullptr;
    ASSERT_EQ(why, nullptr) << impl().name << " refused " << c.str() << ": " << why;
    impl().run(got.args);
    moekit::ref_router_topk(want.args);
    const int64_t M = c.M, E = c.E, H = c.H;
    // 1. The logits, within a bound on f32 dot-product error in any summation order:
    //    |error| <= (terms summed in sequence + reduction depth) * 2^-24 * sum |x_h g_h|.
    if (c.logits_out) {
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t e = 0; e < E; ++e) {
          double magnitude = 0.0;
          for (int64_t h = 0; h < H; ++h)
            magnitude +=
                std::fabs(static_cast<double>(got.hidden_f32[m * got.args.hidden_stride + h]) *
                          got.gate[e * got.args.gate_stride + h]);
          const double tol =
              c.ints ? 0.0 : (std::min<int64_t>(H, 1024) + 64) * std::ldexp(1.0, -24) * magnitude;
          const float g = got.logits[m * (E + 1) + e], w = want.logits[m * (E + 1) + e];
          ASSERT_LE(std::fabs(static_cast<double>(g) - w), tol)
              << what << " logit " << m << "," << e;
        }
        ASSERT_TRUE(std::isnan(got.logits[m * (E + 1) + E])) << what << ": logits_out gap written";
      }
    }
    // 2. The routing. With integer inputs the logits are exact in any summation order, so it
    //    must equal the reference's; otherwise it must equal the reference routing of the fused
    //    path's own logits (near-ties may legitimately differ from the double reference GEMM).
    std::vector<float> own_weights(static_cast<size_t>(M * c.k));
    std::vector<int32_t> own_ids(static_cast<size_t>(M * c.k));
    const float* want_weights = want.weights.data();
    const int32_t* want_ids = want.ids.data();
    if (!c.ints) {
      ASSERT_TRUE(c.logits_out) << "float inputs are checked through logits_out";
      TopkArgs r = got.args.route;
      r.logits = got.logits.data();
      r.logits_stride = E + 1;
      r.logits_dtype = MOEKIT_F32;
      r.weights = own_weights.data();
      r.ids = own_ids.data();
      moekit::ref_topk_route(r);
      want_weights = own_weights.data();
      want_ids = own_ids.data();
    }
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < c.k; ++j) {
        ASSERT_EQ(got.ids[m * c.k + j], want_ids[m * c.k + j])
            << what << " row " << m << " slot " << j;
        ASSERT_TRUE(weight_close(got.weights[m * c.k + j], want_weights[m * c.k + j]))
            << what << " row " << m << " slot " << j << ": " << got.weights[m * c.k + j] << " vs "
            << want_weights[m * c.k + j];
      }
  }
};

TEST_P(RouterTopk, Sweep) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  uint32_t seed = 1;
  for (int64_t M : {1, 2, 3, 4, 5, 7, 64, 133}) {
    for (int64_t E : {1, 7, 8, 60, 256}) {
      for (int64_t H : {1, 15, 16, 17, 100, 1030}) {
        if (M * E * H > 133 * 60 * 1030) continue;  // keep the double reference GEMM quick
        RouterCase c;
        c.M = M;
        c.E = E;
        c.H = H;
        c.k = static_cast<int>(std::min<int64_t>(E, 8));
        c.bf16 = seed % 3 == 0;
        c.strided = seed % 2 == 1;
        c.ints = seed % 4 < 2;
        c.logits_out = !c.ints || seed % 5 != 4;
        c.grouped = E % 4 == 0 && seed % 3 == 1;
        if (c.grouped) c.k = static_cast<int>(std::min<int64_t>(c.k, E / 2));
        c.seed = seed++;
        check(c);
      }
    }
  }
}

// Token counts around the packed-token panels (16-token transposes, 32-token panels, 64-token
// blocks), with H tails, bf16, strides and expert counts that leave partial expert tiles.
TEST_P(RouterTopk, TokenPanels) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  uint32_t seed = 300;
  for (int64_t M : {15, 16, 31, 33, 65, 97}) {
    for (int64_t E : {13, 64}) {
      for (int64_t H : {1, 16, 33, 300}) {
        RouterCase c;
        c.M = M;
        c.E = E;
        c.H = H;
        c.k = 6;
        c.bf16 = seed % 2 == 0;
        c.strided = seed % 3 == 0;
        c.ints = seed % 4 < 2;
        c.seed = seed++;
        check(c);
      }
    }
  }
}

TEST_P(RouterTopk, MiniMaxShape) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  for (int64_t M : {1, 9}) {
    for (bool ints : {true, false}) {
      RouterCase c;
      c.M = M;
      c.E = 256;
      c.H = 3072;
      c.k = 8;
      c.ints = ints;
      c.bf16 = M == 9;
      c.seed = 77 + static_cast<uint32_t>(M);
      check(c);
    }
  }
}

// Few tokens split the experts over threads (NOTE [few-token router split]): the logits, ids and
// weights must have the same bits whatever the thread count, with float inputs whose logits do
// depend on the summation order. Expert counts leave partial panels and uneven panel splits.
TEST_P(RouterTopk, SameBitsOnAnyThreadCount) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  struct Shape {
    int64_t M, E, H;
  };
  const Shape shapes[] = {{1, 256, 3072}, {2, 60, 3000}, {3, 13, 5003}, {5, 100, 700}, {1, 7, 16}};
  uint32_t seed = 500;
  for (const Shape& s : shapes) {
    RouterCase c;
    c.M = s.M;
    c.E = s.E;
    c.H = s.H;
    c.k = static_cast<int>(std::min<int64_t>(s.E, 8));
    c.bf16 = seed % 2 == 1;
    c.strided = seed % 3 == 0;
    c.seed = seed++;
    const int saved = moekit_num_threads();
    ASSERT_EQ(moekit_set_num_threads(1), MOEKIT_OK);
    RouterBuffers one(c);
    impl().run(one.args);
    for (int threads : {2, 3, 5}) {
      ASSERT_EQ(moekit_set_num_threads(threads), MOEKIT_OK);
      RouterBuffers many(c);
      impl().run(many.args);
      const std::string what =
          std::string(impl().name) + " " + c.str() + " " + std::to_string(threads) + " threads";
      ASSERT_EQ(std::memcmp(many.logits.data(), one.logits.data(), one.logits.size() * 4), 0)
          << what << ": logits differ";  // NaN gaps included: memcmp compares bits
      ASSERT_EQ(many.ids, one.ids) << what;
      ASSERT_EQ(std::memcmp(many.weights.data(), one.weights.data(), one.weights.size() * 4), 0)
          << what << ": weights differ";
    }
    ASSERT_EQ(moekit_set_num_threads(saved), MOEKIT_OK);
  }
}

INSTANTIATE_TEST_SUITE_P(Impls, RouterTopk,
                         testing::ValuesIn(moekit_test::impl_indices(moekit::router_topk_impls())),
                         (moekit_test::impl_test_name<RouterTopkArgs, moekit::router_topk_impls>));

// ---- C API ------------------------------------------------------------------------------------

namespace api {

constexpr int64_t kM = 3, kE = 12, kH = 20;
constexpr int kK = 4;

// Inputs and sentinel-filled outputs of one C-API call.
struct ApiCall {
  std::vector<float> logits = moekit_test::random_floats(kM * kE, 3);
  std::vector<float> hidden = moekit_test::random_floats(kM * kH, 4);
  std::vector<float> gate = moekit_test::random_floats(kE * kH, 5);
  std::vector<float> bias = moekit_test::random_floats(kE + 1, 6);
  std::vector<float> weights = std::vector<float>(kM * kK, kSentinelWeight);
  std::vector<int32_t> ids = std::vector<int32_t>(kM * kK, static_cast<int32_t>(kSentinelId));
  std::vector<float> logits_out = std::vector<float>(kM * kE + kM, kSentinelWeight);
  moekit_tensor t_logits = make_tensor(logits.data(), MOEKIT_F32, {kM, kE});
  moekit_tensor t_hidden = make_tensor(hidden.data(), MOEKIT_F32, {kM, kH});
  moekit_tensor t_gate = make_tensor(gate.data(), MOEKIT_F32, {kE, kH});
  moekit_tensor t_bias = make_tensor(bias.data(), MOEKIT_F32, {kE});
  moekit_tensor t_weights = make_tensor(weights.data(), MOEKIT_F32, {kM, kK});
  moekit_tensor t_ids = make_tensor(ids.data(), MOEKIT_I32, {kM, kK});
  moekit_tensor t_logits_out = make_tensor(logits_out.data(), MOEKIT_F32, {kM, kE});
  moekit_route_params params = [] {
    moekit_route_params p = moekit_route_params_default();
    p.top_k = kK;
    p.scoring = MOEKIT_SCORING_SIGMOID;
    p.renormalize = 1;
    return p;
  }();

  moekit_status route() {
    return moekit_topk_route(&t_logits, &t_bias, &params, &t_weights, &t_ids);
  }
  moekit_status router(bool with_logits = true) {
    return moekit_router_topk(&t_hidden, &t_gate, &t_bias, &params, &t_weights, &t_ids,
                              with_logits ? &t_logits_out : nullptr);
  }
  bool outputs_untouched() const {
    for (float w : weights)
      if (w != kSentinelWeight) return false;
    for (int32_t i : ids)
      if (i != kSentinelId) return false;
    for (float l : logits_out)
      if (l != kSentinelWeight) return false;
    return true;
  }
};

void expect_rejected(moekit_status s, const ApiCall& call, const std::string& argument) {
  EXPECT_NE(s, MOEKIT_OK);
  const std::string message = moekit_last_error();
  EXPECT_NE(message.find(": " + argument + ":"), std::string::npos)
      << "message does not name " << argument << ": " << message;
  EXPECT_TRUE(call.outputs_untouched()) << "outputs written on error: " << message;
}

TEST(TopkApi, RouteRejectsBadArguments) {
  {
    ApiCall c;
    c.params.top_k = 0;
    expect_rejected(c.route(), c, "params.top_k");
  }
  {
    ApiCall c;
    c.params.top_k = kE + 1;
    c.t_weights.shape[1] = c.t_ids.shape[1] = kE + 1;
    expect_rejected(c.route(), c, "params.top_k");
  }
  {
    ApiCall c;
    c.params.num_expert_group = 5;
    c.params.topk_group = 1;
    expect_rejected(c.route(), c, "params.num_expert_group");
  }
  {
    ApiCall c;
    c.params.num_expert_group = 4;
    c.params.topk_group = 5;
    expect_rejected(c.route(), c, "params.topk_group");
  }
  {
    ApiCall c;
    c.params.routed_scaling_factor = NAN;
    expect_rejected(c.route(), c, "params.routed_scaling_factor");
  }
  // (An out-of-range scoring value is not tested from C++: loading it is undefined behaviour
  // here, which the sanitizer build rejects; the entry point does check it for C callers.)
  {
    ApiCall c;
    expect_rejected(moekit_topk_route(nullptr, &c.t_bias, &c.params, &c.t_weights, &c.t_ids), c,
                    "logits");
  }
  {
    ApiCall c;
    expect_rejected(moekit_topk_route(&c.t_logits, &c.t_bias, nullptr, &c.t_weights, &c.t_ids), c,
                    "params");
  }
  {
    ApiCall c;
    expect_rejected(moekit_topk_route(&c.t_logits, &c.t_bias, &c.params, nullptr, &c.t_ids), c,
                    "weights");
  }
  {
    ApiCall c;
    expect_rejected(moekit_topk_route(&c.t_logits, &c.t_bias, &c.params, &c.t_weights, nullptr), c,
                    "ids");
  }
  {
    ApiCall c;
    c.t_logits.data = nullptr;
    expect_rejected(c.route(), c, "logits");
  }
  {
    ApiCall c;
    c.t_logits.dtype = MOEKIT_I32;
    expect_rejected(c.route(), c, "logits");
  }
  {
    ApiCall c;
    c.t_weights.dtype = MOEKIT_BF16;
    expect_rejected(c.route(), c, "weights");
  }
  {
    ApiCall c;
    c.t_ids.dtype = MOEKIT_F32;
    expect_rejected(c.route(), c, "ids");
  }
  {
    ApiCall c;
    c.t_ids.shape[0] = kM - 1;
    expect_rejected(c.route(), c, "ids");
  }
  {
    ApiCall c;
    c.t_weights.shape[1] = kK + 1;
    expect_rejected(c.route(), c, "weights");
  }
  {
    ApiCall c;
    c.t_bias.shape[0] = kE + 1;
    expect_rejected(c.route(), c, "bias");
  }
  {
    ApiCall c;
    c.t_bias.dtype = MOEKIT_BF16;
    expect_rejected(c.route(), c, "bias");
  }
  {
    ApiCall c;
    c.t_bias = make_tensor(c.bias.data(), MOEKIT_F32, {1, kE});
    expect_rejected(c.route(), c, "bias");
  }
}

TEST(TopkApi, RouterRejectsBadArguments) {
  {
    ApiCall c;
    c.params.top_k = 0;
    expect_rejected(c.router(), c, "params.top_k");
  }
  {
    ApiCall c;
    c.params.top_k = kE + 1;
    expect_rejected(c.router(), c, "params.top_k");
  }
  {
    ApiCall c;
    c.params.num_expert_group = 5;
    c.params.topk_group = 1;
    expect_rejected(c.router(), c, "params.num_expert_group");
  }
  {
    ApiCall c;
    c.t_hidden.dtype = MOEKIT_I64;
    expect_rejected(c.router(), c, "hidden");
  }
  {
    ApiCall c;
    c.t_gate.dtype = MOEKIT_BF16;
    expect_rejected(c.router(), c, "gate_weight");
  }
  {
    ApiCall c;
    c.t_gate.shape[1] = kH - 1;
    expect_rejected(c.router(), c, "gate_weight");
  }
  {
    ApiCall c;
    expect_rejected(moekit_router_topk(&c.t_hidden, nullptr, &c.t_bias, &c.params, &c.t_weights,
                                       &c.t_ids, nullptr),
                    c, "gate_weight");
  }
  {
    ApiCall c;
    expect_rejected(moekit_router_topk(nullptr, &c.t_gate, &c.t_bias, &c.params, &c.t_weights,
                                       &c.t_ids, nullptr),
                    c, "hidden");
  }
  {
    ApiCall c;
    c.t_logits_out.shape[1] = kE + 1;
    expect_rejected(c.router(), c, "logits_out");
  }
  {
    ApiCall c;
    c.t_logits_out.dtype = MOEKIT_BF16;
    expect_rejected(c.router(), c, "logits_out");
  }
  {
    ApiCall c;
    c.t_bias.shape[0] = kE - 1;
    expect_rejected(c.router(), c, "bias");
  }
  {
    ApiCall c;
    c.t_ids.dtype = MOEKIT_BF16;
    expect_rejected(c.router(), c, "ids");
  }
}

// The public entry points pick a fast path on this CPU and agree with the reference.
TEST(TopkApi, ValidCallsRouteLikeTheReference) {
  ApiCall c;
  ASSERT_EQ(c.route(), MOEKIT_OK) << moekit_last_error();
  if (moekit_detected_isa() >= MOEKIT_ISA_AVX2) {
    EXPECT_EQ(std::string(moekit_last_impl("topk_route")).rfind("topk_route_", 0), 0u)
        << moekit_last_impl("topk_route");
  }
  std::vector<float> ref_weights(kM * kK);
  std::vector<int32_t> ref_ids(kM * kK);
  TopkArgs a;
  a.M = kM;
  a.E = kE;
  a.logits = c.logits.data();
  a.logits_stride = kE;
  a.bias = c.bias.data();
  a.k = kK;
  a.scoring = MOEKIT_SCORING_SIGMOID;
  a.renormalize = true;
  a.weights = ref_weights.data();
  a.weights_stride = kK;
  a.ids = ref_ids.data();
  a.ids_stride = kK;
  moekit::ref_topk_route(a);
  EXPECT_EQ(c.ids, ref_ids);
  for (size_t i = 0; i < ref_weights.size(); ++i)
    EXPECT_TRUE(weight_close(c.weights[i], ref_weights[i]));

  ApiCall r;
  ASSERT_EQ(r.router(), MOEKIT_OK) << moekit_last_error();
  a.logits = r.logits_out.data();
  moekit::ref_topk_route(a);
  EXPECT_EQ(r.ids, ref_ids);
  EXPECT_EQ(r.logits_out.back(), kSentinelWeight);  // nothing past [M, E]
}

}  // namespace api

}  // namespace
