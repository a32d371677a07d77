// Blockwise expert matmul (fused MoE): the VNNI packing, the microkernels against a plain
// integer GEMM (exact), every fused_moe implementation against the reference over a named set
// of shapes, thread-count determinism, token alignment, and the C API's argument checks.
//
// Tolerances (pipeline vs the double-precision reference): with S = max |reference| over the
// output, an element passes when |out - ref| <= tol * S + bf16_out * 2^-7 * |ref|, where
//   tol = 2^-6 for kernels with bf16 operands (activations and the intermediate are rounded to
//         bf16, relative error 2^-9 each, and the rounding errors of sums of K terms of either
//         sign can reach a few times that relative to S),
//   tol = 64 * 2^-24 * sqrt(K) for f32 operands (K = max(H, I); f32 accumulation error grows
//         like sqrt(K) ulps for random signs),
// and the last term allows the 1-ulp difference (at most 2^-7 relative) of two bf16 roundings
// of nearby values. A wrong
// row, column, slot or expert gives errors of the order of S, far above these.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "dispatch/cpu_features.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"
#include "reference/reference.h"
#include "tests/test_util.h"

namespace {

using moekit::ExpertMatrix;
using moekit::FusedMoeArgs;
using moekit::MoeMicrokernel;
using moekit_test::make_tensor;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- expert weights ---------------------------------------------------------------------

struct ExpertsDeleter {
  void operator()(moekit_experts* e) const { moekit_experts_free(e); }
};
using ExpertsPtr = std::unique_ptr<moekit_experts, ExpertsDeleter>;

struct Weights {
  int64_t E = 0, H = 0, I = 0;
  moekit_dtype dtype = MOEKIT_BF16;
  // Values as f32 (exactly representable in `dtype`), HF layout per expert.
  std::vector<std::vector<float>> w1, w3, w2;
  ExpertsPtr packed;
};

std::vector<float> round_to(moekit_dtype dtype, std::vector<float> v) {
  if (dtype == MOEKIT_BF16)
    for (float& x : v) x = moekit::bf16_to_f32(moekit::f32_to_bf16(x));
  return v;
}

// Random weights scaled so that activations stay O(1) (w1/w3 ~ 1/sqrt(H), w2 ~ 1/sqrt(I)).
std::unique_ptr<Weights> make_weights(int64_t E, int64_t H, int64_t I, moekit_dtype dtype,
                                      uint32_t seed,
                                      moekit_pack_layout layout = MOEKIT_LAYOUT_AUTO) {
  auto w = std::make_unique<Weights>();
  w->E = E, w->H = H, w->I = I, w->dtype = dtype;
  const float s1 = 2.0f / std::sqrt(static_cast<float>(H)),
              s2 = 2.0f / std::sqrt(static_cast<float>(I));
  for (int64_t e = 0; e < E; ++e) {
    w->w1.push_back(round_to(dtype, moekit_test::random_floats(I * H, seed + 3 * e, -s1, s1)));
    w->w3.push_back(round_to(dtype, moekit_test::random_floats(I * H, seed + 3 * e + 1, -s1, s1)));
    w->w2.push_back(round_to(dtype, moekit_test::random_floats(H * I, seed + 3 * e + 2, -s2, s2)));
  }
  std::vector<std::vector<uint16_t>> b16[3];
  std::vector<const void*> ptrs[3];
  const std::vector<std::vector<float>>* mats[3] = {&w->w1, &w->w3, &w->w2};
  for (int i = 0; i < 3; ++i)
    for (int64_t e = 0; e < E; ++e) {
      if (dtype == MOEKIT_BF16) b16[i].push_back(moekit_test::to_bf16((*mats[i])[e]));
    }
  for (int i = 0; i < 3; ++i)
    for (int64_t e = 0; e < E; ++e)
      ptrs[i].push_back(dtype == MOEKIT_BF16 ? static_cast<const void*>(b16[i][e].data())
                                             : static_cast<const void*>((*mats[i])[e].data()));
  moekit_experts_desc d{};
  d.num_experts = E;
  d.hidden = H;
  d.inter = I;
  d.dtype = dtype;
  d.w1 = ptrs[0].data();
  d.w3 = ptrs[1].data();
  d.w2 = ptrs[2].data();
  moekit_experts* h = nullptr;
  EXPECT_EQ(moekit_experts_pack(&d, layout, &h), MOEKIT_OK) << moekit_last_error();
  w->packed.reset(h);
  return w;
}

// ---- packing ------------------------------------------------------------------------------

TEST(MoePack, VnniDecodesToTheCheckpoint) {
  for (moekit_dtype dt : {MOEKIT_BF16, MOEKIT_F32})
    for (int64_t H : {1, 31, 33, 64})
      for (int64_t I : {1, 15, 17, 32}) {
        auto w = make_weights(2, H, I, dt, 7, MOEKIT_LAYOUT_VNNI);
        ASSERT_EQ(moekit_experts_layout(w->packed.get()), MOEKIT_LAYOUT_VNNI);
        std::vector<float> row(std::max(H, I));
        for (int64_t e = 0; e < 2; ++e) {
          for (int64_t n = 0; n < I; ++n) {
            w->packed->decode_row(e, ExpertMatrix::kW1, n, row.data());
            for (int64_t h = 0; h < H; ++h) ASSERT_EQ(row[h], w->w1[e][n * H + h]);
            w->packed->decode_row(e, ExpertMatrix::kW3, n, row.data());
            for (int64_t h = 0; h < H; ++h) ASSERT_EQ(row[h], w->w3[e][n * H + h]);
          }
          for (int64_t n = 0; n < H; ++n) {
            w->packed->decode_row(e, ExpertMatrix::kW2, n, row.data());
            for (int64_t i = 0; i < I; ++i) ASSERT_EQ(row[i], w->w2[e][n * I + i]);
          }
        }
      }
}

TEST(MoePack, PreferredLayoutIsVnniForFloatWeights) {
  // bf16 on an AMX machine: the AMX layout, the same bytes (test_moe_amx.cc).
  const moekit_pack_layout bf16_layout =
      moekit_effective_isa() >= MOEKIT_ISA_AMX ? MOEKIT_LAYOUT_AMX : MOEKIT_LAYOUT_VNNI;
  EXPECT_EQ(moekit::preferred_layout(MOEKIT_BF16), bf16_layout);
  EXPECT_EQ(moekit::preferred_layout(MOEKIT_F32), MOEKIT_LAYOUT_VNNI);
  auto w = make_weights(1, 8, 8, MOEKIT_BF16, 1, MOEKIT_LAYOUT_AUTO);
  EXPECT_EQ(moekit_experts_layout(w->packed.get()), bf16_layout);
}

TEST(MoePack, WorkspaceSizeIsModestForMiniMax) {
  // MiniMax-M2 at M = 4096: well under the ~300 MB a comparable CPU MoE kernel uses.
  const size_t bytes = moekit_moe_workspace_size(4096, 8, 3072, 1536, 2);
  EXPECT_GT(bytes, size_t{0});
  EXPECT_LT(bytes, size_t{160} << 20);
}

// ---- microkernels vs an integer GEMM (exact) ----------------------------------------------

// The name is spelled out so that listing the tests runs no code compiled for a level the CPU
// may lack; SetUp checks it against the microkernel's own name.
struct NamedKernel {
  const MoeMicrokernel& (*get)();
  moekit_isa level;
  const char* name;
  // The AVX-512-BF16 kernel runs each of its paths whatever the CPU: bf16_fma_min_rows forced
  // to 1 (f32 FMA on every call) or to never (VDPBF16PS); 0 leaves the threshold alone.
  int64_t fma_min_rows = 0;
  const char* suffix = "";
};
const NamedKernel kKernels[] = {
    {moekit::moe_microkernel_bf16_avx512bf16, MOEKIT_ISA_AVX512_BF16,
     "fused_moe_bf16_avx512bf16_vnni", 1, "_fma_path"},
    {moekit::moe_microkernel_bf16_avx512bf16, MOEKIT_ISA_AVX512_BF16,
     "fused_moe_bf16_avx512bf16_vnni", moekit::kBf16FmaNever, "_dpbf16_path"},
    {moekit::moe_microkernel_bf16_avx512, MOEKIT_ISA_AVX512, "fused_moe_bf16_avx512_vnni"},
    {moekit::moe_microkernel_f32_avx512, MOEKIT_ISA_AVX512, "fused_moe_f32_avx512_vnni"},
    {moekit::moe_microkernel_bf16_avx2, MOEKIT_ISA_AVX2, "fused_moe_bf16_avx2_vnni"},
    {moekit::moe_microkernel_f32_avx2, MOEKIT_ISA_AVX2, "fused_moe_f32_avx2_vnni"},
    {moekit::moe_microkernel_bf16_scalar, MOEKIT_ISA_SCALAR, "fused_moe_bf16_scalar_vnni"},
    {moekit::moe_microkernel_f32_scalar, MOEKIT_ISA_SCALAR, "fused_moe_f32_scalar_vnni"},
};

class MoeMicrokernelTest : public ::testing::TestWithParam<int> {
 protected:
  const MoeMicrokernel& uk() const { return kKernels[GetParam()].get(); }
  void SetUp() override {
    const NamedKernel& k = kKernels[GetParam()];
    if (!moekit_test::cpu_can_run(k.level))
      GTEST_SKIP() << k.name << " needs " << moekit_isa_name(k.level) << ", this CPU has "
                   << moekit_isa_name(moekit_detected_isa());
    ASSERT_STREQ(uk().name, k.name);
    if (k.fma_min_rows > 0) moekit::bf16_fma_set_min_rows(k.fma_min_rows);
  }
  void TearDown() override { moekit::bf16_fma_set_min_rows(0); }
};

// Operand rows in the kernel's activation dtype.
std::vector<unsigned char> as_operand(const MoeMicrokernel& uk, const std::vector<float>& v) {
  std::vector<unsigned char> out(v.size() * (uk.a_dtype == MOEKIT_BF16 ? 2 : 4));
  for (size_t i = 0; i < v.size(); ++i)
    moekit::store_float(out.data(), uk.a_dtype == MOEKIT_BF16, i, v[i]);
  return out;
}

std::vector<unsigned char> packed_matrix(moekit_dtype dt, const std::vector<float>& w, int64_t N,
                                         int64_t K) {
  std::vector<unsigned char> out(moekit::vnni_matrix_bytes(N, K, dt));
  if (dt == MOEKIT_BF16) {
    const std::vector<uint16_t> b = moekit_test::to_bf16(w);
    moekit::vnni_pack_matrix(b.data(), dt, N, K, out.data());
  } else {
    moekit::vnni_pack_matrix(w.data(), dt, N, K, out.data());
  }
  return out;
}

// down: out[token] += weight * act . w2 with integer act/w2 in [-4, 4] and weights 1, 0.5, 2:
// every product and sum is exact, so the kernel must equal the integer GEMM bit for bit. Sweeps
// K and n around the pair (2), panel (16), tile and K-chunk (64) sizes, m around the register
// rows and past 128 (the FMA path's row block), and includes two rows of the same token (their
// additions must both land).
TEST_P(MoeMicrokernelTest, DownIsExactOnSmallIntegers) {
  const MoeMicrokernel& k = uk();
  for (int64_t K : {1, 2, 3, 31, 32, 33, 64, 95, 129})
    for (int64_t n : {int64_t{1}, int64_t{15}, int64_t{16}, int64_t{17}, k.down_n - 1, k.down_n})
      for (int64_t m : {1, 2, 5, 7, 13, 130}) {
        if (n > k.down_n) continue;  // the contract: n <= down_n
        const int64_t N = n + 16;    // the tile starts at panel 1 of a wider matrix
        const std::vector<float> act = moekit_test::random_ints(m * K, 11 + K + m);
        const std::vector<float> w2 = moekit_test::random_ints(N * K, 12 + K + n);
        const std::vector<unsigned char> a = as_operand(k, act);
        const std::vector<unsigned char> b = packed_matrix(k.weight_dtype, w2, N, K);
        std::vector<float> weight(m);
        std::vector<int32_t> rows(m);
        for (int64_t r = 0; r < m; ++r) {
          weight[r] = r % 3 == 0 ? 1.0f : r % 3 == 1 ? 0.5f : 2.0f;
          rows[r] = static_cast<int32_t>(r == 1 ? 0 : r);  // rows 0 and 1 share token 0
        }
        const int64_t ld_out = n + 3;
        std::vector<float> out(m * ld_out, 1.0f);
        moekit::MoeDownCall call;
        call.act = a.data();
        call.ld_act = K;
        call.m = m;
        call.K = K;
        call.w2 = b.data() + moekit::vnni_panel_bytes(K, k.weight_dtype);
        call.n = n;
        call.row_weight = weight.data();
        call.out = out.data();
        call.ld_out = ld_out;
        call.out_rows = rows.data();
        std::vector<float> scratch(moekit::moe_tile_scratch_bytes(K) / 4);
        call.scratch = scratch.data();
        call.scratch_bytes = scratch.size() * 4;
        k.down(call);
        std::vector<float> want(m * ld_out, 1.0f);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < n; ++c) {
            double dot = 0;
            for (int64_t x = 0; x < K; ++x) dot += act[r * K + x] * w2[(16 + c) * K + x];
            want[rows[r] * ld_out + c] += static_cast<float>(weight[r] * dot);
          }
        for (int64_t i = 0; i < m * ld_out; ++i)
          ASSERT_EQ(out[i], want[i]) << "K=" << K << " n=" << n << " m=" << m << " at " << i;
      }
}

// gate_up: x in [0, 4] with x[0] = 4, w1 in [0, 2] with w1[.][0] = 64 make gate >= 256, where
// silu(gate) == gate exactly in f32 (e^-256 vanishes next to 1); up = x . w3 with w3 in
// [-4, 4]. So act = gate * up exactly (f32) or its bf16 rounding (RNE). Rows are gathered
// through a_rows in a shuffled order.
TEST_P(MoeMicrokernelTest, GateUpIsExactOnSmallIntegers) {
  const MoeMicrokernel& k = uk();
  for (int64_t K : {1, 2, 3, 31, 32, 33, 64, 129})
    for (int64_t n :
         {int64_t{1}, int64_t{15}, int64_t{16}, int64_t{17}, k.gate_up_n - 1, k.gate_up_n})
      for (int64_t m : {1, 3, 6, 7, 13, 130}) {
        if (n > k.gate_up_n) continue;  // the contract: n <= gate_up_n
        const int64_t N = n + 16, tokens = m + 2, lda = K + 5;
        std::vector<float> x = moekit_test::random_ints(tokens * lda, 21 + K + m, 0, 4);
        for (int64_t t = 0; t < tokens; ++t) x[t * lda] = 4.0f;
        std::vector<float> w1 = moekit_test::random_ints(N * K, 22 + K + n, 0, 2);
        for (int64_t c = 0; c < N; ++c) w1[c * K] = 64.0f;
        const std::vector<float> w3 = moekit_test::random_ints(N * K, 23 + K + n);
        const std::vector<unsigned char> a = as_operand(k, x);
        const std::vector<unsigned char> b1 = packed_matrix(k.weight_dtype, w1, N, K);
        const std::vector<unsigned char> b3 = packed_matrix(k.weight_dtype, w3, N, K);
        std::vector<int32_t> rows(m);
        for (int64_t r = 0; r < m; ++r) rows[r] = static_cast<int32_t>((r * 5 + 1) % tokens);
        const int64_t ld_act = n + 7;
        const bool bf16 = k.a_dtype == MOEKIT_BF16;
        std::vector<unsigned char> act(m * ld_act * 4, 0xFF);  // NaN sentinel in both dtypes
        moekit::MoeGateUpCall call;
        call.a = a.data();
        call.lda = lda;
        call.a_rows = rows.data();
        call.m = m;
        call.K = K;
        call.w1 = b1.data() + moekit::vnni_panel_bytes(K, k.weight_dtype);
        call.w3 = b3.data() + moekit::vnni_panel_bytes(K, k.weight_dtype);
        call.n = n;
        call.act = act.data();
        call.ld_act = ld_act;
        std::vector<float> scratch(moekit::moe_tile_scratch_bytes(K) / 4);
        call.scratch = scratch.data();
        call.scratch_bytes = scratch.size() * 4;
        k.gate_up(call);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < ld_act; ++c) {
            const float got = moekit::load_float(act.data(), bf16, r * ld_act + c);
            if (c >= n) {
              ASSERT_TRUE(std::isnan(got)) << "column " << c << " past n=" << n << " was written";
              continue;
            }
            double gate = 0, up = 0;
            for (int64_t h = 0; h < K; ++h) {
              gate += x[rows[r] * lda + h] * w1[(16 + c) * K + h];
              up += x[rows[r] * lda + h] * w3[(16 + c) * K + h];
            }
            float want = static_cast<float>(gate * up);
            if (bf16) want = moekit::bf16_to_f32(moekit::f32_to_bf16(want));
            ASSERT_EQ(got, want) << "K=" << K << " n=" << n << " m=" << m << " r=" << r
                                 << " c=" << c;
          }
      }
}

INSTANTIATE_TEST_SUITE_P(All, MoeMicrokernelTest,
                         ::testing::Range(0, static_cast<int>(std::size(kKernels))),
                         [](const testing::TestParamInfo<int>& info) {
                           return std::string(kKernels[info.param].name) +
                                  kKernels[info.param].suffix;
                         });

// ---- the fused pipeline vs the reference ---------------------------------------------------

struct Case {
  const char* name;
  int64_t H, I, E, k, M;
  enum Routing { kRandom, kOneExpert, kSkewed } routing = kRandom;
  bool expert_map = false;  // ids over 2E global experts, odd ones mapped to -1
  bool strided = false;     // hidden/out rows padded
};

// A representative subset of H {64, 3072, 4109, 7168} x I {32, 1536, 2048} x E {1, 8, 64, 256}
// x k {1, 2, 8} x M {1, 2, 17, 64, 300}, chosen to keep the reference (double precision) cheap.
const Case kCases[] = {
    {"tiny_m1_e1_k1", 64, 32, 1, 1, 1},
    {"tiny_m17_e8_k2", 64, 32, 8, 2, 17},
    {"h64_i1536_e8_k8_m2_all_experts", 64, 1536, 8, 8, 2},
    {"h4109_i33_e8_k2_m17_odd_h_and_i", 4109, 33, 8, 2, 17},
    {"h3072_i1536_e4_k4_m2_minimax_slice", 3072, 1536, 4, 4, 2},
    {"h7168_i2048_e2_k1_m2", 7168, 2048, 2, 1, 2},
    {"e256_k8_m300", 64, 32, 256, 8, 300},
    {"e64_k8_m64_skewed", 128, 96, 64, 8, 64, Case::kSkewed},
    {"m300_one_expert", 64, 48, 8, 1, 300, Case::kOneExpert},
    {"m17_expert_map", 96, 64, 8, 2, 17, Case::kRandom, true},
    {"m64_strided", 80, 40, 8, 2, 64, Case::kRandom, false, true},
    {"m600_k8_two_chunks", 32, 16, 8, 8, 600},
};

struct Routing {
  std::vector<float> weights;  // [M, k]
  std::vector<int32_t> ids;    // [M, k]
  std::vector<int32_t> map;    // [2E] or empty
};

Routing make_routing(const Case& c, uint32_t seed) {
  Routing r;
  std::mt19937 rng(seed);
  const int64_t global = c.expert_map ? 2 * c.E : c.E;
  r.weights = moekit_test::random_floats(c.M * c.k, seed + 1, 0.05f, 1.0f);
  r.ids.resize(c.M * c.k);
  for (int64_t m = 0; m < c.M; ++m) {
    std::vector<int32_t> pool(global);
    for (int64_t e = 0; e < global; ++e) pool[e] = static_cast<int32_t>(e);
    if (c.routing == Case::kSkewed)  // most tokens pick among the first experts: others stay empty
      std::shuffle(pool.begin(), pool.begin() + std::min<int64_t>(global, c.k + 2), rng);
    else if (c.routing == Case::kRandom)
      std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t j = 0; j < c.k; ++j) r.ids[m * c.k + j] = pool[j];
  }
  if (c.expert_map) {
    r.map.resize(global);
    for (int64_t e = 0; e < global; ++e) r.map[e] = e % 2 ? -1 : static_cast<int32_t>(e / 2);
  }
  return r;
}

struct Combo {
  moekit_dtype weights, hidden, out;
};
const Combo kCombos[] = {
    {MOEKIT_BF16, MOEKIT_BF16, MOEKIT_BF16},
    {MOEKIT_BF16, MOEKIT_F32, MOEKIT_F32},
    {MOEKIT_F32, MOEKIT_F32, MOEKIT_F32},
    {MOEKIT_F32, MOEKIT_BF16, MOEKIT_BF16},
};

// Inputs and the reference output of one (case, combo), built once and shared by every
// implementation's test.
struct Problem {
  Case c;
  Combo combo;
  std::unique_ptr<Weights> w;
  Routing routing;
  int64_t ld = 0;                     // hidden and out row stride
  std::vector<unsigned char> hidden;  // [M, ld]
  std::vector<float> ref;             // [M, H] as f32 (after the output dtype's rounding)
  double scale = 0;                   // max |ref|

  FusedMoeArgs args(void* out, int threads) const {
    FusedMoeArgs a;
    a.experts = w->packed.get();
    a.M = c.M;
    a.k = c.k;
    a.hidden = hidden.data();
    a.hidden_stride = ld;
    a.hidden_dtype = combo.hidden;
    a.topk_weights = routing.weights.data();
    a.topk_weights_stride = c.k;
    a.topk_ids = routing.ids.data();
    a.topk_ids_stride = c.k;
    a.topk_ids_dtype = MOEKIT_I32;
    a.expert_map = routing.map.empty() ? nullptr : routing.map.data();
    a.out = out;
    a.out_stride = ld;
    a.out_dtype = combo.out;
    a.threads = threads;
    return a;
  }
};

const Problem& problem(int case_index, int combo_index) {
  static std::map<std::pair<int, int>, std::unique_ptr<Problem>> cache;
  auto& slot = cache[{case_index, combo_index}];
  if (slot) return *slot;
  const auto start = std::chrono::steady_clock::now();
  slot = std::make_unique<Problem>();
  Problem& p = *slot;
  p.c = kCases[case_index];
  p.combo = kCombos[combo_index];
  const uint32_t seed = 1000 + 17 * case_index;
  p.w = make_weights(p.c.E, p.c.H, p.c.I, p.combo.weights, seed);
  p.routing = make_routing(p.c, seed + 5);
  p.ld = p.c.strided ? p.c.H + 7 : p.c.H;
  const bool x_bf16 = p.combo.hidden == MOEKIT_BF16;
  const std::vector<float> x = moekit_test::random_floats(p.c.M * p.ld, seed + 9);
  p.hidden.resize(x.size() * (x_bf16 ? 2 : 4));
  for (size_t i = 0; i < x.size(); ++i) moekit::store_float(p.hidden.data(), x_bf16, i, x[i]);
  const bool out_bf16 = p.combo.out == MOEKIT_BF16;
  std::vector<unsigned char> out(p.c.M * p.ld * (out_bf16 ? 2 : 4));
  FusedMoeArgs a = p.args(out.data(), moekit::num_threads());
  moekit::ref_fused_moe(a);
  p.ref.resize(p.c.M * p.c.H);
  for (int64_t m = 0; m < p.c.M; ++m)
    for (int64_t h = 0; h < p.c.H; ++h) {
      p.ref[m * p.c.H + h] = moekit::load_float(out.data(), out_bf16, m * p.ld + h);
      p.scale = std::max(p.scale, std::fabs(static_cast<double>(p.ref[m * p.c.H + h])));
    }
  if (getenv("MOEKIT_TEST_TIMING"))
    printf("problem %s combo %d: %.2f s\n", p.c.name, combo_index,
           std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return p;
}

// Forces the AVX-512-BF16 kernel's FMA threshold (n > 0) for a scope; n = 0 leaves it alone.
struct FmaRowsScope {
  explicit FmaRowsScope(int64_t n) { moekit::bf16_fma_set_min_rows(n); }
  ~FmaRowsScope() { moekit::bf16_fma_set_min_rows(0); }
};

// Forces the AMX kernel's row threshold (n > 0) for a scope; n = 0 leaves it alone.
struct AmxRowsScope {
  explicit AmxRowsScope(int64_t n) { moekit::amx_set_min_rows(n); }
  ~AmxRowsScope() { moekit::amx_set_min_rows(0); }
};

class FusedMoeTest : public ::testing::TestWithParam<int> {
 protected:
  const moekit::Impl<FusedMoeArgs>& impl() const { return moekit::fused_moe_impls()[GetParam()]; }
  void SetUp() override { MOEKIT_SKIP_IF_CANNOT_RUN(impl()); }
  bool is_reference() const { return std::string(impl().name).rfind("ref", 0) == 0; }
  bool bf16_operands() const {
    const std::string name = impl().name;
    return name.find("avx512bf16") != std::string::npos || name.find("amx") != std::string::npos;
  }
  bool is_amx() const { return std::string(impl().name).find("_amx") != std::string::npos; }

  // Runs the implementation on problem (ci, oi) with `threads`; output pre-filled with NaN
  // (including the stride gap, which must stay NaN). Returns false if it does not support it.
  bool run(const Problem& p, int threads, std::vector<unsigned char>* out) const {
    const bool out_bf16 = p.combo.out == MOEKIT_BF16;
    out->assign(p.c.M * p.ld * (out_bf16 ? 2 : 4), 0);
    for (int64_t i = 0; i < p.c.M * p.ld; ++i) moekit::store_float(out->data(), out_bf16, i, kNaN);
    const FusedMoeArgs a = p.args(out->data(), threads);
    if (impl().supports && impl().supports(a) != nullptr) return false;
    impl().run(a);
    return true;
  }
};

TEST_P(FusedMoeTest, MatchesReference) {
  if (is_reference()) GTEST_SKIP() << "the reference is the oracle";
  if (std::string(impl().name).find("_fp8_") != std::string::npos)
    GTEST_SKIP() << "FP8 weights are tested by tests/test_moe_fp8.cc";
  // Implementations that run the AVX-512-BF16 microkernel (bf16 weights; AMX sends it its small
  // segments) are checked with its threshold at this CPU's default, and forced to each path.
  struct Mode {
    int64_t fma_rows, amx_rows;  // 0: the default
  };
  std::vector<Mode> modes = {{0, 0}};
  if (bf16_operands()) modes = {{0, 0}, {1, 0}, {moekit::kBf16FmaNever, 0}};
  // AMX sends calls and segments of fewer than amx_min_rows() rows to that microkernel, so the
  // cases of 2 or 17 tokens (the large and odd H among them) reach the tiles only at 1. SetUp
  // has skipped the test where this CPU cannot run the entry.
  if (is_amx()) modes.push_back({0, 1});
  for (const Mode& mode : modes) {
    SCOPED_TRACE("bf16_fma_min_rows " + std::to_string(mode.fma_rows) + ", amx_min_rows " +
                 std::to_string(mode.amx_rows));
    const FmaRowsScope fma_scope(mode.fma_rows);
    const AmxRowsScope amx_scope(mode.amx_rows);
    if (mode.amx_rows > 0) {
      ASSERT_EQ(moekit::amx_min_rows(), mode.amx_rows);
    }
    int ran = 0;
    for (int ci = 0; ci < static_cast<int>(std::size(kCases)); ++ci)
      for (int oi = 0; oi < static_cast<int>(std::size(kCombos)); ++oi) {
        const Problem& p = problem(ci, oi);
        std::vector<unsigned char> out;
        if (!run(p, moekit::num_threads(), &out)) continue;
        ++ran;
        const bool out_bf16 = p.combo.out == MOEKIT_BF16;
        const double K = static_cast<double>(std::max(p.c.H, p.c.I));
        const double tol =
            bf16_operands() ? std::ldexp(1.0, -6) : 64 * std::ldexp(1.0, -24) * std::sqrt(K);
        for (int64_t m = 0; m < p.c.M; ++m)
          for (int64_t h = 0; h < p.ld; ++h) {
            const float got = moekit::load_float(out.data(), out_bf16, m * p.ld + h);
            if (h >= p.c.H) {
              ASSERT_TRUE(std::isnan(got))
                  << p.c.name << ": stride gap written at " << m << "," << h;
              continue;
            }
            const float want = p.ref[m * p.c.H + h];
            const double bound = tol * p.scale + (out_bf16 ? std::ldexp(std::fabs(want), -7) : 0.0);
            ASSERT_LE(std::fabs(static_cast<double>(got) - want), bound)
                << p.c.name << " combo " << oi << " at [" << m << ", " << h << "]: got " << got
                << ", reference " << want << " (scale " << p.scale << ")";
          }
      }
    // Each implementation serves one weight dtype: half the combos.
    EXPECT_EQ(ran, static_cast<int>(std::size(kCases) * std::size(kCombos) / 2));
  }
}

TEST_P(FusedMoeTest, SameBitsForOneAndTwoThreads) {
  if (is_reference()) GTEST_SKIP() << "the reference is the oracle";
  if (std::string(impl().name).find("_fp8_") != std::string::npos)
    GTEST_SKIP() << "FP8 weights are tested by tests/test_moe_fp8.cc";
  int ran = 0;
  for (int ci : {1, 6, 7, 11})
    for (int oi = 0; oi < static_cast<int>(std::size(kCombos)); ++oi) {
      const Problem& p = problem(ci, oi);
      std::vector<unsigned char> one, two, three;
      if (!run(p, 1, &one)) continue;
      ++ran;
      ASSERT_TRUE(run(p, 2, &two));
      ASSERT_TRUE(run(p, 3, &three));
      EXPECT_EQ(one, two) << p.c.name << " combo " << oi;
      EXPECT_EQ(one, three) << p.c.name << " combo " << oi;
    }
  EXPECT_EQ(ran, 8);  // 4 cases x the 2 combos of this implementation's weight dtype
}

INSTANTIATE_TEST_SUITE_P(All, FusedMoeTest,
                         ::testing::ValuesIn(moekit_test::impl_indices(moekit::fused_moe_impls())),
                         (moekit_test::impl_test_name<FusedMoeArgs, moekit::fused_moe_impls>));

// The fast kernels serve odd hidden sizes (no fallback to the reference), and the chooser
// picks the best one for each weight dtype at this machine's level.
// The FMA threshold: an override wins and is removed again; without MOEKIT_BF16_FMA_MIN_ROWS
// the default follows the CPU's vendor (moe_microkernel.h).
TEST(Bf16FmaThreshold, OverrideAndDefault) {
  const int64_t initial = moekit::bf16_fma_min_rows();
  EXPECT_GE(initial, 1);
  {
    const FmaRowsScope scope(5);
    EXPECT_EQ(moekit::bf16_fma_min_rows(), 5);
  }
  EXPECT_EQ(moekit::bf16_fma_min_rows(), initial);
  if (std::getenv("MOEKIT_BF16_FMA_MIN_ROWS") == nullptr) {
    const bool intel = moekit::cpu_features().vendor == "GenuineIntel";
    EXPECT_EQ(initial, intel ? moekit::kBf16FmaDefaultMinRows : moekit::kBf16FmaNever);
  }
}

TEST(FusedMoeDispatch, OddHiddenDoesNotFallBack) {
  for (moekit_dtype dt : {MOEKIT_BF16, MOEKIT_F32}) {
    moekit_experts handle;
    handle.num_experts = 8;
    handle.hidden = 4096 + 13;
    handle.inter = 1536;
    handle.dtype = dt;
    handle.layout = moekit::preferred_layout(dt);
    FusedMoeArgs a;
    a.experts = &handle;
    a.M = 17;
    a.k = 2;
    a.hidden_stride = a.out_stride = handle.hidden;
    a.threads = 2;
    const char* name = moekit::choose("fused_moe", moekit::fused_moe_impls(), a).name;
    EXPECT_NE(std::string(name).rfind("ref", 0), 0u) << moekit_dtype_name(dt) << " chose " << name;
  }
}

// ---- token alignment ------------------------------------------------------------------------

class MoeAlignTest : public ::testing::TestWithParam<int> {};

TEST_P(MoeAlignTest, MatchesReference) {
  const auto& impl = moekit::moe_align_impls()[GetParam()];
  for (const Case& c : kCases)
    for (int64_t block_m : {1, 4, 16, 33}) {
      const Routing r = make_routing(c, 77);
      moekit::MoeAlignArgs a;
      a.M = c.M;
      a.k = c.k;
      a.ids = r.ids.data();
      a.ids_stride = c.k;
      a.ids_dtype = MOEKIT_I32;
      a.num_experts = c.expert_map ? 2 * c.E : c.E;
      a.expert_map = r.map.empty() ? nullptr : r.map.data();
      a.num_local_experts = c.E;
      a.block_m = block_m;
      a.capacity = moekit::moe_align_capacity(c.M, c.k, c.E, block_m);
      std::vector<int32_t> pairs(a.capacity, -7), blocks(a.capacity / block_m, -7), rows(1, -7);
      std::vector<int32_t> want_pairs = pairs, want_blocks = blocks, want_rows = rows;
      a.sorted_pairs = pairs.data();
      a.block_expert = blocks.data();
      a.num_rows = rows.data();
      impl.run(a);
      a.sorted_pairs = want_pairs.data();
      a.block_expert = want_blocks.data();
      a.num_rows = want_rows.data();
      moekit::ref_moe_align(a);
      ASSERT_EQ(rows, want_rows) << c.name;
      ASSERT_EQ(pairs, want_pairs) << c.name << " block_m " << block_m;
      ASSERT_EQ(blocks, want_blocks) << c.name << " block_m " << block_m;
    }
}

INSTANTIATE_TEST_SUITE_P(
    All, MoeAlignTest, ::testing::ValuesIn(moekit_test::impl_indices(moekit::moe_align_impls())),
    (moekit_test::impl_test_name<moekit::MoeAlignArgs, moekit::moe_align_impls>));

// ---- the C API -------------------------------------------------------------------------------

class MoeApiTest : public ::testing::Test {
 protected:
  static constexpr int64_t E = 4, H = 40, I = 24, M = 5, k = 2;
  void SetUp() override {
    w_ = make_weights(E, H, I, MOEKIT_BF16, 3);
    x_ = moekit_test::to_bf16(moekit_test::random_floats(M * H, 4));
    weights_ = moekit_test::random_floats(M * k, 5, 0.1f, 1.0f);
    ids_ = {0, 1, 2, 3, 1, 0, 3, 2, 0, 3};
    out_.assign(M * H, kNaN);
    hidden_ = make_tensor(x_.data(), MOEKIT_BF16, {M, H});
    tw_ = make_tensor(weights_.data(), MOEKIT_F32, {M, k});
    ti_ = make_tensor(ids_.data(), MOEKIT_I32, {M, k});
    out_t_ = make_tensor(out_.data(), MOEKIT_F32, {M, H});
  }
  // The call failed with INVALID_ARGUMENT, said something, and left out untouched.
  void expect_rejected(moekit_status s) {
    EXPECT_EQ(s, MOEKIT_ERR_INVALID_ARGUMENT);
    EXPECT_STRNE(moekit_last_error(), "");
    for (float v : out_) ASSERT_TRUE(std::isnan(v)) << "output written by a failed call";
  }
  moekit_status call(moekit_workspace* ws = nullptr, const moekit_tensor* map = nullptr) {
    return moekit_fused_moe(w_->packed.get(), &hidden_, &tw_, &ti_, map, ws, &out_t_);
  }

  std::unique_ptr<Weights> w_;
  std::vector<uint16_t> x_;
  std::vector<float> weights_, out_;
  std::vector<int32_t> ids_;
  moekit_tensor hidden_, tw_, ti_, out_t_;
};

TEST_F(MoeApiTest, GoodCallWritesEveryElement) {
  ASSERT_EQ(call(), MOEKIT_OK) << moekit_last_error();
  for (float v : out_) ASSERT_FALSE(std::isnan(v));
  // The same result through a caller-owned workspace of the documented size.
  std::vector<float> first = out_;
  moekit_workspace* ws = nullptr;
  ASSERT_EQ(
      moekit_workspace_create(moekit_moe_workspace_size(M, k, H, I, moekit_num_threads()), &ws),
      MOEKIT_OK);
  std::fill(out_.begin(), out_.end(), kNaN);
  ASSERT_EQ(call(ws), MOEKIT_OK) << moekit_last_error();
  EXPECT_EQ(out_, first);
  moekit_workspace_free(ws);
}

TEST_F(MoeApiTest, RejectsBadFusedMoeArguments) {
  expect_rejected(moekit_fused_moe(nullptr, &hidden_, &tw_, &ti_, nullptr, nullptr, &out_t_));
  expect_rejected(
      moekit_fused_moe(w_->packed.get(), nullptr, &tw_, &ti_, nullptr, nullptr, &out_t_));
  expect_rejected(
      moekit_fused_moe(w_->packed.get(), &hidden_, nullptr, &ti_, nullptr, nullptr, &out_t_));
  expect_rejected(
      moekit_fused_moe(w_->packed.get(), &hidden_, &tw_, nullptr, nullptr, nullptr, &out_t_));
  moekit_tensor wrong_h = make_tensor(x_.data(), MOEKIT_BF16, {M, H - 1});
  expect_rejected(
      moekit_fused_moe(w_->packed.get(), &wrong_h, &tw_, &ti_, nullptr, nullptr, &out_t_));
  moekit_tensor wrong_k = make_tensor(ids_.data(), MOEKIT_I32, {M, k + 1});
  expect_rejected(
      moekit_fused_moe(w_->packed.get(), &hidden_, &tw_, &wrong_k, nullptr, nullptr, &out_t_));
  moekit_tensor wrong_out = make_tensor(out_.data(), MOEKIT_F32, {M - 1, H});
  expect_rejected(
      moekit_fused_moe(w_->packed.get(), &hidden_, &tw_, &ti_, nullptr, nullptr, &wrong_out));
  // An id out of range.
  ids_[7] = E;
  expect_rejected(call());
  ids_[7] = -1;
  expect_rejected(call());
  ids_[7] = 2;
  // An expert map entry out of range, and one of the wrong length.
  std::vector<int32_t> map = {0, 1, E, -1};
  moekit_tensor map_t = make_tensor(map.data(), MOEKIT_I32, {E});
  expect_rejected(call(nullptr, &map_t));
  map[2] = -2;
  expect_rejected(call(nullptr, &map_t));
  // A workspace that is too small.
  moekit_workspace* ws = nullptr;
  ASSERT_EQ(moekit_workspace_create(64, &ws), MOEKIT_OK);
  expect_rejected(call(ws));
  moekit_workspace_free(ws);
}

TEST_F(MoeApiTest, RejectsBadPackAndAlignArguments) {
  moekit_experts* h = nullptr;
  EXPECT_EQ(moekit_experts_pack(nullptr, MOEKIT_LAYOUT_AUTO, &h), MOEKIT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(h, nullptr);
  const void* null_ptrs[1] = {nullptr};
  moekit_experts_desc d{};
  d.num_experts = 1;
  d.hidden = 8;
  d.inter = 8;
  d.dtype = MOEKIT_BF16;
  d.w1 = d.w3 = d.w2 = null_ptrs;
  EXPECT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_VNNI, &h), MOEKIT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(h, nullptr);
  d.hidden = 0;
  EXPECT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_VNNI, &h), MOEKIT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(h, nullptr);

  const int64_t cap = moekit_moe_align_capacity(M, k, E, 4);
  std::vector<int32_t> pairs(cap, -7), blocks(cap / 4, -7), rows(1, -7);
  moekit_tensor p_t = make_tensor(pairs.data(), MOEKIT_I32, {cap});
  moekit_tensor b_t = make_tensor(blocks.data(), MOEKIT_I32, {cap / 4});
  moekit_tensor r_t = make_tensor(rows.data(), MOEKIT_I32, {1});
  ASSERT_EQ(moekit_moe_align(&ti_, E, nullptr, 4, &p_t, &b_t, &r_t), MOEKIT_OK)
      << moekit_last_error();
  std::fill(pairs.begin(), pairs.end(), -7);
  std::fill(blocks.begin(), blocks.end(), -7);
  rows[0] = -7;
  const auto untouched = [&] {
    return std::all_of(pairs.begin(), pairs.end(), [](int32_t v) { return v == -7; }) &&
           std::all_of(blocks.begin(), blocks.end(), [](int32_t v) { return v == -7; }) &&
           rows[0] == -7;
  };
  EXPECT_EQ(moekit_moe_align(nullptr, E, nullptr, 4, &p_t, &b_t, &r_t),
            MOEKIT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moekit_moe_align(&ti_, E - 1, nullptr, 4, &p_t, &b_t, &r_t),
            MOEKIT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moekit_moe_align(&ti_, E, nullptr, 0, &p_t, &b_t, &r_t), MOEKIT_ERR_INVALID_ARGUMENT);
  moekit_tensor short_p = make_tensor(pairs.data(), MOEKIT_I32, {cap - 1});
  EXPECT_EQ(moekit_moe_align(&ti_, E, nullptr, 4, &short_p, &b_t, &r_t),
            MOEKIT_ERR_INVALID_ARGUMENT);
  std::vector<int32_t> map = {0, 1, 9, -1};
  moekit_tensor map_t = make_tensor(map.data(), MOEKIT_I32, {E});
  EXPECT_EQ(moekit_moe_align(&ti_, E, &map_t, 4, &p_t, &b_t, &r_t), MOEKIT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(untouched());
}

}  // namespace
