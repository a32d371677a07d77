// FP8 e4m3fn conversion: every converter against a table built here from the format's
// definition (independently of reference/numeric.h), for all 256 bit patterns, every tail
// length, and block-scale application with scales spanning 1e-4 .. 1e3.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/moe/fp8_convert.h"
#include "tests/test_util.h"

namespace {

using moekit::Fp8Converter;
using moekit::fp8_converters;

// float8_e4m3fn from its definition: sign, 4-bit exponent (bias 7), 3-bit mantissa; exponent 0
// is subnormal (m * 2^-9); S.1111.111 is NaN; no infinities. Integer arithmetic only.
float spec_value(int v) {
  const int sign = v >> 7, exponent = (v >> 3) & 15, mantissa = v & 7;
  if (exponent == 15 && mantissa == 7) return std::numeric_limits<float>::quiet_NaN();
  const double magnitude = exponent == 0 ? mantissa / 512.0
                                         : static_cast<double>((8 + mantissa) << exponent) / 1024.0;
  return static_cast<float>(sign ? -magnitude : magnitude);
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

bool is_bf16_nan(uint16_t h) { return (h & 0x7F80) == 0x7F80 && (h & 0x7F) != 0; }

// Exact equality that also requires NaN where the expectation is NaN (and nowhere else) and
// distinguishes -0 from +0.
::testing::AssertionResult same_float(float expected, float actual) {
  if (std::isnan(expected) != std::isnan(actual) ||
      (!std::isnan(expected) && bits_of(expected) != bits_of(actual)))
    return ::testing::AssertionFailure() << "expected " << expected << " (0x" << std::hex
                                         << bits_of(expected) << "), got " << actual << " (0x"
                                         << bits_of(actual) << ")";
  return ::testing::AssertionSuccess();
}

class Fp8ConvertTest : public ::testing::TestWithParam<int> {
 protected:
  const Fp8Converter& converter() const { return fp8_converters()[GetParam()]; }
};

TEST(Fp8Spec, ReferenceDecodeMatchesDefinition) {
  for (int v = 0; v < 256; ++v)
    EXPECT_TRUE(same_float(spec_value(v), moekit::fp8_e4m3_to_f32(static_cast<uint8_t>(v))))
        << "pattern 0x" << std::hex << v;
  EXPECT_EQ(spec_value(0x7E), 448.0f);
  EXPECT_EQ(spec_value(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(bits_of(spec_value(0x80)), 0x80000000u);
}

TEST_P(Fp8ConvertTest, AllBitPatternsToF32) {
  MOEKIT_SKIP_IF_CANNOT_RUN(converter());
  std::vector<uint8_t> src(256);
  for (int v = 0; v < 256; ++v) src[v] = static_cast<uint8_t>(v);
  std::vector<float> dst(256, -12345.0f);
  converter().to_f32(src.data(), dst.data(), 256);
  for (int v = 0; v < 256; ++v)
    EXPECT_TRUE(same_float(spec_value(v), dst[v])) << "pattern 0x" << std::hex << v;
}

TEST_P(Fp8ConvertTest, AllBitPatternsToBf16) {
  MOEKIT_SKIP_IF_CANNOT_RUN(converter());
  std::vector<uint8_t> src(256);
  for (int v = 0; v < 256; ++v) src[v] = static_cast<uint8_t>(255 - v);  // another order
  std::vector<uint16_t> dst(256, 0x1234);
  converter().to_bf16(src.data(), dst.data(), 256);
  for (int i = 0; i < 256; ++i) {
    const int v = src[i];
    const float expected = spec_value(v);
    if (std::isnan(expected)) {
      EXPECT_TRUE(is_bf16_nan(dst[i])) << "pattern 0x" << std::hex << v << " gave 0x" << dst[i];
      EXPECT_EQ(dst[i] >> 15, v >> 7) << "NaN sign of pattern 0x" << std::hex << v;
    } else {
      ASSERT_EQ(bits_of(expected) & 0xFFFFu, 0u);  // every e4m3 value is a bf16 value
      EXPECT_EQ(dst[i], bits_of(expected) >> 16) << "pattern 0x" << std::hex << v;
      // vdpbf16ps and AMX treat bf16 subnormals as zero: the converters must never make one.
      if (expected != 0.0f) {
        EXPECT_NE(dst[i] & 0x7F80, 0) << "bf16 subnormal for 0x" << std::hex << v;
      }
    }
  }
}

// Every length 0..100 at every alignment 0..3: exact values, nothing written past the end.
TEST_P(Fp8ConvertTest, TailsAndOffsets) {
  MOEKIT_SKIP_IF_CANNOT_RUN(converter());
  std::mt19937 rng(7);
  std::vector<uint8_t> src(112);
  for (uint8_t& b : src) b = static_cast<uint8_t>(rng());
  constexpr float kSentinel = -777.0f;
  constexpr uint16_t kSentinelBf16 = 0xABCD;
  for (int offset = 0; offset < 4; ++offset)
    for (int n = 0; n <= 100; ++n) {
      std::vector<float> f(n + 40, kSentinel);
      std::vector<uint16_t> h(n + 40, kSentinelBf16);
      converter().to_f32(src.data() + offset, f.data() + offset, n);
      converter().to_bf16(src.data() + offset, h.data() + offset, n);
      for (int i = 0; i < n + 40; ++i) {
        const bool inside = i >= offset && i < offset + n;
        if (!inside) {
          ASSERT_EQ(bits_of(f[i]), bits_of(kSentinel)) << "f32 n=" << n << " wrote index " << i;
          ASSERT_EQ(h[i], kSentinelBf16) << "bf16 n=" << n << " wrote index " << i;
          continue;
        }
        const float expected = spec_value(src[i]);
        ASSERT_TRUE(same_float(expected, f[i])) << "n=" << n << " i=" << i;
        if (std::isnan(expected)) {
          ASSERT_TRUE(is_bf16_nan(h[i]));
        } else {
          ASSERT_EQ(h[i], bits_of(expected) >> 16) << "n=" << n << " i=" << i;
        }
      }
    }
}

// dst[i] = fp8(q[i]) * scale[i / block_k]: one rounding of an exact product, so equal to the
// f32 product of the table value and the scale, bit for bit, over scales of 1e-4 .. 1e3 and
// block sizes that do and do not divide the row.
TEST_P(Fp8ConvertTest, BlockScales) {
  MOEKIT_SKIP_IF_CANNOT_RUN(converter());
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> log_scale(std::log(1e-4f), std::log(1e3f));
  const int64_t lengths[] = {1, 31, 64, 128, 200, 383, 3072, 4109};
  const int64_t blocks[] = {64, 128, 256, 17};
  for (int64_t n : lengths)
    for (int64_t block_k : blocks) {
      const int64_t num_blocks = (n + block_k - 1) / block_k;
      std::vector<uint8_t> q(n);
      for (uint8_t& b : q) b = static_cast<uint8_t>(rng());
      q[n / 2] = 0x7F;  // NaN
      if (n > 2) q[n - 1] = 0xFF;
      std::vector<float> scales(num_blocks);
      for (float& s : scales) s = std::exp(log_scale(rng));
      scales[0] = 1e-4f;
      scales[num_blocks - 1] = 1e3f;
      std::vector<float> dst(n + 16, -777.0f);
      converter().dequant_f32(q.data(), scales.data(), n, block_k, dst.data());
      for (int64_t i = 0; i < n; ++i)
        ASSERT_TRUE(same_float(spec_value(q[i]) * scales[i / block_k], dst[i]))
            << "n=" << n << " block_k=" << block_k << " i=" << i;
      for (int64_t i = n; i < n + 16; ++i) ASSERT_EQ(dst[i], -777.0f) << "wrote past the end";
    }
}

INSTANTIATE_TEST_SUITE_P(Converters, Fp8ConvertTest,
                         ::testing::ValuesIn([] {
                           std::vector<int> v;
                           for (size_t i = 0; i < fp8_converters().size(); ++i)
                             v.push_back(static_cast<int>(i));
                           return v;
                         }()),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::string(fp8_converters()[info.param].name);
                         });

}  // namespace
