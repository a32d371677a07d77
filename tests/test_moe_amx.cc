// AMX-BF16 expert matmul: the MOEKIT_LAYOUT_AMX packing, the microkernels against plain loops
// (exact on small integers, within tolerance on random values) over shapes around the tile
// sizes, and concurrent use from several threads. On CPUs without AMX the kernel tests report
// themselves skipped.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "kernels/moe/moe_amx.h"
#include "reference/numeric.h"
#include "test_util.h"

namespace {

using moekit::bf16_to_f32;
using moekit_test::random_floats;
using moekit_test::random_ints;
using moekit_test::to_bf16;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

#define SKIP_WITHOUT_AMX()                                                                   \
  do {                                                                                       \
    if (!moekit_test::cpu_can_run(MOEKIT_ISA_AMX))                                           \
      GTEST_SKIP() << "AMX kernels need amx, this CPU has "                                  \
                   << moekit_isa_name(moekit_detected_isa());                                \
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
  moekit::amx_pack_matrix(w.data(), MOEKIT_BF16, n, k, packed.data());
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
        moekit::amx_decode_row(packed.data(), k, r, row.data());
        for (int64_t i = 0; i < k; ++i) ASSERT_EQ(row[i], bf16_to_f32(w[r * k + i])) << n << "x" << k;
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
  const auto a = to_bf16(integers ? random_ints(s.rows * s.k, seed)
                                  : random_floats(s.rows * s.k, seed));
  const auto w = to_bf16(integers ? random_ints(s.n * s.k, seed + 1)
                                  : random_floats(s.n * s.k, seed + 1));
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
  const std::string where = std::to_string(s.rows) + "x" + std::to_string(s.n) + "x" +
                            std::to_string(s.k);
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
  const float gates[inter] = {0, 1, -1, 10, -10, 30, -30, 80, -80, 88.5f, -88.5f, 200, -200,
                              0.5f, -0.5f, 3};
  std::vector<float> w1f(gates, gates + inter), w3f(inter, 1.0f), xf(1, 1.0f);
  const auto w1p = pack(to_bf16(w1f), inter, hidden), w3p = pack(to_bf16(w3f), inter, hidden);
  const auto x = padded_rows(to_bf16(xf), 1, hidden, 32);
  std::vector<uint16_t> act(16 * 32, 0x7FC0);
  {
    moekit::AmxTileScope tiles;
    moekit::amx_gate_up_silu(x.data(), 32, 1, w1p.data(), w3p.data(), inter, hidden, act.data(), 32);
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
                    << rows << "x" << hidden << "x" << inter << " acc " << accumulate << " at "
                    << i << "," << h;
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
          moekit::amx_gemm_bf16(a_padded.data(), stride, s.rows, packed.data(), s.n, s.k,
                                c.data(), s.n);
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

}  // namespace
