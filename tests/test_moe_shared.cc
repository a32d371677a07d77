// Shared experts of the fused MoE (moekit_fused_moe_shared): every fused_moe implementation
// that serves them, against an exact model on small integers (S = 1 and 2 shared experts, their
// inter I_s equal to and different from the routed I, odd and not a multiple of 16 or 32,
// shared_scale absent and per token, expert maps that keep some or none of the routed slots,
// f32/bf16 hidden and out, f32/bf16/FP8 weights, strided rows, outputs pre-filled with NaN),
// the reference against the same model, random values within tolerance, the same bits for any
// thread count, the fallback to the reference for shared handles the fast kernels cannot read,
// and the C API's checks.
//
// NOTE (exact model): as in test_moe_amx.cc, hidden and w1 are in {1, 2} and H >= 32, so every
// gate value g is an integer >= 32 and silu(g) rounds to g in f32 in every implementation; w3
// and w2 are in [-1, 1] (FP8: q in [-1, 1] times block scales in {1/4, 1/2, 1}), so up, act =
// g * up and the down sums are integers well below 2^24; routing weights are in {1/2, 1} and
// shared_scale in {0, 1/2, 1, 2, -1}. Kernels with bf16 operands round act to bf16 (RNE), the
// others keep it in f32: the model does the same, and each output then equals it exactly.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "kernels/moe/moe_amx.h"
#include "moekit/moekit.hpp"
#include "reference/numeric.h"
#include "reference/reference.h"
#include "tests/test_util.h"

namespace {

using moekit::FusedMoeArgs;
using moekit_test::make_tensor;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- weights ----------------------------------------------------------------------------------

// How a handle is stored: weight dtype and packing layout (AUTO: what this machine prefers).
struct Storage {
  moekit_dtype dtype;
  moekit_pack_layout layout;
  const char* name;
};
// FP8 blocks of 16 x 32: the VNNI form and the AMX kernel hold them, and I = 40 or 24 leaves
// partial blocks.
constexpr int64_t kBlockN = 16, kBlockK = 32;
const Storage kStorages[] = {
    {MOEKIT_BF16, MOEKIT_LAYOUT_AUTO, "bf16_auto"},
    {MOEKIT_BF16, MOEKIT_LAYOUT_VNNI, "bf16_vnni"},
    {MOEKIT_F32, MOEKIT_LAYOUT_VNNI, "f32_vnni"},
    {MOEKIT_FP8_E4M3, MOEKIT_LAYOUT_VNNI, "fp8_vnni"},
};

uint8_t fp8_from_f32(float v) {
  for (int b = 0; b < 256; ++b)
    if (moekit::fp8_e4m3_to_f32(static_cast<uint8_t>(b)) == v) return static_cast<uint8_t>(b);
  ADD_FAILURE() << v << " is not an fp8 e4m3 value";
  return 0;
}

// E experts [H, I] with their values (dequantized, as f32) and a packed handle.
struct Experts {
  int64_t E = 0, H = 0, I = 0;
  std::vector<std::vector<float>> w[3];  // w1 [I][H], w3 [I][H], w2 [H][I] per expert
  moekit::Experts packed;
};

// integers: the exact regime of the NOTE; else random values scaled to keep activations O(1).
std::unique_ptr<Experts> make_experts(int64_t E, int64_t H, int64_t I, const Storage& st,
                                      uint32_t seed, bool integers) {
  auto x = std::make_unique<Experts>();
  x->E = E, x->H = H, x->I = I;
  std::mt19937 rng(seed);
  std::vector<std::vector<uint16_t>> b16[3];
  std::vector<std::vector<uint8_t>> q8[3];
  std::vector<std::vector<float>> scales[3];
  std::vector<const void*> ptr[3];
  std::vector<const float*> scale_ptr[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t rows = i == 2 ? H : I, cols = i == 2 ? I : H;
    const int64_t kb = (cols + kBlockK - 1) / kBlockK, nb = (rows + kBlockN - 1) / kBlockN;
    for (int64_t e = 0; e < E; ++e) {
      std::vector<float> v;
      std::vector<float> s(static_cast<size_t>(nb * kb), 1.0f);
      if (integers) {
        v = i == 0 ? moekit_test::random_ints(rows * cols, rng(), 1, 2)
                   : moekit_test::random_ints(rows * cols, rng(), -1, 1);
        if (st.dtype == MOEKIT_FP8_E4M3 && i > 0)
          for (float& f : s) f = std::ldexp(1.0f, -static_cast<int>(rng() % 3));
      } else {
        const float r = (i == 2 ? 2.0f / std::sqrt(float(I)) : 2.0f / std::sqrt(float(H)));
        v = moekit_test::random_floats(rows * cols, rng(), -r, r);
        if (st.dtype == MOEKIT_FP8_E4M3)  // q in [-8, 8] at the fp8 grid, scale r / 8
          for (float& f : s) f = r / 8;
      }
      std::vector<float> value(v.size());
      if (st.dtype == MOEKIT_FP8_E4M3) {
        std::vector<uint8_t> q(v.size());
        for (int64_t n = 0; n < rows; ++n)
          for (int64_t c = 0; c < cols; ++c) {
            const float scale = s[(n / kBlockN) * kb + c / kBlockK];
            // Integers: q = v / scale is exact; random: q on the integer grid [-8, 8].
            const float qv =
                integers ? v[n * cols + c] / scale : std::round(v[n * cols + c] / scale);
            q[n * cols + c] = fp8_from_f32(qv);
            value[n * cols + c] = moekit::fp8_e4m3_to_f32(q[n * cols + c]) * scale;
          }
        q8[i].push_back(std::move(q));
      } else if (st.dtype == MOEKIT_BF16) {
        b16[i].push_back(moekit_test::to_bf16(v));
        value = moekit_test::from_bf16(b16[i].back());
      } else {
        value = v;
      }
      scales[i].push_back(std::move(s));
      x->w[i].push_back(std::move(value));
    }
    for (int64_t e = 0; e < E; ++e) {
      ptr[i].push_back(st.dtype == MOEKIT_FP8_E4M3 ? static_cast<const void*>(q8[i][e].data())
                       : st.dtype == MOEKIT_BF16   ? static_cast<const void*>(b16[i][e].data())
                                                   : static_cast<const void*>(x->w[i][e].data()));
      scale_ptr[i].push_back(scales[i][e].data());
    }
  }
  moekit_experts_desc d{};
  d.num_experts = E, d.hidden = H, d.inter = I, d.dtype = st.dtype;
  d.w1 = ptr[0].data(), d.w3 = ptr[1].data(), d.w2 = ptr[2].data();
  if (st.dtype == MOEKIT_FP8_E4M3) {
    d.w1_scale = scale_ptr[0].data(), d.w3_scale = scale_ptr[1].data();
    d.w2_scale = scale_ptr[2].data();
    d.block_n = kBlockN, d.block_k = kBlockK;
  }
  moekit_experts* h = nullptr;
  EXPECT_EQ(moekit_experts_pack(&d, st.layout, &h), MOEKIT_OK) << moekit_last_error();
  x->packed.reset(h);
  return x;
}

// ---- problems -----------------------------------------------------------------------------------

enum MapMode { kNoMap, kHalfMap, kAllOffRank };

struct Case {
  const char* name;
  int64_t E, H, I, M, k, S, I_s;
  MapMode map;
};
// Routed and shared experts with equal and different inters (odd, below, at and above the 16-,
// 32-, 64- and 128-wide tiles), decode and prefill, and one case of more rows than a pipeline
// chunk (4096) so that a chunk boundary falls among the shared rows.
const Case kCases[] = {
    {"decode_S1_same_inter", 4, 32, 32, 1, 2, 1, 32, kNoMap},
    {"S2_inter40", 4, 40, 48, 17, 2, 2, 40, kNoMap},
    {"S1_inter72_above_tile", 3, 48, 16, 33, 3, 1, 72, kNoMap},
    {"S2_inter17_odd_hidden_half_map", 5, 33, 24, 9, 2, 2, 17, kHalfMap},
    {"all_routed_off_rank", 4, 32, 32, 12, 2, 1, 40, kAllOffRank},
    {"long_shared_segments", 2, 47, 24, 150, 1, 1, 40, kNoMap},
    {"two_chunks", 4, 32, 16, 1500, 2, 2, 24, kHalfMap},
    {"both_inters_above_128_wide_tiles", 3, 32, 136, 20, 2, 1, 150, kNoMap},
};

struct Combo {
  moekit_dtype hidden, out;
};
const Combo kCombos[] = {{MOEKIT_BF16, MOEKIT_BF16},
                         {MOEKIT_F32, MOEKIT_F32},
                         {MOEKIT_BF16, MOEKIT_F32},
                         {MOEKIT_F32, MOEKIT_BF16}};

// Inputs of one (case, storage, integers); hidden and out dtypes vary per run.
struct Problem {
  Case c;
  bool integers = true;
  std::unique_ptr<Experts> routed, shared;
  int64_t ld = 0;        // row stride of hidden and out (a gap after H on odd cases)
  std::vector<float> x;  // [M][ld], exact in bf16
  std::vector<int32_t> ids, map;
  std::vector<float> weights, scale;  // [M][k], [M]

  FusedMoeArgs args(const std::vector<unsigned char>& hidden, moekit_dtype hidden_dtype, void* out,
                    moekit_dtype out_dtype, bool with_scale, int threads) const {
    FusedMoeArgs a;
    a.experts = routed->packed.get();
    a.M = c.M;
    a.k = c.k;
    a.hidden = hidden.data();
    a.hidden_stride = ld;
    a.hidden_dtype = hidden_dtype;
    a.topk_weights = weights.data();
    a.topk_weights_stride = c.k;
    a.topk_ids = ids.data();
    a.topk_ids_stride = c.k;
    a.topk_ids_dtype = MOEKIT_I32;
    a.expert_map = map.empty() ? nullptr : map.data();
    a.shared = shared->packed.get();
    a.shared_scale = with_scale ? scale.data() : nullptr;
    a.out = out;
    a.out_stride = ld;
    a.out_dtype = out_dtype;
    a.threads = threads;
    return a;
  }

  std::vector<unsigned char> hidden_as(moekit_dtype dt) const {
    std::vector<unsigned char> h(x.size() * (dt == MOEKIT_BF16 ? 2 : 4));
    for (size_t i = 0; i < x.size(); ++i) moekit::store_float(h.data(), dt == MOEKIT_BF16, i, x[i]);
    return h;
  }

  // The model: f32 values of out [M][H] before the output dtype's rounding; act rounded to bf16
  // when round_act. Computed once per variant.
  const std::vector<float>& model(bool with_scale, bool round_act) const {
    std::vector<float>& m = models[with_scale][round_act];
    if (m.empty()) m = compute_model(with_scale, round_act);
    return m;
  }
  mutable std::vector<float> models[2][2];

  std::vector<float> compute_model(bool with_scale, bool round_act) const {
    const int64_t H = c.H;
    std::vector<double> sum(static_cast<size_t>(c.M * H), 0.0);
    const auto add_expert = [&](const Experts& w, int64_t e, int64_t m, double weight) {
      std::vector<double> act(static_cast<size_t>(w.I));
      for (int64_t i = 0; i < w.I; ++i) {
        double g = 0, u = 0;
        for (int64_t h = 0; h < H; ++h) {
          g += static_cast<double>(x[m * ld + h]) * w.w[0][e][i * H + h];
          u += static_cast<double>(x[m * ld + h]) * w.w[1][e][i * H + h];
        }
        const double a = g / (1.0 + std::exp(-g)) * u;
        act[i] = round_act ? moekit::bf16_to_f32(moekit::f32_to_bf16(static_cast<float>(a))) : a;
      }
      for (int64_t h = 0; h < H; ++h) {
        double d = 0;
        for (int64_t i = 0; i < w.I; ++i) d += act[i] * w.w[2][e][h * w.I + i];
        sum[m * H + h] += weight * d;
      }
    };
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t j = 0; j < c.k; ++j) {
        const int64_t e = map.empty() ? ids[m * c.k + j] : map[ids[m * c.k + j]];
        if (e >= 0) add_expert(*routed, e, m, weights[m * c.k + j]);
      }
      for (int64_t s = 0; s < c.S; ++s) add_expert(*shared, s, m, with_scale ? scale[m] : 1.0);
    }
    std::vector<float> out(sum.size());
    for (size_t i = 0; i < sum.size(); ++i) out[i] = static_cast<float>(sum[i]);
    return out;
  }
};

const Problem& problem(int case_index, int storage_index, bool integers) {
  static std::map<std::tuple<int, int, bool>, std::unique_ptr<Problem>> cache;
  auto& slot = cache[{case_index, storage_index, integers}];
  if (slot) return *slot;
  slot = std::make_unique<Problem>();
  Problem& p = *slot;
  p.c = kCases[case_index];
  p.integers = integers;
  const Storage& st = kStorages[storage_index];
  const uint32_t seed = 100 + 31 * case_index + (integers ? 0 : 7);
  p.routed = make_experts(p.c.E, p.c.H, p.c.I, st, seed, integers);
  p.shared = make_experts(p.c.S, p.c.H, p.c.I_s, st, seed + 1, integers);
  p.ld = case_index % 2 ? p.c.H + 5 : p.c.H;
  std::mt19937 rng(seed + 2);
  p.x = integers ? moekit_test::random_ints(p.c.M * p.ld, rng(), 1, 2)
                 : moekit_test::random_floats(p.c.M * p.ld, rng());
  for (float& v : p.x) v = moekit::bf16_to_f32(moekit::f32_to_bf16(v));
  const int64_t global = p.c.map == kHalfMap ? 2 * p.c.E : p.c.E;
  if (p.c.map == kHalfMap)
    for (int64_t e = 0; e < global; ++e) p.map.push_back(e % 2 ? -1 : static_cast<int32_t>(e / 2));
  if (p.c.map == kAllOffRank) p.map.assign(global, -1);
  std::vector<int32_t> pool(global);
  for (int64_t e = 0; e < global; ++e) pool[e] = static_cast<int32_t>(e);
  const float kScales[] = {0.5f, 1.0f, 2.0f, -1.0f, 0.0f};
  for (int64_t m = 0; m < p.c.M; ++m) {
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t j = 0; j < p.c.k; ++j) {
      p.ids.push_back(pool[j]);
      p.weights.push_back(integers ? (rng() % 2 ? 0.5f : 1.0f)
                                   : std::uniform_real_distribution<float>(0.1f, 1.0f)(rng));
    }
    p.scale.push_back(integers ? kScales[rng() % 5]
                               : std::uniform_real_distribution<float>(0.0f, 1.0f)(rng));
  }
  return p;
}

// ---- every implementation ----------------------------------------------------------------------

class FusedMoeSharedTest : public ::testing::TestWithParam<int> {
 protected:
  const moekit::Impl<FusedMoeArgs>& impl() const { return moekit::fused_moe_impls()[GetParam()]; }
  void SetUp() override { MOEKIT_SKIP_IF_CANNOT_RUN(impl()); }
  void TearDown() override { moekit::amx_set_min_rows(0); }
  bool is_reference() const { return std::string(impl().name).rfind("ref", 0) == 0; }
  bool is_amx() const { return std::string(impl().name).find("amx") != std::string::npos; }
  // The storages this implementation must serve: the reference all, the others those of the
  // weight dtype in their name (both bf16 ones: every bf16 kernel reads the AMX layout that
  // AUTO picks on AMX machines).
  int storages_served() const {
    if (is_reference()) return static_cast<int>(std::size(kStorages));
    const std::string n = impl().name;
    int served = 0;
    for (const Storage& st : kStorages) {
      const char* tag = st.dtype == MOEKIT_BF16  ? "_bf16_"
                        : st.dtype == MOEKIT_F32 ? "_f32_"
                                                 : "_fp8_";
      served += n.find(tag) != std::string::npos;
    }
    return served;
  }
  // Activations and the intermediate in bf16 (see the fp8 and bf16 microkernels' a_dtype).
  bool bf16_operands() const {
    const std::string n = impl().name;
    return n.find("amx") != std::string::npos || n.find("avx512bf16") != std::string::npos ||
           n.find("avx512vbmi") != std::string::npos;
  }

  // Runs the implementation (false if it refuses); out pre-filled with NaN, stride gap included.
  bool run(const FusedMoeArgs& a, std::vector<unsigned char>* out, int64_t rows, int64_t ld) const {
    const bool bf = a.out_dtype == MOEKIT_BF16;
    out->assign(static_cast<size_t>(rows * ld * (bf ? 2 : 4)), 0);
    for (int64_t i = 0; i < rows * ld; ++i) moekit::store_float(out->data(), bf, i, kNaN);
    FusedMoeArgs b = a;
    b.out = out->data();
    if (impl().supports && impl().supports(b) != nullptr) return false;
    impl().run(b);
    return true;
  }
};

// Each implementation serves the storages it accepts and must equal the model exactly; the
// reference serves them all.
TEST_P(FusedMoeSharedTest, ExactOnSmallIntegers) {
  int ran = 0;
  // AMX entries: the default row threshold (decode rows on AVX-512) and every segment on tiles.
  const std::vector<int64_t> min_rows =
      is_amx() ? std::vector<int64_t>{0, 1} : std::vector<int64_t>{0};
  for (int ci = 0; ci < static_cast<int>(std::size(kCases)); ++ci)
    for (int si = 0; si < static_cast<int>(std::size(kStorages)); ++si) {
      const Problem& p = problem(ci, si, true);
      for (bool with_scale : {false, true}) {
        const std::vector<float> want = p.model(with_scale, bf16_operands() && !is_reference());
        for (int oi = 0; oi < static_cast<int>(std::size(kCombos)); ++oi) {
          // The reference (slow, and checked against the model below) runs one combo per case.
          if (is_reference() && oi != ci % static_cast<int>(std::size(kCombos))) continue;
          const Combo& co = kCombos[oi];
          const std::vector<unsigned char> hidden = p.hidden_as(co.hidden);
          const FusedMoeArgs a = p.args(hidden, co.hidden, nullptr, co.out, with_scale, 2);
          for (int64_t mr : min_rows) {
            moekit::amx_set_min_rows(mr);
            std::vector<unsigned char> out;
            if (!run(a, &out, p.c.M, p.ld)) continue;
            ++ran;
            const bool bf = co.out == MOEKIT_BF16;
            for (int64_t m = 0; m < p.c.M; ++m)
              for (int64_t h = 0; h < p.ld; ++h) {
                const float got = moekit::load_float(out.data(), bf, m * p.ld + h);
                if (h >= p.c.H) {
                  ASSERT_TRUE(std::isnan(got)) << p.c.name << ": stride gap written";
                  continue;
                }
                float w = want[m * p.c.H + h];
                if (bf) w = moekit::bf16_to_f32(moekit::f32_to_bf16(w));
                ASSERT_EQ(got, w) << p.c.name << " " << kStorages[si].name << " hidden "
                                  << moekit_dtype_name(co.hidden) << " out "
                                  << moekit_dtype_name(co.out) << " scale " << with_scale
                                  << " min_rows " << mr << " at [" << m << ", " << h << "]";
              }
          }
        }
      }
    }
  // Every case, storage served, scale mode, combo (the reference one per case) and threshold.
  const int combos = is_reference() ? 1 : static_cast<int>(std::size(kCombos));
  EXPECT_EQ(ran, static_cast<int>(std::size(kCases)) * storages_served() * 2 * combos *
                     static_cast<int>(min_rows.size()))
      << impl().name;
}

// Random values: within the tolerances of test_moe.cc of the reference.
TEST_P(FusedMoeSharedTest, RandomWithinToleranceOfTheReference) {
  if (is_reference()) GTEST_SKIP() << "the reference is the oracle";
  int ran = 0;
  for (int ci : {1, 3, 5})
    for (int si = 0; si < static_cast<int>(std::size(kStorages)); ++si) {
      const Problem& p = problem(ci, si, false);
      const std::vector<unsigned char> hidden = p.hidden_as(MOEKIT_F32);
      const FusedMoeArgs a = p.args(hidden, MOEKIT_F32, nullptr, MOEKIT_F32, true, 2);
      std::vector<unsigned char> out;
      if (!run(a, &out, p.c.M, p.ld)) continue;
      ++ran;
      std::vector<float> want(static_cast<size_t>(p.c.M * p.ld), kNaN);
      FusedMoeArgs r = a;
      r.out = want.data();
      moekit::ref_fused_moe(r);
      double scale = 0;
      for (int64_t m = 0; m < p.c.M; ++m)
        for (int64_t h = 0; h < p.c.H; ++h)
          scale = std::max(scale, std::fabs(static_cast<double>(want[m * p.ld + h])));
      const double K = static_cast<double>(std::max({p.c.H, p.c.I, p.c.I_s}));
      const double tol = bf16_operands() ? std::ldexp(1.0, -6)
                         : kStorages[si].dtype == MOEKIT_FP8_E4M3
                             ? 1e-5
                             : 64 * std::ldexp(1.0, -24) * std::sqrt(K);
      for (int64_t m = 0; m < p.c.M; ++m)
        for (int64_t h = 0; h < p.c.H; ++h) {
          const float got = moekit::load_float(out.data(), false, m * p.ld + h);
          ASSERT_LE(std::fabs(static_cast<double>(got) - want[m * p.ld + h]), tol * scale)
              << p.c.name << " " << kStorages[si].name << " at [" << m << ", " << h << "]";
        }
    }
  EXPECT_EQ(ran, 3 * storages_served()) << impl().name;  // 3 cases x the storages served
}

TEST_P(FusedMoeSharedTest, SameBitsForOneAndTwoThreads) {
  int ran = 0;
  for (int ci : {2, 5})
    for (int si = 0; si < static_cast<int>(std::size(kStorages)); ++si) {
      const Problem& p = problem(ci, si, false);
      const std::vector<unsigned char> hidden = p.hidden_as(MOEKIT_BF16);
      std::vector<unsigned char> one, two, three;
      if (!run(p.args(hidden, MOEKIT_BF16, nullptr, MOEKIT_F32, true, 1), &one, p.c.M, p.ld))
        continue;
      ++ran;
      ASSERT_TRUE(
          run(p.args(hidden, MOEKIT_BF16, nullptr, MOEKIT_F32, true, 2), &two, p.c.M, p.ld));
      ASSERT_TRUE(
          run(p.args(hidden, MOEKIT_BF16, nullptr, MOEKIT_F32, true, 3), &three, p.c.M, p.ld));
      EXPECT_EQ(one, two) << p.c.name << " " << kStorages[si].name;
      EXPECT_EQ(one, three) << p.c.name << " " << kStorages[si].name;
    }
  EXPECT_EQ(ran, 2 * storages_served()) << impl().name;  // 2 cases x the storages served
}

INSTANTIATE_TEST_SUITE_P(All, FusedMoeSharedTest,
                         ::testing::ValuesIn(moekit_test::impl_indices(moekit::fused_moe_impls())),
                         (moekit_test::impl_test_name<FusedMoeArgs, moekit::fused_moe_impls>));

// The reference's shared-expert sum against the model (in its f32 regime: act not rounded).
TEST(FusedMoeSharedReference, EqualsTheModel) {
  for (int ci = 0; ci < static_cast<int>(std::size(kCases)); ++ci) {
    const Problem& p = problem(ci, 2, true);  // f32 weights
    const std::vector<unsigned char> hidden = p.hidden_as(MOEKIT_F32);
    std::vector<float> out(static_cast<size_t>(p.c.M * p.ld), kNaN);
    moekit::ref_fused_moe(p.args(hidden, MOEKIT_F32, out.data(), MOEKIT_F32, true, 2));
    const std::vector<float> want = p.model(true, false);
    for (int64_t m = 0; m < p.c.M; ++m)
      for (int64_t h = 0; h < p.c.H; ++h)
        ASSERT_EQ(out[m * p.ld + h], want[m * p.c.H + h])
            << p.c.name << " [" << m << ", " << h << "]";
  }
}

// ---- the C API ----------------------------------------------------------------------------------

class SharedApiTest : public ::testing::Test {
 protected:
  static constexpr int64_t E = 4, H = 40, I = 24, M = 5, k = 2, S = 2, I_s = 40;
  void SetUp() override {
    routed_ = make_experts(E, H, I, kStorages[0], 11, true);
    shared_ = make_experts(S, H, I_s, kStorages[0], 12, true);
    x_ = moekit_test::to_bf16(moekit_test::random_ints(M * H, 13, 1, 2));
    weights_ = {0.5f, 1, 1, 0.5f, 1, 1, 0.5f, 0.5f, 1, 1};
    ids_ = {0, 1, 2, 3, 1, 0, 3, 2, 0, 3};
    scale_ = {0.5f, 1, 2, -1, 0};
    out_.assign(M * H, kNaN);
    hidden_ = make_tensor(x_.data(), MOEKIT_BF16, {M, H});
    tw_ = make_tensor(weights_.data(), MOEKIT_F32, {M, k});
    ti_ = make_tensor(ids_.data(), MOEKIT_I32, {M, k});
    scale_t_ = make_tensor(scale_.data(), MOEKIT_F32, {M});
    out_t_ = make_tensor(out_.data(), MOEKIT_F32, {M, H});
  }
  moekit_status call(const moekit_experts* shared, const moekit_tensor* scale,
                     moekit_workspace* ws = nullptr, const moekit_tensor* map = nullptr) {
    return moekit_fused_moe_shared(routed_->packed.get(), shared, scale, &hidden_, &tw_, &ti_, map,
                                   ws, &out_t_);
  }
  // The call failed with `want` (a dtype valid elsewhere is UNSUPPORTED, as everywhere in the
  // API), named the argument, and left out untouched.
  void expect_rejected(moekit_status s, const char* what,
                       moekit_status want = MOEKIT_ERR_INVALID_ARGUMENT) {
    EXPECT_EQ(s, want) << moekit_last_error();
    EXPECT_NE(std::string(moekit_last_error()).find(what), std::string::npos)
        << moekit_last_error();
    EXPECT_NE(std::string(moekit_last_error()).find("moekit_fused_moe_shared"), std::string::npos)
        << moekit_last_error();
    for (float v : out_) ASSERT_TRUE(std::isnan(v)) << "output written by a failed call";
  }
  // The reference's output for `shared` with scale_.
  std::vector<float> reference(const moekit_experts* shared, bool with_scale) {
    std::vector<float> want(M * H, kNaN);
    FusedMoeArgs a;
    a.experts = routed_->packed.get();
    a.M = M, a.k = k;
    a.hidden = x_.data(), a.hidden_stride = H, a.hidden_dtype = MOEKIT_BF16;
    a.topk_weights = weights_.data(), a.topk_weights_stride = k;
    a.topk_ids = ids_.data(), a.topk_ids_stride = k, a.topk_ids_dtype = MOEKIT_I32;
    a.shared = shared;
    a.shared_scale = with_scale ? scale_.data() : nullptr;
    a.out = want.data(), a.out_stride = H, a.out_dtype = MOEKIT_F32;
    a.threads = 1;
    moekit::ref_fused_moe(a);
    return want;
  }

  std::unique_ptr<Experts> routed_, shared_;
  std::vector<uint16_t> x_;
  std::vector<float> weights_, scale_, out_;
  std::vector<int32_t> ids_;
  moekit_tensor hidden_, tw_, ti_, scale_t_, out_t_;
};

TEST_F(SharedApiTest, NullSharedIsFusedMoe) {
  ASSERT_EQ(
      moekit_fused_moe(routed_->packed.get(), &hidden_, &tw_, &ti_, nullptr, nullptr, &out_t_),
      MOEKIT_OK)
      << moekit_last_error();
  const std::vector<float> plain = out_;
  const std::string plain_impl = moekit_last_impl("fused_moe");
  std::fill(out_.begin(), out_.end(), kNaN);
  // shared_scale is ignored without shared experts.
  ASSERT_EQ(call(nullptr, &scale_t_), MOEKIT_OK) << moekit_last_error();
  EXPECT_EQ(out_, plain);
  EXPECT_EQ(moekit_last_impl("fused_moe"), plain_impl);
}

TEST_F(SharedApiTest, FastKernelServesMatchingHandlesAndWorkspaceOfTheDocumentedSize) {
  ASSERT_EQ(call(shared_->packed.get(), &scale_t_), MOEKIT_OK) << moekit_last_error();
  const std::string chosen = moekit_last_impl("fused_moe");
  EXPECT_NE(chosen.rfind("ref", 0), 0u) << "a fast kernel should serve bf16 shared experts";
  const std::vector<float> first = out_;
  // Within 2^-6 of the output's scale of the reference (bf16 kernels round the intermediate).
  const std::vector<float> want = reference(shared_->packed.get(), true);
  double scale = 0;
  for (float v : want) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  ASSERT_GT(scale, 0.0);
  for (int64_t i = 0; i < M * H; ++i)
    ASSERT_LE(std::fabs(static_cast<double>(first[i]) - want[i]), std::ldexp(scale, -6))
        << chosen << " at " << i;

  const size_t need = moekit_moe_workspace_size_shared(M, k, H, I, S, I_s, moekit_num_threads());
  EXPECT_GE(need, moekit_moe_workspace_size(M, k, H, I, moekit_num_threads()));
  moekit::Workspace ws = moekit::make_workspace(M, k, H, I, S, I_s);
  std::fill(out_.begin(), out_.end(), kNaN);
  moekit::fused_moe_shared(routed_->packed, shared_->packed.get(), &scale_t_, hidden_, tw_, ti_,
                           nullptr, ws.get(), out_t_);
  EXPECT_EQ(out_, first);
  // The routed-only size is too small for the shared rows.
  moekit::Workspace small = moekit::make_workspace(M, k, H, I);
  std::fill(out_.begin(), out_.end(), kNaN);
  expect_rejected(call(shared_->packed.get(), &scale_t_, small.get()),
                  "moekit_moe_workspace_size_shared");
}

// Shared handles of another dtype, layout or FP8 block size are served by the reference.
TEST_F(SharedApiTest, OtherSharedStorageFallsBackToTheReference) {
  const Storage kOthers[] = {{MOEKIT_F32, MOEKIT_LAYOUT_VNNI, "f32"},
                             {MOEKIT_BF16, MOEKIT_LAYOUT_PLAIN, "bf16_plain"}};
  for (const Storage& st : kOthers) {
    auto other = make_experts(S, H, I_s, st, 14, true);
    std::fill(out_.begin(), out_.end(), kNaN);
    ASSERT_EQ(call(other->packed.get(), &scale_t_), MOEKIT_OK) << moekit_last_error();
    EXPECT_STREQ(moekit_last_impl("fused_moe"), "ref_fused_moe") << st.name;
    EXPECT_EQ(out_, reference(other->packed.get(), true)) << st.name;
  }
  // FP8 routed and shared experts with different block sizes.
  const Storage fp8 = {MOEKIT_FP8_E4M3, MOEKIT_LAYOUT_VNNI, "fp8"};
  auto routed = make_experts(E, H, I, fp8, 15, true);
  auto shared = make_experts(S, H, I_s, fp8, 16, true);
  FusedMoeArgs a;
  a.experts = routed->packed.get();
  a.shared = shared->packed.get();
  a.M = M, a.k = k, a.hidden_dtype = MOEKIT_BF16, a.out_dtype = MOEKIT_F32, a.threads = 1;
  EXPECT_STRNE(moekit::choose("fused_moe", moekit::fused_moe_impls(), a).name, "ref_fused_moe");
  shared->packed->block_k = 2 * kBlockK;  // describes another block size (choose reads no data)
  EXPECT_STREQ(moekit::choose("fused_moe", moekit::fused_moe_impls(), a).name, "ref_fused_moe");
}

TEST_F(SharedApiTest, RejectsBadSharedArguments) {
  // Another hidden size.
  auto wrong_h = make_experts(S, H + 1, I_s, kStorages[0], 17, true);
  expect_rejected(call(wrong_h->packed.get(), nullptr), "hidden");
  // shared_scale of the wrong length, dtype or rank.
  moekit_tensor long_scale = make_tensor(scale_.data(), MOEKIT_F32, {M - 1});
  expect_rejected(call(shared_->packed.get(), &long_scale), "shared_scale");
  moekit_tensor bf16_scale = make_tensor(scale_.data(), MOEKIT_BF16, {M});
  expect_rejected(call(shared_->packed.get(), &bf16_scale), "shared_scale", MOEKIT_ERR_UNSUPPORTED);
  moekit_tensor scale_2d = make_tensor(scale_.data(), MOEKIT_F32, {M, 1});
  expect_rejected(call(shared_->packed.get(), &scale_2d), "shared_scale");
  moekit_tensor null_scale = make_tensor(nullptr, MOEKIT_F32, {M});
  expect_rejected(call(shared_->packed.get(), &null_scale), "shared_scale");
  // out overlapping shared_scale.
  moekit_tensor scale_in_out = make_tensor(out_.data(), MOEKIT_F32, {M});
  expect_rejected(call(shared_->packed.get(), &scale_in_out), "overlaps");
  // The routed checks still apply.
  ids_[3] = E;
  expect_rejected(call(shared_->packed.get(), &scale_t_), "topk_ids");
}

TEST(SharedApi, WorkspaceSize) {
  EXPECT_EQ(moekit_moe_workspace_size_shared(7, 8, 3072, 1536, 0, 0, 2),
            moekit_moe_workspace_size(7, 8, 3072, 1536, 2));
  EXPECT_GT(moekit_moe_workspace_size_shared(7, 8, 3072, 1536, 1, 1536, 2),
            moekit_moe_workspace_size(7, 8, 3072, 1536, 2));
  // A wider shared inter needs a wider intermediate.
  EXPECT_GT(moekit_moe_workspace_size_shared(64, 4, 2048, 1408, 1, 5632, 2),
            moekit_moe_workspace_size_shared(64, 4, 2048, 1408, 1, 1408, 2));
  EXPECT_EQ(moekit_moe_workspace_size_shared(7, 8, 3072, 1536, -1, 1536, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size_shared(7, 8, 3072, 1536, 1, 0, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size_shared(7, 8, 3072, 1536, 1, int64_t{1} << 21, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size_shared(-1, 8, 3072, 1536, 1, 1536, 2), 0u);
  EXPECT_EQ(moekit_moe_workspace_size_shared(int64_t{1} << 40, 8, 3072, 1536, 1 << 20, 1536, 2),
            0u);
}

}  // namespace
