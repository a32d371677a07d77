// FP8 experts: every FP8 fused-MoE microkernel (run through the pipeline on FP8 VNNI handles)
// against the reference on the checkpoint's plain layout, over a subset of the MoE shape sweep,
// block scales of magnitude 1e-4, 1 and 1e3 (one per matrix), block sizes 64/128/256 with
// partial last blocks, and NaN weights (NaN must reach exactly the outputs that depend on them).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/moe/fp8_vnni.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe.h"
#include "reference/reference.h"
#include "tests/test_util.h"

namespace {

using namespace moekit;

// The fused_moe entries for FP8 weights, by index in the dispatch table.
std::vector<int> fp8_impl_indices() {
  std::vector<int> v;
  for (size_t i = 0; i < fused_moe_impls().size(); ++i)
    if (std::string(fused_moe_impls()[i].name).find("_fp8_") != std::string::npos)
      v.push_back(static_cast<int>(i));
  return v;
}

struct Case {
  int64_t H, I, E, k, M, block_n, block_k;
};

struct HandleDeleter {
  void operator()(moekit_experts* h) const { delete h; }
};
using Handle = std::unique_ptr<moekit_experts, HandleDeleter>;

// A random e4m3 byte: mostly normals of magnitude 2^-3 .. 2^3, some subnormals and zeros.
uint8_t random_fp8(std::mt19937& rng) {
  const uint32_t r = rng();
  const uint32_t sign = (r >> 31) << 7, mantissa = r & 7;
  const uint32_t exponent = (r >> 8) % 16 == 0 ? 0 : 4 + (r >> 12) % 7;
  return static_cast<uint8_t>(sign | exponent << 3 | mantissa);
}

// Weights and scales of E experts, kept alive for the handles' packing.
struct Fp8Weights {
  int64_t E, H, I, block_n, block_k;
  std::vector<std::vector<uint8_t>> q[3];    // w1, w3, w2
  std::vector<std::vector<float>> scale[3];
  std::vector<const void*> q_ptr[3];
  std::vector<const float*> scale_ptr[3];

  // Each matrix gets one scale magnitude, 1e-4, 1 or 1e3 (which matrix gets which turns with
  // the seed): every output is a product through all three, so each output involves the whole
  // range the format must handle and no block is outweighed by another matrix's. Within a
  // matrix, over all blocks and experts, scales vary only by a factor of 2 either way: outputs
  // are compared relative to the row's max, so a block (or one of a token's k experts) far
  // smaller than the others would pass even if the kernel dropped it.
  Fp8Weights(const Case& c, uint32_t seed) : E(c.E), H(c.H), I(c.I), block_n(c.block_n), block_k(c.block_k) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> log_factor(std::log(0.5f), std::log(2.0f));
    const float magnitudes[3] = {1e-4f, 1.0f, 1e3f};
    for (int i = 0; i < 3; ++i) {
      const int64_t rows = i == 2 ? H : I, cols = i == 2 ? I : H;
      const int64_t scales = ((rows + block_n - 1) / block_n) * ((cols + block_k - 1) / block_k);
      const float magnitude = magnitudes[(i + seed) % 3];
      q[i].resize(E);
      scale[i].resize(E);
      for (int64_t e = 0; e < E; ++e) {
        q[i][e].resize(rows * cols);
        for (uint8_t& b : q[i][e]) b = random_fp8(rng);
        scale[i][e].resize(scales);
        for (float& s : scale[i][e]) s = magnitude * std::exp(log_factor(rng));
      }
    }
  }
  moekit_experts_desc desc() {
    for (int i = 0; i < 3; ++i) {
      q_ptr[i].clear();
      scale_ptr[i].clear();
      for (int64_t e = 0; e < E; ++e) {
        q_ptr[i].push_back(q[i][e].data());
        scale_ptr[i].push_back(scale[i][e].data());
      }
    }
    moekit_experts_desc d{};
    d.num_experts = E;
    d.hidden = H;
    d.inter = I;
    d.dtype = MOEKIT_FP8_E4M3;
    d.w1 = q_ptr[0].data();
    d.w3 = q_ptr[1].data();
    d.w2 = q_ptr[2].data();
    d.w1_scale = scale_ptr[0].data();
    d.w3_scale = scale_ptr[1].data();
    d.w2_scale = scale_ptr[2].data();
    d.block_n = block_n;
    d.block_k = block_k;
    return d;
  }
};

struct Routing {
  std::vector<float> x, weights;
  std::vector<int32_t> ids;
};

Routing make_routing(const Case& c, uint32_t seed) {
  Routing r;
  r.x = moekit_test::random_floats(static_cast<size_t>(c.M * c.H), seed);
  r.weights = moekit_test::random_floats(static_cast<size_t>(c.M * c.k), seed + 1, 0.0f, 1.0f);
  std::mt19937 rng(seed + 2);
  std::vector<int32_t> experts(c.E);
  for (int64_t e = 0; e < c.E; ++e) experts[e] = static_cast<int32_t>(e);
  for (int64_t m = 0; m < c.M; ++m) {
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int64_t j = 0; j < c.k; ++j) r.ids.push_back(experts[j]);
  }
  return r;
}

FusedMoeArgs make_args(const moekit_experts* h, const Case& c, const Routing& r, float* out) {
  FusedMoeArgs a;
  a.experts = h;
  a.M = c.M;
  a.k = c.k;
  a.hidden = r.x.data();
  a.hidden_stride = c.H;
  a.hidden_dtype = MOEKIT_F32;
  a.topk_weights = r.weights.data();
  a.topk_weights_stride = c.k;
  a.topk_ids = r.ids.data();
  a.topk_ids_stride = c.k;
  a.topk_ids_dtype = MOEKIT_I32;
  a.out = out;
  a.out_stride = c.H;
  a.out_dtype = MOEKIT_F32;
  a.threads = 2;
  return a;
}

Handle pack(Fp8Weights& w, moekit_pack_layout layout) {
  moekit_experts* h = nullptr;
  const moekit_experts_desc d = w.desc();
  const moekit_status s =
      layout == MOEKIT_LAYOUT_VNNI ? fp8_pack_experts_vnni(d, &h) : pack_experts(d, layout, &h);
  EXPECT_EQ(s, MOEKIT_OK) << moekit_last_error();
  return Handle(h);
}

// Compares out with the reference: NaN exactly where the reference has NaN; elsewhere within
// tol of the reference, relative to the magnitude of the token's row (the kernels round the
// activations and the intermediate to bf16, the reference computes in double).
void expect_close(const std::vector<float>& want, const std::vector<float>& got, int64_t M,
                  int64_t H, double tol, const char* what) {
  int64_t bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    double row_scale = 0.0;
    for (int64_t h = 0; h < H; ++h)
      if (!std::isnan(want[m * H + h])) row_scale = std::max(row_scale, std::fabs(double(want[m * H + h])));
    for (int64_t h = 0; h < H; ++h) {
      const float w = want[m * H + h], g = got[m * H + h];
      const bool ok = std::isnan(w) ? std::isnan(g) : std::fabs(double(g) - w) <= tol * row_scale + 1e-30;
      if (!ok && ++bad <= 5)
        ADD_FAILURE() << what << ": out[" << m << "][" << h << "] = " << g << ", reference " << w
                      << " (row max " << row_scale << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what;
  if (getenv("MOEKIT_TEST_VERBOSE")) {
    double worst = 0;
    for (int64_t m = 0; m < M; ++m) {
      double row_scale = 1e-30;
      for (int64_t h = 0; h < H; ++h)
        if (!std::isnan(want[m * H + h])) row_scale = std::max(row_scale, std::fabs(double(want[m * H + h])));
      for (int64_t h = 0; h < H; ++h)
        if (!std::isnan(want[m * H + h])) worst = std::max(worst, std::fabs(double(got[m * H + h]) - want[m * H + h]) / row_scale);
    }
    printf("%s: worst error / row max = %.3g\n", what, worst);
  }
}

// The AVX-512 and AMX kernels round activations and the intermediate to bf16; the others
// compute in f32.
double tolerance(const char* name) {
  const std::string n(name);
  return n.find("avx512") != std::string::npos || n.find("amx") != std::string::npos ? 3e-2 : 1e-5;
}

// The AMX kernel needs whole B tiles per scale block: block_k a multiple of 32.
bool refusal_expected(const std::string& name, const Case& c) {
  return name.find("_amx") != std::string::npos && c.block_k % 32 != 0;
}

class MoeFp8Test : public ::testing::TestWithParam<int> {
 protected:
  // The AMX kernel sends segments of few rows to AVX-512; in the small-shape tests every
  // segment goes to the tiles instead (partial tiles of 1..15 rows).
  void SetUp() override {
    if (std::string(impl().name).find("_amx") != std::string::npos) amx_set_min_rows(1);
  }
  void TearDown() override { amx_set_min_rows(0); }

  const Impl<FusedMoeArgs>& impl() const { return fused_moe_impls()[GetParam()]; }

  // Runs case c with the kernel and the reference and compares them; returns the number of
  // NaN outputs of the reference.
  int64_t run_case(const Case& c, uint32_t seed, void (*poison)(Fp8Weights&) = nullptr) {
    SCOPED_TRACE(testing::Message() << "H=" << c.H << " I=" << c.I << " E=" << c.E << " k=" << c.k
                                    << " M=" << c.M << " block " << c.block_n << "x" << c.block_k);
    Fp8Weights w(c, seed);
    if (poison) poison(w);
    const Routing r = make_routing(c, seed + 7);
    Handle plain = pack(w, MOEKIT_LAYOUT_PLAIN), vnni = pack(w, MOEKIT_LAYOUT_VNNI);
    if (!plain || !vnni) {
      ADD_FAILURE() << "packing failed";
      return 0;
    }
    // The reference of a (case, seed, poison) is computed once and shared by the kernels.
    static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                               uint32_t, uintptr_t>,
                    std::vector<float>>
        references;
    std::vector<float>& want = references[{c.H, c.I, c.E, c.k, c.M, c.block_n, c.block_k, seed,
                                           reinterpret_cast<uintptr_t>(poison)}];
    if (want.empty()) {
      want.assign(c.M * c.H, -1.0f);
      ref_fused_moe(make_args(plain.get(), c, r, want.data()));
    }
    std::vector<float> got(c.M * c.H, std::nanf("0x5e"));
    const FusedMoeArgs a = make_args(vnni.get(), c, r, got.data());
    const char* why = impl().supports(a);
    if (why != nullptr && refusal_expected(impl().name, c)) return 0;
    EXPECT_EQ(why, nullptr) << why;
    if (why) return 0;
    impl().run(a);
    expect_close(want, got, c.M, c.H, tolerance(impl().name), impl().name);
    return std::count_if(want.begin(), want.end(), [](float v) { return std::isnan(v); });
  }
};

TEST_P(MoeFp8Test, SmallShapes) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const Case cases[] = {
      {64, 32, 1, 1, 1, 128, 128},   {64, 32, 8, 2, 17, 128, 128}, {64, 32, 8, 8, 64, 64, 64},
      {64, 32, 64, 8, 17, 128, 128}, {64, 32, 64, 1, 2, 256, 256}, {96, 48, 8, 2, 64, 16, 64},
      {77, 45, 8, 2, 17, 64, 64},  // odd K in both GEMMs, partial panels and blocks
      {100, 70, 4, 2, 33, 32, 18},  // blocks that split panels' K, not multiples of 32
      {64, 32, 2, 1, 3, 32, 18},    // an odd number of pairs in the last block, at K's end
  };
  uint32_t seed = 100;
  for (const Case& c : cases) run_case(c, seed++);
}

TEST_P(MoeFp8Test, ModelShapes) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  amx_set_min_rows(0);  // the default threshold: model shapes use both paths
  const bool scalar = impl().level == MOEKIT_ISA_SCALAR;
  const Case cases[] = {
      {3072, 1536, 8, 8, 1, 128, 128},  // MiniMax-M2 decode
      {3072, 1536, 8, 2, 2, 128, 128},
      {4096 + 13, 1536, 8, 1, 2, 128, 128},  // partial last K block, odd K
      {4096 + 13, 32, 8, 2, 17, 256, 256},
      {3072, 1536, 1, 1, 64, 64, 64},  // 64 rows of one expert: AMX tiles on AMX machines
  };
  uint32_t seed = 200;
  for (const Case& c : cases) {
    if (scalar && c.M > 2) continue;  // the scalar kernel is slow; its small shapes suffice
    run_case(c, seed++);
  }
}

// A NaN in w1[n][k] of an expert poisons every output of the tokens routed to it (gate n is
// NaN, and the down projection sums every intermediate column); a NaN in w2[h][n] poisons only
// column h of those tokens.
TEST_P(MoeFp8Test, NaNWeights) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());
  const Case c{96, 64, 4, 1, 17, 64, 64};
  // Tokens routed to expert 1: whole rows.
  const int64_t rows_nan = run_case(c, 300, [](Fp8Weights& w) { w.q[0][1][5 * w.H + 70] = 0x7F; });
  EXPECT_GT(rows_nan, 0);
  EXPECT_EQ(rows_nan % c.H, 0);
  EXPECT_LT(rows_nan, c.M * c.H);
  // Tokens routed to expert 2: column 33 only.
  const int64_t column_nan = run_case(c, 301, [](Fp8Weights& w) { w.q[2][2][33 * w.I + 7] = 0xFF; });
  EXPECT_GT(column_nan, 0);
  EXPECT_LT(column_nan, c.M);
  // The last K value of the last row of w3 of expert 3.
  EXPECT_GT(run_case(c, 302, [](Fp8Weights& w) { w.q[1][3][w.I * w.H - 1] = 0x7F; }), 0);
}

TEST_P(MoeFp8Test, RefusesOnlyWhatItCannotHold) {
  MOEKIT_SKIP_IF_CANNOT_RUN(impl());  // supports() may run code of the kernel's level
  Fp8Weights w(Case{64, 32, 2, 1, 1, 32, 18}, 400);
  Handle vnni = pack(w, MOEKIT_LAYOUT_VNNI), plain = pack(w, MOEKIT_LAYOUT_PLAIN);
  const Routing r = make_routing(Case{64, 32, 2, 1, 1, 32, 18}, 401);
  std::vector<float> out(64);
  const char* why = impl().supports(make_args(vnni.get(), Case{64, 32, 2, 1, 1, 32, 18}, r, out.data()));
  if (std::string(impl().name).find("_amx") != std::string::npos) {
    ASSERT_NE(why, nullptr);
    EXPECT_NE(std::string(why).find("multiple of 32"), std::string::npos) << why;
  } else {
    EXPECT_EQ(why, nullptr) << why;
  }
  // Plain FP8 handles are the reference's.
  EXPECT_NE(impl().supports(make_args(plain.get(), Case{64, 32, 2, 1, 1, 32, 18}, r, out.data())),
            nullptr);
}

INSTANTIATE_TEST_SUITE_P(Fp8, MoeFp8Test, ::testing::ValuesIn(fp8_impl_indices()),
                         (moekit_test::impl_test_name<FusedMoeArgs, fused_moe_impls>));

// The FP8 VNNI layout decodes to exactly the plain layout's rows (scales included), for block
// sizes that split panels and K not a multiple of anything.
TEST(Fp8Layout, DecodeRowMatchesPlain) {
  for (const Case& c : {Case{77, 45, 3, 1, 1, 16, 64}, Case{64, 100, 2, 1, 1, 48, 30}}) {
    Fp8Weights w(c, 500);
    w.q[0][1][3] = 0x7F;
    Handle vnni = pack(w, MOEKIT_LAYOUT_VNNI), plain = pack(w, MOEKIT_LAYOUT_PLAIN);
    for (int64_t e = 0; e < c.E; ++e)
      for (ExpertMatrix m : {ExpertMatrix::kW1, ExpertMatrix::kW3, ExpertMatrix::kW2}) {
        const int64_t rows = plain->rows(m), cols = plain->cols(m);
        std::vector<float> a(cols), b(cols);
        for (int64_t n = 0; n < rows; ++n) {
          plain->decode_row(e, m, n, a.data());
          vnni->decode_row(e, m, n, b.data());
          for (int64_t k = 0; k < cols; ++k)
            ASSERT_TRUE(std::isnan(a[k]) ? std::isnan(b[k]) : a[k] == b[k])
                << "expert " << e << " row " << n << " col " << k;
        }
      }
  }
}

// Through the C API: AUTO packs FP8 as VNNI when the blocks fit it (and the fused MoE runs an
// FP8 kernel), as plain otherwise (the reference serves it); an explicit VNNI request for such
// blocks is refused with the reason.
TEST(Fp8Api, AutoLayoutAndDispatch) {
  for (const Case& c : {Case{64, 32, 4, 2, 5, 128, 128}, Case{64, 32, 4, 2, 5, 8, 128}}) {
    Fp8Weights w(c, 600);
    const moekit_experts_desc d = w.desc();
    moekit_experts* h = nullptr;
    ASSERT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_AUTO, &h), MOEKIT_OK) << moekit_last_error();
    Handle handle(h);
    const bool fits = c.block_n % 16 == 0;
    EXPECT_EQ(moekit_experts_layout(h), fits ? MOEKIT_LAYOUT_VNNI : MOEKIT_LAYOUT_PLAIN);
    if (!fits) {
      moekit_experts* refused = nullptr;
      EXPECT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_VNNI, &refused), MOEKIT_ERR_UNSUPPORTED);
      EXPECT_NE(std::string(moekit_last_error()).find("block_n"), std::string::npos) << moekit_last_error();
    }
    Routing r = make_routing(c, 601);
    std::vector<float> out(c.M * c.H), want(c.M * c.H);
    moekit_tensor x = moekit_test::make_tensor(r.x.data(), MOEKIT_F32, {c.M, c.H});
    moekit_tensor tw = moekit_test::make_tensor(r.weights.data(), MOEKIT_F32, {c.M, c.k});
    moekit_tensor ids = moekit_test::make_tensor(r.ids.data(), MOEKIT_I32, {c.M, c.k});
    moekit_tensor y = moekit_test::make_tensor(out.data(), MOEKIT_F32, {c.M, c.H});
    ASSERT_EQ(moekit_fused_moe(h, &x, &tw, &ids, nullptr, nullptr, &y), MOEKIT_OK) << moekit_last_error();
    const std::string chosen = moekit_last_impl("fused_moe");
    EXPECT_EQ(chosen.find("_fp8_") != std::string::npos, fits) << chosen;
    ref_fused_moe(make_args(h, c, r, want.data()));
    expect_close(want, out, c.M, c.H, tolerance(chosen.c_str()), chosen.c_str());
  }
}

}  // namespace
