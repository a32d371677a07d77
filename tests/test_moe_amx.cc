// AMX-BF16 expert matmul: the MOEKIT_LAYOUT_AMX packing, the microkernels against plain loops
// (exact on small integers, within tolerance on random values) over shapes around the tile
// sizes, the fused_moe entry "fused_moe_bf16_amx" (forced onto AMX tiles for every segment, and
// with the default row threshold) against an exact model and the reference, concurrent calls
// from several threads, and AMX handles read below the amx level. On CPUs without AMX the
// kernel tests report themselves skipped.
//
// NOTE (exact fused MoE): with hidden and w1 in {1, 2} and H >= 32, every gate value g is an
// integer >= 32, where silu(g) = g / (1 + exp(-g)) rounds to g in f32 in every implementation;
// with w3, w2 in [-2, 2], up and act = g * up are integers below 2^24 (exact in f32), act is
// rounded to bf16 (RNE) by every bf16 kernel, the down sums stay below 2^24, and the routing
// weights are powers of two. So each kernel's output equals the model below exactly.
#include <gtest/gtest.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dispatch/runtime.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"
#include "reference/numeric.h"
#include "reference/reference.h"
#include "test_util.h"

namespace {

using moekit::bf16_to_f32;
using moekit_test::random_floats;
using moekit_test::random_ints;
using moekit_test::to_bf16;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

#define SKIP_WITHOUT_AMX()                                    \
  do {                                                        \
    if (!moekit_test::cpu_can_run(MOEKIT_ISA_AMX))            \
      GTEST_SKIP() << "AMX kernels need amx, this CPU has "   \
                   << moekit_isa_name(moekit_detected_isa()); \
  } while (0)

// Activations as the kernels want them: amx_padded_m(rows) rows of `stride` bf16, values in
// [0, k), zeros in [k, stride).
std::vector<uint16_t> padded_rows(const std::vector<uint16_t>& a, int64_t rows, int64_t k,
                                  int64_t stride) {
  std::vector<uint16_t> out(static_cast<size_t>(moekit::amx_padded_m(rows) * stride), 0);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(&out[r * stride], &a[r * k], static_cast<size_t>(k) * 2);
  return out;
}

std::vector<uint16_t> pack(const std::vector<uint16_t>& w, int64_t n, int64_t k) {
  std::vector<uint16_t> packed(moekit::amx_packed_bytes(n, k) / 2, 0xFFFF);
  EXPECT_EQ(moekit::amx_packed_bytes(n, k), moekit::vnni_matrix_bytes(n, k, MOEKIT_BF16));
  moekit::vnni_pack_matrix(w.data(), MOEKIT_BF16, n, k, packed.data());
  return packed;
}

// c[m][n] = sum_k a[m][k] * w[n][k] in double.
std::vector<double> plain_gemm(const std::vector<uint16_t>& a, const std::vector<uint16_t>& w,
                               int64_t rows, int64_t n_cols, int64_t k) {
  std::vector<double> c(static_cast<size_t>(rows * n_cols));
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n < n_cols; ++n) {
      double s = 0;
      for (int64_t i = 0; i < k; ++i)
        s += static_cast<double>(bf16_to_f32(a[m * k + i])) * bf16_to_f32(w[n * k + i]);
      c[m * n_cols + n] = s;
    }
  return c;
}

TEST(AmxLayout, PackDecodeRoundTrip) {
  for (int64_t n : {1, 15, 16, 17, 33}) {
    for (int64_t k : {1, 31, 32, 33, 70}) {
      const auto w = to_bf16(random_floats(static_cast<size_t>(n * k), 7 + n * 100 + k));
      const auto packed = pack(w, n, k);
      std::vector<float> row(k);
      for (int64_t r = 0; r < n; ++r) {
        moekit::vnni_decode_row(packed.data(), MOEKIT_BF16, k, r, row.data());
        for (int64_t i = 0; i < k; ++i)
          ASSERT_EQ(row[i], bf16_to_f32(w[r * k + i])) << n << "x" << k;
      }
      // The documented layout, element by element; everything else is zero padding.
      const int64_t k_blocks = moekit::amx_padded_k(k) / 32;
      std::vector<bool> real(packed.size(), false);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t i = 0; i < k; ++i) {
          const size_t at = static_cast<size_t>(((r / 16) * k_blocks + i / 32) * 512 +
                                                ((i % 32) / 2) * 32 + (r % 16) * 2 + i % 2);
          ASSERT_EQ(packed[at], w[r * k + i]) << n << "x" << k << " at " << r << "," << i;
          real[at] = true;
        }
      for (size_t at = 0; at < packed.size(); ++at)
        if (!real[at]) {
          ASSERT_EQ(packed[at], 0) << n << "x" << k << ": padding at " << at;
        }
    }
  }
}

struct GemmShape {
  int64_t rows, n, k;
};

void check_gemm(const GemmShape& s, bool integers, uint32_t seed) {
  const int64_t stride = moekit::amx_padded_k(s.k) + 16;  // a row stride that is not 64 B apart
  const auto a =
      to_bf16(integers ? random_ints(s.rows * s.k, seed) : random_floats(s.rows * s.k, seed));
  const auto w =
      to_bf16(integers ? random_ints(s.n * s.k, seed + 1) : random_floats(s.n * s.k, seed + 1));
  const auto a_padded = padded_rows(a, s.rows, s.k, stride);
  const auto packed = pack(w, s.n, s.k);
  const int64_t c_stride = s.n + 3;
  // One row past the output catches writes below the last row.
  std::vector<float> c(static_cast<size_t>((s.rows + 1) * c_stride), kNaN);
  {
    moekit::AmxTileScope tiles;
    moekit::amx_gemm_bf16(a_padded.data(), stride, s.rows, packed.data(), s.n, s.k, c.data(),
                          c_stride);
  }
  const auto want = plain_gemm(a, w, s.rows, s.n, s.k);
  const std::string where =
      std::to_string(s.rows) + "x" + std::to_string(s.n) + "x" + std::to_string(s.k);
  for (int64_t m = 0; m < s.rows; ++m) {
    for (int64_t n = 0; n < s.n; ++n) {
      const float got = c[m * c_stride + n];
      const double expect = want[m * s.n + n];
      if (integers)
        ASSERT_EQ(got, expect) << where << " at " << m << "," << n;
      else
        ASSERT_NEAR(got, expect, 1e-5 * s.k + 1e-6) << where << " at " << m << "," << n;
    }
    for (int64_t n = s.n; n < c_stride; ++n)
      ASSERT_TRUE(std::isnan(c[m * c_stride + n])) << where << ": wrote past N";
  }
  for (int64_t n = 0; n < c_stride; ++n)
    ASSERT_TRUE(std::isnan(c[s.rows * c_stride + n])) << where << ": wrote past the rows";
}

TEST(AmxGemm, SmallIntegersExact) {
  SKIP_WITHOUT_AMX();
  uint32_t seed = 1;
  for (int64_t rows : {1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 48, 64})
    for (int64_t n : {1, 15, 16, 17, 31, 32, 33, 48, 80})
      for (int64_t k : {1, 2, 31, 32, 33, 64, 95, 130}) check_gemm({rows, n, k}, true, seed++);
}

TEST(AmxGemm, RandomWithinTolerance) {
  SKIP_WITHOUT_AMX();
  uint32_t seed = 1000;
  for (GemmShape s : {GemmShape{1, 64, 3072}, GemmShape{16, 1536, 96}, GemmShape{37, 100, 1536},
                      GemmShape{64, 96, 3072}, GemmShape{5, 33, 2049}})
    check_gemm(s, false, seed++);
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

TEST(AmxGateUp, MatchesPlainLoops) {
  SKIP_WITHOUT_AMX();
  uint32_t seed = 2000;
  for (int64_t rows : {1, 5, 16, 17, 32, 40})
    for (int64_t inter : {1, 16, 17, 48, 70})
      for (int64_t hidden : {1, 32, 45, 256}) {
        const int64_t x_stride = moekit::amx_padded_k(hidden);
        const int64_t act_stride = moekit::amx_padded_k(inter) + 32;
        const auto x = to_bf16(random_floats(rows * hidden, seed++, -2, 2));
        const auto w1 = to_bf16(random_floats(inter * hidden, seed++, -0.5f, 0.5f));
        const auto w3 = to_bf16(random_floats(inter * hidden, seed++, -0.5f, 0.5f));
        const auto x_padded = padded_rows(x, rows, hidden, x_stride);
        const auto w1p = pack(w1, inter, hidden), w3p = pack(w3, inter, hidden);
        std::vector<uint16_t> act(static_cast<size_t>(moekit::amx_padded_m(rows) * act_stride),
                                  0x7FC0);  // bf16 NaN
        {
          moekit::AmxTileScope tiles;
          moekit::amx_gate_up_silu(x_padded.data(), x_stride, rows, w1p.data(), w3p.data(), inter,
                                   hidden, act.data(), act_stride);
        }
        const auto gate = plain_gemm(x, w1, rows, inter, hidden);
        const auto up = plain_gemm(x, w3, rows, inter, hidden);
        for (int64_t m = 0; m < rows; ++m) {
          for (int64_t i = 0; i < inter; ++i) {
            const double want = silu(gate[m * inter + i]) * up[m * inter + i];
            const float got = bf16_to_f32(act[m * act_stride + i]);
            // bf16 output: 2^-8 relative, plus the f32 accumulation error.
            ASSERT_NEAR(got, want, std::fabs(want) * (1.0 / 128) + 1e-5 * hidden)
                << rows << "x" << inter << "x" << hidden << " at " << m << "," << i;
          }
          for (int64_t i = inter; i < moekit::amx_padded_k(inter); ++i)
            ASSERT_EQ(act[m * act_stride + i], 0) << "padding column " << i << " not zeroed";
          for (int64_t i = moekit::amx_padded_k(inter); i < act_stride; ++i)
            ASSERT_EQ(act[m * act_stride + i], 0x7FC0) << "wrote past the padded columns";
        }
      }
}

TEST(AmxGateUp, SiluEdgeValues) {
  SKIP_WITHOUT_AMX();
  // One hidden value of 1 and w3 = 1, so act = silu(w1 value) exactly as the kernel rounds it.
  const int64_t inter = 16, hidden = 1;
  const float gates[inter] = {0,   1,     -1,     10,  -10,  30,   -30,   80,
                              -80, 88.5f, -88.5f, 200, -200, 0.5f, -0.5f, 3};
  std::vector<float> w1f(gates, gates + inter), w3f(inter, 1.0f), xf(1, 1.0f);
  const auto w1p = pack(to_bf16(w1f), inter, hidden), w3p = pack(to_bf16(w3f), inter, hidden);
  const auto x = padded_rows(to_bf16(xf), 1, hidden, 32);
  std::vector<uint16_t> act(16 * 32, 0x7FC0);
  {
    moekit::AmxTileScope tiles;
    moekit::amx_gate_up_silu(x.data(), 32, 1, w1p.data(), w3p.data(), inter, hidden, act.data(),
                             32);
  }
  for (int64_t i = 0; i < inter; ++i) {
    const double g = bf16_to_f32(moekit::f32_to_bf16(gates[i]));
    const double want = silu(g);
    const float got = bf16_to_f32(act[i]);
    EXPECT_TRUE(std::isfinite(got)) << "gate " << g;
    EXPECT_NEAR(got, want, std::fabs(want) / 128 + 1e-30) << "gate " << g;
  }
}

TEST(AmxDown, WeightedStoreAndAccumulateExact) {
  SKIP_WITHOUT_AMX();
  uint32_t seed = 3000;
  for (int64_t rows : {1, 3, 16, 17, 33})
    for (int64_t hidden : {1, 16, 17, 40, 64, 70})
      for (int64_t inter : {1, 32, 33, 96})
        for (bool accumulate : {false, true}) {
          const int64_t act_stride = moekit::amx_padded_k(inter);
          const auto act = to_bf16(random_ints(rows * inter, seed++));
          const auto w2 = to_bf16(random_ints(hidden * inter, seed++));
          const auto act_padded = padded_rows(act, rows, inter, act_stride);
          const auto w2p = pack(w2, hidden, inter);
          // Rows share destinations (like a token routed twice) and every fourth is skipped.
          const int64_t out_rows = rows / 2 + 1, ld_out = hidden + 5;
          std::vector<float> out(static_cast<size_t>(out_rows * ld_out), 0.0f);
          for (int64_t i = 0; i < out_rows; ++i)
            for (int64_t h = 0; h < ld_out; ++h)
              out[i * ld_out + h] = h < hidden ? static_cast<float>((i + h) % 5) : kNaN;
          std::vector<double> want(out.begin(), out.end());
          std::vector<float*> dst(rows);
          std::vector<float> weight(rows);
          const auto prod = plain_gemm(act, w2, rows, hidden, inter);
          for (int64_t m = 0; m < rows; ++m) {
            weight[m] = 0.25f * static_cast<float>(m % 4 + 1);
            dst[m] = m % 4 == 3 ? nullptr : &out[(m / 2) * ld_out];
            if (!dst[m]) continue;
            for (int64_t h = 0; h < hidden; ++h) {
              double& o = want[(m / 2) * ld_out + h];
              o = (accumulate ? o : 0.0) + weight[m] * prod[m * hidden + h];
            }
          }
          {
            moekit::AmxTileScope tiles;
            moekit::amx_down_weighted(act_padded.data(), act_stride, rows, w2p.data(), hidden,
                                      inter, weight.data(), dst.data(), accumulate);
          }
          for (int64_t i = 0; i < out_rows; ++i)
            for (int64_t h = 0; h < ld_out; ++h) {
              if (h >= hidden)
                ASSERT_TRUE(std::isnan(out[i * ld_out + h])) << "wrote past H";
              else
                ASSERT_EQ(out[i * ld_out + h], want[i * ld_out + h])
                    << rows << "x" << hidden << "x" << inter << " acc " << accumulate << " at " << i
                    << "," << h;
            }
        }
}

TEST(AmxGemm, ConcurrentThreadsWithDifferentShapes) {
  SKIP_WITHOUT_AMX();
  const GemmShape shapes[4] = {{17, 33, 95}, {64, 48, 256}, {1, 80, 33}, {40, 16, 1000}};
  std::vector<std::string> failures(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        const GemmShape& s = shapes[(t + rep) % 4];
        const int64_t stride = moekit::amx_padded_k(s.k);
        const auto a = to_bf16(random_ints(s.rows * s.k, 100 * t + rep));
        const auto w = to_bf16(random_ints(s.n * s.k, 100 * t + rep + 50));
        const auto a_padded = padded_rows(a, s.rows, s.k, stride);
        const auto packed = pack(w, s.n, s.k);
        std::vector<float> c(static_cast<size_t>(s.rows * s.n), kNaN);
        {
          moekit::AmxTileScope tiles;
          moekit::amx_gemm_bf16(a_padded.data(), stride, s.rows, packed.data(), s.n, s.k, c.data(),
                                s.n);
        }
        const auto want = plain_gemm(a, w, s.rows, s.n, s.k);
        for (size_t i = 0; i < c.size(); ++i)
          if (c[i] != want[i]) {
            failures[t] = "thread " + std::to_string(t) + " rep " + std::to_string(rep) +
                          " element " + std::to_string(i);
            return;
          }
      }
    });
  for (std::thread& th : threads) th.join();
  for (const std::string& f : failures) EXPECT_EQ(f, "");
}

// ---- the fused_moe entry ---------------------------------------------------------------------

struct ExpertsDeleter {
  void operator()(moekit_experts* e) const { moekit_experts_free(e); }
};
using ExpertsPtr = std::unique_ptr<moekit_experts, ExpertsDeleter>;

const moekit::Impl<moekit::FusedMoeArgs>& amx_entry() {
  for (const auto& impl : moekit::fused_moe_impls())
    if (std::string(impl.name) == "fused_moe_bf16_amx") return impl;
  ADD_FAILURE() << "fused_moe_bf16_amx is not in the fused_moe table";
  return moekit::fused_moe_impls().back();
}

// Sets the AMX row threshold for one scope.
class MinRows {
 public:
  explicit MinRows(int64_t rows) { moekit::amx_set_min_rows(rows); }
  ~MinRows() { moekit::amx_set_min_rows(0); }
};

// A routed MoE problem; integers = the exact regime of the NOTE above, else random values.
struct MoeProblem {
  int64_t E = 0, H = 0, I = 0, M = 0, k = 0;
  bool integers = true;
  moekit_dtype hidden_dtype = MOEKIT_BF16, out_dtype = MOEKIT_F32;
  std::vector<float> w1, w3, w2;  // [E][I][H], [E][I][H], [E][H][I], values exact in bf16
  std::vector<uint16_t> w1b, w3b, w2b;
  ExpertsPtr packed;
  std::vector<float> x;  // [M][H], exact in bf16
  std::vector<unsigned char> hidden;
  std::vector<int32_t> ids;
  std::vector<float> weights;

  int64_t out_bytes() const { return M * H * (out_dtype == MOEKIT_BF16 ? 2 : 4); }

  moekit::FusedMoeArgs args(void* out, int threads) const {
    moekit::FusedMoeArgs a;
    a.experts = packed.get();
    a.M = M;
    a.k = k;
    a.hidden = hidden.data();
    a.hidden_stride = H;
    a.hidden_dtype = hidden_dtype;
    a.topk_weights = weights.data();
    a.topk_weights_stride = k;
    a.topk_ids = ids.data();
    a.topk_ids_stride = k;
    a.topk_ids_dtype = MOEKIT_I32;
    a.out = out;
    a.out_stride = H;
    a.out_dtype = out_dtype;
    a.threads = threads;
    return a;
  }

  // The exact model (integers only): f32 output values.
  std::vector<float> exact() const {
    std::vector<double> sum(static_cast<size_t>(M * H), 0.0);
    std::vector<double> act(static_cast<size_t>(I));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = ids[m * k + j];
        for (int64_t i = 0; i < I; ++i) {
          double g = 0, u = 0;
          for (int64_t h = 0; h < H; ++h) {
            g += static_cast<double>(x[m * H + h]) * w1[(e * I + i) * H + h];
            u += static_cast<double>(x[m * H + h]) * w3[(e * I + i) * H + h];
          }
          act[i] = bf16_to_f32(moekit::f32_to_bf16(static_cast<float>(g * u)));
        }
        for (int64_t h = 0; h < H; ++h) {
          double d = 0;
          for (int64_t i = 0; i < I; ++i) d += act[i] * w2[(e * H + h) * I + i];
          sum[m * H + h] += weights[m * k + j] * d;
        }
      }
    std::vector<float> out(sum.size());
    for (size_t i = 0; i < sum.size(); ++i) {
      out[i] = static_cast<float>(sum[i]);
      if (out_dtype == MOEKIT_BF16) out[i] = bf16_to_f32(moekit::f32_to_bf16(out[i]));
    }
    return out;
  }
};

// Tokens routed to experts with a skew: expert 0 gets most rows (AMX-sized segments), the
// others few (decode-sized ones), so one call exercises both microkernels.
std::unique_ptr<MoeProblem> make_problem(int64_t E, int64_t H, int64_t I, int64_t M, int64_t k,
                                         bool integers, uint32_t seed,
                                         moekit_pack_layout layout = MOEKIT_LAYOUT_AMX) {
  auto p = std::make_unique<MoeProblem>();
  p->E = E, p->H = H, p->I = I, p->M = M, p->k = k, p->integers = integers;
  const auto values = [&](size_t n, uint32_t s, int lo, int hi, float scale) {
    std::vector<float> v =
        integers ? random_ints(n, s, lo, hi) : random_floats(n, s, -scale, scale);
    for (float& f : v) f = bf16_to_f32(moekit::f32_to_bf16(f));
    return v;
  };
  const float s1 = 2.0f / std::sqrt(static_cast<float>(H)),
              s2 = 2.0f / std::sqrt(static_cast<float>(I));
  p->w1 = values(E * I * H, seed, 1, 2, s1);
  p->w3 = values(E * I * H, seed + 1, -2, 2, s1);
  p->w2 = values(E * H * I, seed + 2, -2, 2, s2);
  p->x = values(M * H, seed + 3, 1, 2, 1.0f);
  p->w1b = to_bf16(p->w1), p->w3b = to_bf16(p->w3), p->w2b = to_bf16(p->w2);
  std::vector<const void*> w1p, w3p, w2p;
  for (int64_t e = 0; e < E; ++e) {
    w1p.push_back(&p->w1b[e * I * H]);
    w3p.push_back(&p->w3b[e * I * H]);
    w2p.push_back(&p->w2b[e * H * I]);
  }
  moekit_experts_desc d{};
  d.num_experts = E, d.hidden = H, d.inter = I, d.dtype = MOEKIT_BF16;
  d.w1 = w1p.data(), d.w3 = w3p.data(), d.w2 = w2p.data();
  moekit_experts* h = nullptr;
  EXPECT_EQ(moekit_experts_pack(&d, layout, &h), MOEKIT_OK) << moekit_last_error();
  p->packed.reset(h);
  p->ids.resize(M * k);
  p->weights.resize(M * k);
  std::mt19937 rng(seed + 4);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < k; ++j) {
      // Slot 0: expert 0 for 3 tokens in 4; the other slots spread over the rest, distinct.
      int64_t e = (j == 0 && m % 4 != 3) ? 0 : 1 + static_cast<int64_t>(rng() % (E - 1));
      for (int64_t prev = 0; prev < j; ++prev)
        if (p->ids[m * k + prev] == e) e = (e + 1) % E, prev = -1;
      p->ids[m * k + j] = static_cast<int32_t>(e);
      p->weights[m * k + j] = integers ? (j % 2 == 0 ? 0.5f : 0.25f) : 0.1f + 0.2f * j;
    }
  return p;
}

void set_hidden(MoeProblem* p, moekit_dtype dtype) {
  p->hidden_dtype = dtype;
  const auto bf = to_bf16(p->x);
  p->hidden.resize(p->x.size() * (dtype == MOEKIT_BF16 ? 2 : 4));
  std::memcpy(p->hidden.data(),
              dtype == MOEKIT_BF16 ? static_cast<const void*>(bf.data())
                                   : static_cast<const void*>(p->x.data()),
              p->hidden.size());
}

std::vector<float> run_entry(const moekit::Impl<moekit::FusedMoeArgs>& impl, const MoeProblem& p,
                             int threads) {
  std::vector<unsigned char> out(static_cast<size_t>(p.out_bytes()));
  const bool bf = p.out_dtype == MOEKIT_BF16;
  for (int64_t i = 0; i < p.M * p.H; ++i) moekit::store_float(out.data(), bf, i, kNaN);
  const moekit::FusedMoeArgs a = p.args(out.data(), threads);
  const char* why = impl.supports ? impl.supports(a) : nullptr;
  EXPECT_EQ(why, nullptr) << impl.name << " refused: " << why;
  if (why == nullptr) impl.run(a);
  std::vector<float> values(static_cast<size_t>(p.M * p.H));
  for (int64_t i = 0; i < p.M * p.H; ++i) values[i] = moekit::load_float(out.data(), bf, i);
  return values;
}

struct MoeShape {
  int64_t E, H, I, M, k;
};
// Around the tiles: H and I below, at and above multiples of 32/16, M from decode to more
// than one 256-row segment per expert (about 300 and 600 rows) and more than one 4096-row
// chunk of the pipeline (4200 rows).
const MoeShape kMoeShapes[] = {
    {4, 32, 16, 1, 2},   {4, 32, 16, 16, 2},  {4, 45, 40, 40, 2},  {3, 70, 64, 33, 3},
    {8, 64, 48, 100, 2}, {2, 96, 33, 150, 1}, {5, 33, 17, 200, 4}, {4, 40, 150, 60, 2},
    {2, 40, 24, 300, 2}, {2, 33, 20, 800, 1}, {2, 32, 16, 2100, 2},
};

TEST(FusedMoeAmx, ExactOnSmallIntegersForcedOntoTiles) {
  SKIP_WITHOUT_AMX();
  const auto& impl = amx_entry();
  uint32_t seed = 5000;
  for (const MoeShape& s : kMoeShapes) {
    auto p = make_problem(s.E, s.H, s.I, s.M, s.k, true, seed += 10);
    for (moekit_dtype hd : {MOEKIT_BF16, MOEKIT_F32})
      for (moekit_dtype od : {MOEKIT_F32, MOEKIT_BF16}) {
        set_hidden(p.get(), hd);
        p->out_dtype = od;
        const auto want = p->exact();
        // 1: every segment on AMX tiles; default: mixed; huge: every segment on AVX-512-BF16.
        for (int64_t min_rows : {int64_t{1}, int64_t{0}, int64_t{1} << 30}) {
          MinRows scope(min_rows);
          const auto got = run_entry(impl, *p, 2);
          for (int64_t i = 0; i < s.M * s.H; ++i)
            ASSERT_EQ(got[i], want[i])
                << "E" << s.E << " H" << s.H << " I" << s.I << " M" << s.M << " k" << s.k
                << " hidden " << moekit_dtype_name(hd) << " out " << moekit_dtype_name(od)
                << " min_rows " << moekit::amx_min_rows() << " at [" << i / s.H << ", " << i % s.H
                << "]";
        }
      }
  }
}

TEST(FusedMoeAmx, RandomWithinToleranceOfTheReference) {
  SKIP_WITHOUT_AMX();
  const auto& impl = amx_entry();
  uint32_t seed = 6000;
  for (const MoeShape& s :
       {MoeShape{8, 256, 128, 64, 2}, MoeShape{4, 160, 96, 300, 2}, MoeShape{6, 100, 70, 17, 3}}) {
    auto p = make_problem(s.E, s.H, s.I, s.M, s.k, false, seed += 10);
    set_hidden(p.get(), MOEKIT_BF16);
    std::vector<float> want(static_cast<size_t>(s.M * s.H));
    moekit::ref_fused_moe(p->args(want.data(), 2));
    double scale = 0;
    for (float v : want) scale = std::max(scale, static_cast<double>(std::fabs(v)));
    for (int64_t min_rows : {int64_t{1}, int64_t{0}}) {
      MinRows scope(min_rows);
      const auto got = run_entry(impl, *p, 2);
      // bf16 operands and intermediate: as test_moe.cc, 2^-6 of the output's scale.
      for (int64_t i = 0; i < s.M * s.H; ++i)
        ASSERT_LE(std::fabs(got[i] - want[i]), std::ldexp(scale, -6))
            << "M" << s.M << " min_rows " << moekit::amx_min_rows() << " at " << i;
    }
  }
}

TEST(FusedMoeAmx, SameBitsForAnyThreadCount) {
  SKIP_WITHOUT_AMX();
  // I = 200: several column tiles per segment, so threads reuse gathered rows differently.
  auto p = make_problem(4, 96, 200, 90, 2, false, 7000);
  set_hidden(p.get(), MOEKIT_F32);
  const auto one = run_entry(amx_entry(), *p, 1);
  EXPECT_EQ(run_entry(amx_entry(), *p, 2), one);
  EXPECT_EQ(run_entry(amx_entry(), *p, 3), one);
}

// The calling thread's tile configuration, 64 bytes (all zero when none is loaded).
__attribute__((target("amx-tile"))) std::vector<uint8_t> tile_config_now() {
  alignas(64) uint8_t config[64];
  _tile_storeconfig(config);
  return std::vector<uint8_t>(config, config + 64);
}
__attribute__((target("amx-tile"))) void load_tile_config(const uint8_t* config) {
  _tile_loadconfig(config);
}
__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

TEST(FusedMoeAmx, LeavesTheCallersTileConfigurationAsItWas) {
  SKIP_WITHOUT_AMX();
  auto p = make_problem(4, 96, 200, 90, 2, false, 7100);
  set_hidden(p.get(), MOEKIT_F32);
  MinRows scope(1);
  // None before, none after: the kernels release the tiles they configured.
  release_tiles();
  const auto want = run_entry(amx_entry(), *p, 2);
  EXPECT_EQ(tile_config_now(), std::vector<uint8_t>(64, 0));
  // A caller's own configuration (another library's kernels, say) is put back.
  alignas(64) uint8_t mine[64] = {};
  mine[0] = 1;    // palette 1
  mine[16] = 32;  // tile 0: 32 bytes per row
  mine[48] = 4;   // tile 0: 4 rows
  load_tile_config(mine);
  EXPECT_EQ(run_entry(amx_entry(), *p, 2), want);
  EXPECT_EQ(tile_config_now(), std::vector<uint8_t>(mine, mine + 64));
  release_tiles();
}

TEST(FusedMoeAmx, ConcurrentCallsFromFourThreads) {
  SKIP_WITHOUT_AMX();
  std::vector<std::unique_ptr<MoeProblem>> problems;
  std::vector<std::vector<float>> want;
  for (int t = 0; t < 4; ++t) {
    const MoeShape& s = kMoeShapes[t + 2];
    problems.push_back(make_problem(s.E, s.H, s.I, s.M, s.k, true, 8000 + 10 * t));
    set_hidden(problems.back().get(), t % 2 ? MOEKIT_F32 : MOEKIT_BF16);
    want.push_back(problems.back()->exact());
  }
  std::vector<std::string> failures(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep)
        if (run_entry(amx_entry(), *problems[t], 2) != want[t]) {
          failures[t] = "thread " + std::to_string(t) + " rep " + std::to_string(rep);
          return;
        }
    });
  for (std::thread& th : threads) th.join();
  for (const std::string& f : failures) EXPECT_EQ(f, "");
}

// ---- the AMX layout: packing, decoding, choice, and use below the amx level ------------------

TEST(AmxLayoutHandle, PacksBf16AndDecodesToTheCheckpoint) {
  auto p = make_problem(2, 45, 33, 1, 1, false, 9000);
  ASSERT_EQ(moekit_experts_layout(p->packed.get()), MOEKIT_LAYOUT_AMX);
  std::vector<float> row(45);
  for (int64_t e = 0; e < 2; ++e) {
    for (int64_t n = 0; n < 33; ++n) {
      p->packed->decode_row(e, moekit::ExpertMatrix::kW1, n, row.data());
      for (int64_t h = 0; h < 45; ++h) ASSERT_EQ(row[h], p->w1[(e * 33 + n) * 45 + h]);
      p->packed->decode_row(e, moekit::ExpertMatrix::kW3, n, row.data());
      for (int64_t h = 0; h < 45; ++h) ASSERT_EQ(row[h], p->w3[(e * 33 + n) * 45 + h]);
    }
    for (int64_t n = 0; n < 45; ++n) {
      p->packed->decode_row(e, moekit::ExpertMatrix::kW2, n, row.data());
      for (int64_t i = 0; i < 33; ++i) ASSERT_EQ(row[i], p->w2[(e * 45 + n) * 33 + i]);
    }
  }
  // f32 weights have no AMX layout.
  std::vector<float> w(45 * 33, 1.0f);
  const void* ptr = w.data();
  moekit_experts_desc d{};
  d.num_experts = 1, d.hidden = 45, d.inter = 33, d.dtype = MOEKIT_F32;
  d.w1 = &ptr, d.w3 = &ptr, d.w2 = &ptr;
  moekit_experts* h = nullptr;
  EXPECT_EQ(moekit_experts_pack(&d, MOEKIT_LAYOUT_AMX, &h), MOEKIT_ERR_UNSUPPORTED);
  EXPECT_EQ(h, nullptr);
}

TEST(AmxLayoutHandle, AutoChoosesAmxOnAnAmxMachine) {
  auto p = make_problem(2, 32, 16, 1, 1, true, 9100, MOEKIT_LAYOUT_AUTO);
  const bool amx = moekit_effective_isa() >= MOEKIT_ISA_AMX;
  EXPECT_EQ(moekit_experts_layout(p->packed.get()), amx ? MOEKIT_LAYOUT_AMX : MOEKIT_LAYOUT_VNNI);
}

// Runs the public entry point on `p` and returns the output (f32) and the chosen kernel.
std::vector<float> run_public(const MoeProblem& p, std::string* chose) {
  std::vector<float> out(static_cast<size_t>(p.M * p.H), kNaN);
  moekit_tensor hidden = moekit_test::make_tensor(const_cast<unsigned char*>(p.hidden.data()),
                                                  p.hidden_dtype, {p.M, p.H});
  moekit_tensor weights =
      moekit_test::make_tensor(const_cast<float*>(p.weights.data()), MOEKIT_F32, {p.M, p.k});
  moekit_tensor ids =
      moekit_test::make_tensor(const_cast<int32_t*>(p.ids.data()), MOEKIT_I32, {p.M, p.k});
  moekit_tensor o = moekit_test::make_tensor(out.data(), MOEKIT_F32, {p.M, p.H});
  EXPECT_EQ(moekit_fused_moe(p.packed.get(), &hidden, &weights, &ids, nullptr, nullptr, &o),
            MOEKIT_OK)
      << moekit_last_error();
  *chose = moekit_last_impl("fused_moe");
  return out;
}

TEST(AmxLayoutHandle, ServedCorrectlyAtEveryLevel) {
  auto p = make_problem(4, 70, 40, 48, 2, true, 9200);
  set_hidden(p.get(), MOEKIT_BF16);
  p->out_dtype = MOEKIT_F32;
  const auto want = p->exact();
  const moekit_isa before = moekit_effective_isa();
  for (moekit_isa cap : {MOEKIT_ISA_AMX, MOEKIT_ISA_AVX512_BF16, MOEKIT_ISA_AVX512, MOEKIT_ISA_AVX2,
                         MOEKIT_ISA_SCALAR}) {
    if (cap > moekit_detected_isa()) continue;
    ASSERT_EQ(moekit_set_max_isa(cap), MOEKIT_OK);
    std::string chose;
    const auto got = run_public(*p, &chose);
    if (cap == MOEKIT_ISA_AMX) {
      EXPECT_EQ(chose, "fused_moe_bf16_amx");
    }
    // The kernels with a bf16 intermediate (amx, avx512_bf16) reproduce the exact model; the
    // others keep it in f32 (no rounding of act), and so does the reference.
    EXPECT_NE(chose.rfind("ref", 0), 0u) << "level " << moekit_isa_name(cap) << " fell back";
    const bool exact = cap >= MOEKIT_ISA_AVX512_BF16;
    double scale = 0;
    for (float v : want) scale = std::max(scale, static_cast<double>(std::fabs(v)));
    for (int64_t i = 0; i < p->M * p->H; ++i) {
      if (exact)
        ASSERT_EQ(got[i], want[i]) << chose << " at level " << moekit_isa_name(cap) << ", " << i;
      else
        ASSERT_LE(std::fabs(got[i] - want[i]), std::ldexp(scale, -7)) << chose << " at " << i;
    }
  }
  ASSERT_EQ(moekit_set_max_isa(before), MOEKIT_OK);
}

TEST(AmxThreshold, OverrideAndDefault) {
  const int64_t initial = moekit::amx_min_rows();
  EXPECT_GE(initial, 1);
  {
    MinRows scope(7);
    EXPECT_EQ(moekit::amx_min_rows(), 7);
  }
  EXPECT_EQ(moekit::amx_min_rows(), initial);
  if (std::getenv("MOEKIT_AMX_MIN_ROWS") == nullptr) {
    EXPECT_EQ(initial, moekit::kAmxDefaultMinRows);
  }
}

}  // namespace
