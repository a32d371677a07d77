// Scalar number formats shared by the reference and the kernels: bf16 and fp8 e4m3fn.
// Plain C++ so that every implementation converts exactly as the reference does.
#ifndef MOEKIT_REFERENCE_NUMERIC_H_
#define MOEKIT_REFERENCE_NUMERIC_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moekit {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even; NaN stays NaN (quieted), infinities stay infinite.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities;
// S.1111.111 is NaN; the largest finite value is 448.
inline float fp8_e4m3_to_f32(uint8_t v) {
  const int sign = v >> 7;
  const int exponent = (v >> 3) & 0xF;
  const int mantissa = v & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = std::nanf("");
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m/8 * 2^-6
  } else {
    magnitude = std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
  }
  return sign ? -magnitude : magnitude;
}

// Reads element i of a float tensor stored as F32 or BF16.
inline float load_float(const void* p, bool is_bf16, int64_t i) {
  return is_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i])
                 : static_cast<const float*>(p)[i];
}

inline void store_float(void* p, bool is_bf16, int64_t i, float v) {
  if (is_bf16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else
    static_cast<float*>(p)[i] = v;
}

}  // namespace moekit

#endif  // MOEKIT_REFERENCE_NUMERIC_H_
