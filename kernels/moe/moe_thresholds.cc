// The row threshold between the AVX-512-BF16 microkernel's VDPBF16PS and f32 FMA paths (see the
// NOTE in moe_microkernel.h). Plain C++: safe to call on any CPU.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "dispatch/cpu_features.h"
#include "kernels/moe/moe_microkernel.h"

namespace moekit {
namespace {

std::atomic<int64_t> g_fma_min_rows_override{0};

int64_t fma_min_rows_default() {
  const char* v = std::getenv("MOEKIT_BF16_FMA_MIN_ROWS");
  if (v != nullptr && std::strcmp(v, "never") == 0) return kBf16FmaNever;
  if (v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    if (end != v && *end == '\0' && n >= 1) return static_cast<int64_t>(n);
  }
  return cpu_features().vendor == "GenuineIntel" ? kBf16FmaDefaultMinRows : kBf16FmaNever;
}

}  // namespace

int64_t bf16_fma_min_rows() {
  static const int64_t from_env = fma_min_rows_default();
  const int64_t override_rows = g_fma_min_rows_override.load(std::memory_order_relaxed);
  return override_rows > 0 ? override_rows : from_env;
}

void bf16_fma_set_min_rows(int64_t rows) { g_fma_min_rows_override.store(rows > 0 ? rows : 0); }

}  // namespace moekit
