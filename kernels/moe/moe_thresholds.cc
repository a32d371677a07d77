// The row thresholds of the fused-MoE microkernels (plain C++: safe to call on any CPU):
//   amx_min_rows          AMX tiles against the AVX-512-BF16 microkernel (moe_amx.h);
//   bf16_fma_min_rows     f32 FMA against VDPBF16PS inside that microkernel (moe_microkernel.h).
// Each is an override set from code, else its environment variable (read once), else a default.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "dispatch/cpu_features.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"

namespace moekit {
namespace {

// A row count >= 1 from environment variable `name` ("never" where `never` > 0 is given), else
// `fallback`; any other value (0, negative, out of range, text) is reported and ignored.
int64_t rows_from_env(const char* name, int64_t fallback, int64_t never = 0) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  if (never > 0 && std::strcmp(v, "never") == 0) return never;
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v, &end, 10);
  if (errno == 0 && end != v && *end == '\0' && n >= 1) return static_cast<int64_t>(n);
  warn_ignored_env(name, v,
                   never > 0 ? "expected an integer >= 1 or never" : "expected an integer >= 1");
  return fallback;
}

// The override of one threshold: n > 0 wins over `configured`; 0 means none.
class Override {
 public:
  int64_t apply(int64_t configured) const {
    const int64_t rows = rows_.load(std::memory_order_relaxed);
    return rows > 0 ? rows : configured;
  }
  void set(int64_t rows) { rows_.store(rows > 0 ? rows : 0); }

 private:
  std::atomic<int64_t> rows_{0};
};

Override g_amx_override, g_fma_override;

}  // namespace

int64_t amx_min_rows() {
  static const int64_t configured = rows_from_env("MOEKIT_AMX_MIN_ROWS", kAmxDefaultMinRows);
  return g_amx_override.apply(configured);
}

void amx_set_min_rows(int64_t rows) { g_amx_override.set(rows); }

int64_t amx_min_rows_for(moekit_dtype weights) {
  return weights == MOEKIT_FP8_E4M3 ? std::max<int64_t>(1, amx_min_rows() / 4) : amx_min_rows();
}

int64_t bf16_fma_min_rows() {
  static const int64_t configured = rows_from_env(
      "MOEKIT_BF16_FMA_MIN_ROWS",
      cpu_features().vendor == "GenuineIntel" ? kBf16FmaDefaultMinRows : kBf16FmaNever,
      kBf16FmaNever);
  return g_fma_override.apply(configured);
}

void bf16_fma_set_min_rows(int64_t rows) { g_fma_override.set(rows); }

}  // namespace moekit
