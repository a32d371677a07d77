// Token alignment by counting sort: the fast moe_align implementation. Two passes over the ids
// (count, then place), O(M*k + E), output identical to ref_moe_align: experts ascending, pairs
// in (token, slot) order within an expert, each expert padded with -1 to a multiple of block_m.
#include <vector>

#include "kernels/moe/moe.h"

namespace moekit {
namespace {

int64_t local_id(const MoeAlignArgs& a, int64_t m, int64_t j) {
  const int64_t i = m * a.ids_stride + j;
  const int64_t e = a.ids_dtype == MOEKIT_I64 ? static_cast<const int64_t*>(a.ids)[i]
                                              : static_cast<const int32_t*>(a.ids)[i];
  return a.expert_map ? a.expert_map[e] : e;
}

}  // namespace

void moe_align_counting_sort(const MoeAlignArgs& a) {
  const int64_t E = a.num_local_experts;
  // Per-expert counters: a per-thread buffer grown once, so steady-state calls do not allocate.
  thread_local std::vector<int64_t> next;
  next.assign(static_cast<size_t>(E) + 1, 0);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t j = 0; j < a.k; ++j) {
      const int64_t e = local_id(a, m, j);
      if (e >= 0) ++next[e + 1];
    }
  // Padded start row of each expert.
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = next[e + 1];
    next[e + 1] = 0;
    const int64_t padded = (n + a.block_m - 1) / a.block_m * a.block_m;
    for (int64_t b = 0; b < padded / a.block_m; ++b)
      a.block_expert[row / a.block_m + b] = static_cast<int32_t>(e);
    for (int64_t i = row + n; i < row + padded; ++i) a.sorted_pairs[i] = -1;
    next[e] = row;
    row += padded;
  }
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t j = 0; j < a.k; ++j) {
      const int64_t e = local_id(a, m, j);
      if (e >= 0) a.sorted_pairs[next[e]++] = static_cast<int32_t>(m * a.k + j);
    }
  *a.num_rows = static_cast<int32_t>(row);
}

}  // namespace moekit
