// Top-k routing and the fused router GEMM, written once over a per-ISA `Ops` struct.
//
// Include this file inside a namespace of its own in each ISA translation unit (e.g.
// moekit::topk_avx512), after <algorithm>, <cmath>, <cstdint>, <cstring>, <new>, <omp.h>,
// "dispatch/runtime.h" and "kernels/topk/topk_kernels.h", and after defining `struct Ops` (see
// topk_scalar.cc for the required members). A distinct namespace per ISA keeps the inline
// functions compiled with one ISA's flags from being merged with another's at link time.
//
// NOTE [exact routing]
// Ids must equal the reference's exactly, so the scores are computed with the reference's
// arithmetic op for op: libm's expf once per expert (a vector exp would have to be correctly
// rounded exactly where glibc's is to guarantee the same ids), then IEEE add/div/convert, which
// vectorize without changing a bit. The softmax denominator is a double sum in expert order, as
// in the reference. Everything after scoring is exact integer work on order keys:
//   key(x) = 0 for NaN, else the float's bits mapped so that unsigned order = numeric order, with
//            -0 and +0 on the same key (they compare equal in the reference);
//   composite = key << 32 | (0xFFFFFFFF - index): a larger composite ranks ahead, ties go to the
//            lower index, and every expert's composite is distinct.
// The selection keeps the k largest composites in a sorted list while scanning experts in
// ascending index order; a vector compare of keys against the list's k-th key skips most experts
// (a later expert with an equal key has a higher index and cannot enter). Before the scan, the
// k-th largest of the per-lane key maxima (k distinct experts reach it) raises that threshold
// at once, so that nearly only the final k experts are ever inserted.
// Grouped selection (DeepSeek-V3): a group's score is the float sum of its two largest selection
// scores; the topk_group best groups are kept and the experts of the kept groups are scanned in
// ascending index order, which is the reference's order restricted to eligible experts.
//
// No include guard on purpose: each ISA file includes this once, in its own namespace.
// Only builtins, libc calls (memset, memcpy, expf: std::exp(float) of the reference is expf),
// integer std::min/std::max and templates instantiated with local lambdas are used here, so that
// no inline function shared with other files (emitted out of line in debug builds) carries this
// ISA's vector instructions.

constexpr int64_t kRowScratch = kTopkMaxExperts + 64;  // padded so vector tails stay in bounds

inline uint32_t order_key(float x) {
  if (__builtin_isnan(x)) return 0;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if (x == 0.0f) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float key_value(uint32_t key) {
  if (key == 0) return __builtin_nanf("");
  const uint32_t u = (key & 0x80000000u) ? (key ^ 0x80000000u) : ~key;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint64_t composite(uint32_t key, uint32_t index) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - index);
}

inline uint32_t composite_index(uint64_t c) { return 0xFFFFFFFFu - static_cast<uint32_t>(c); }

// The k best composites seen so far, best first. Composite 0 (key 0, index 2^32-1) is an empty
// slot and ranks below every real expert, NaN ones included.
class TopList {
 public:
  explicit TopList(int k) : k_(k) {
    for (int j = 0; j < k; ++j) list_[j] = 0;
  }
  uint32_t threshold_key() const { return threshold_key_; }
  // Experts with keys below `floor` are known to rank below k others: let the filter skip them.
  void set_floor(uint32_t floor) {
    floor_ = floor;
    threshold_key_ = std::max(threshold_key_, floor);
  }
  void consider(uint32_t key, uint32_t index) {
    const uint64_t c = composite(key, index);
    if (c <= list_[k_ - 1]) return;
    int j = k_ - 1;
    while (j > 0 && list_[j - 1] < c) {
      list_[j] = list_[j - 1];
      --j;
    }
    list_[j] = c;
    threshold_key_ = std::max(floor_, static_cast<uint32_t>(list_[k_ - 1] >> 32));
  }
  uint32_t id(int j) const { return composite_index(list_[j]); }

 private:
  uint64_t list_[kTopkMaxK];
  int k_;
  uint32_t threshold_key_ = 0;
  uint32_t floor_ = 0;
};

struct RowScratch {
  alignas(64) float scores[kRowScratch];
  alignas(64) uint32_t keys[kRowScratch];
  uint64_t group_rank[kTopkMaxExperts];
  int chosen_groups[kTopkMaxExperts];
};

// Scores of one row, bit-identical to the reference's score_row.
inline void score_row(const TopkArgs& a, const void* row, bool bf16, float* s) {
  const int64_t E = a.E;
  Ops::load_row(row, bf16, E, s);
  if (a.scoring == MOEKIT_SCORING_SIGMOID) {
    for (int64_t e = 0; e < E; ++e) s[e] = ::expf(-s[e]);
    Ops::sigmoid_from_exp(s, E);  // 1 / (1 + exp(-x))
    return;
  }
  const float max_logit = Ops::max_non_nan(s, E);
  double sum = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    const float t = ::expf(s[e] - max_logit);
    s[e] = t;
    if (!__builtin_isnan(t)) sum += t;
  }
  Ops::divide_by(s, E, sum);  // float(double(t) / sum)
}

// The k-th largest of per-lane key maxima: k distinct experts reach it, so it bounds the k-th
// selected key from below. Taken over the experts about to be scanned, it lets the vector filter
// reject nearly every expert that would otherwise be inserted and later pushed out.
inline uint32_t kth_of_lane_maxima(const uint32_t* lane_max, int k) {
  uint32_t best[Ops::kLanes];
  int n = 0;
  for (int l = 0; l < Ops::kLanes; ++l) {
    const uint32_t v = lane_max[l];
    if (n == k && v <= best[k - 1]) continue;
    int j = n < k ? n++ : k - 1;
    while (j > 0 && best[j - 1] < v) {
      best[j] = best[j - 1];
      --j;
    }
    best[j] = v;
  }
  return n == k ? best[k - 1] : 0;
}

// Selection floors pay off from a few vectors of experts per row.
constexpr int64_t kFloorMinExperts = 4 * Ops::kLanes;

inline void scan_range(const uint32_t* keys, int64_t begin, int64_t end, TopList& top) {
  for (int64_t i = begin; i < end; i += Ops::kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(Ops::kLanes, end - i));
    uint32_t mask = Ops::mask_ge(keys + i, n, top.threshold_key());
    while (mask != 0) {
      const int lane = __builtin_ctz(mask);
      mask &= mask - 1;
      top.consider(keys[i + lane], static_cast<uint32_t>(i + lane));
    }
  }
}

// Picks the topk_group best groups; returns their indices ascending in sc.chosen_groups.
inline void choose_groups(const TopkArgs& a, RowScratch& sc) {
  const int64_t groups = a.num_expert_group, group_size = a.E / groups;
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t k1, k2;
    Ops::top2(sc.keys + g * group_size, group_size, &k1, &k2);
    float score = 0.0f;  // summed as the reference does: 0 + first + second
    score += key_value(k1);
    if (group_size >= 2) score += key_value(k2);
    sc.group_rank[g] = composite(order_key(score), static_cast<uint32_t>(g));
  }
  const int keep = a.topk_group;
  std::partial_sort(sc.group_rank, sc.group_rank + keep, sc.group_rank + groups,
                    [](uint64_t x, uint64_t y) { return x > y; });
  for (int i = 0; i < keep; ++i)
    sc.chosen_groups[i] = static_cast<int>(composite_index(sc.group_rank[i]));
  std::sort(sc.chosen_groups, sc.chosen_groups + keep, [](int x, int y) { return x < y; });
}

// Routes row m whose logits are `row` (f32 or bf16).
inline void route_row(const TopkArgs& a, const void* row, bool bf16, int64_t m, RowScratch& sc) {
  const int64_t E = a.E;
  score_row(a, row, bf16, sc.scores);
  Ops::make_keys(sc.scores, a.bias, E, sc.keys);
  TopList top(a.k);
  const bool use_floor = a.k <= Ops::kLanes;
  alignas(64) uint32_t lane_max[Ops::kLanes] = {};
  if (a.num_expert_group > 1) {
    choose_groups(a, sc);
    const int64_t group_size = E / a.num_expert_group;
    if (use_floor && group_size * a.topk_group >= kFloorMinExperts) {
      for (int i = 0; i < a.topk_group; ++i)
        Ops::lane_max(sc.keys + sc.chosen_groups[i] * group_size, group_size, lane_max);
      top.set_floor(kth_of_lane_maxima(lane_max, a.k));
    }
    for (int i = 0; i < a.topk_group; ++i) {
      const int64_t begin = sc.chosen_groups[i] * group_size;
      scan_range(sc.keys, begin, begin + group_size, top);
    }
  } else {
    if (use_floor && E >= kFloorMinExperts) {
      Ops::lane_max(sc.keys, E, lane_max);
      top.set_floor(kth_of_lane_maxima(lane_max, a.k));
    }
    scan_range(sc.keys, 0, E, top);
  }
  // Weights: the unbiased scores, renormalized in double as the reference does, then scaled.
  float* w = a.weights + m * a.weights_stride;
  double total = 0.0;
  for (int j = 0; j < a.k; ++j) total += sc.scores[top.id(j)];
  for (int j = 0; j < a.k; ++j) {
    const uint32_t id = top.id(j);
    float v = sc.scores[id];
    if (a.renormalize) v = static_cast<float>(v / total);
    w[j] = v * a.scaling;
    if (a.ids_dtype == MOEKIT_I64)
      static_cast<int64_t*>(a.ids)[m * a.ids_stride + j] = id;
    else
      static_cast<int32_t*>(a.ids)[m * a.ids_stride + j] = static_cast<int32_t>(id);
  }
}

// Work (rows x experts) from which rows are split over threads. Measured on a 2-core AVX-512 VM
// with E=256 (one row ~0.7 us): 2 rows lose on two threads (1.7 vs 1.4 us), 4 rows gain a
// little (2.4 vs 2.9 us), 8 rows gain 1.5x.
constexpr int64_t kRouteParallelMinElements = 6 * 256;

inline void route_rows(const TopkArgs& a, int64_t m0, int64_t m1) {
  RowScratch sc;
  const bool bf16 = a.logits_dtype == MOEKIT_BF16;
  const size_t elem = bf16 ? 2 : 4;
  for (int64_t m = m0; m < m1; ++m)
    route_row(a, static_cast<const char*>(a.logits) + m * a.logits_stride * elem, bf16, m, sc);
}

inline void topk_route_run(const TopkArgs& a) {
  const int threads = a.M * a.E >= kRouteParallelMinElements
                          ? static_cast<int>(std::min<int64_t>(num_threads(), a.M))
                          : 1;
  if (threads <= 1) {
    route_rows(a, 0, a.M);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    route_rows(a, a.M * t / nt, a.M * (t + 1) / nt);
  }
}

// ---- router GEMM --------------------------------------------------------------------------
//
// NOTE [router GEMM]
// logits[m][e] = hidden[m] . gate[e]: both operands are rows along H, so each output is a dot
// product and the gate needs no packing (it changes between calls and is read once per block).
// Blocking: tokens in blocks of `block` rows per thread; H in chunks of Ops::kChunkH; experts in
// panels of Ops::kTileN rows whose chunk stays in L1 while every token micro-tile (Ops::kTileM
// rows, streamed from L2) of the block runs against it. The whole gate is therefore streamed
// from memory once per token block. Each tile keeps kTileM x kTileN vector accumulators and
// reduces them once per chunk into the block's logits (a per-thread buffer), which are routed
// right after the block, so [M, E] logits are never written unless logits_out asks for them.

class AlignedScratch {
 public:
  ~AlignedScratch() { ::operator delete[](data_, std::align_val_t(64)); }
  float* get(size_t floats) {
    if (floats > size_) {
      ::operator delete[](data_, std::align_val_t(64));
      data_ = static_cast<float*>(::operator new[](floats * sizeof(float), std::align_val_t(64)));
      size_ = floats;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t size_ = 0;
};

template <int MR, int NR>
inline void tile_n(int nr, const float* const* a, const float* const* b, int64_t n, float* c,
                   int64_t ldc) {
  if constexpr (NR >= 1) {
    if (nr == NR) return Ops::template dot_tile<MR, NR>(a, b, n, c, ldc);
    tile_n<MR, NR - 1>(nr, a, b, n, c, ldc);
  }
}

template <int MR>
inline void tile_mn(int mr, int nr, const float* const* a, const float* const* b, int64_t n,
                    float* c, int64_t ldc) {
  if constexpr (MR >= 1) {
    if (mr == MR) return tile_n<MR, Ops::kTileN>(nr, a, b, n, c, ldc);
    tile_mn<MR - 1>(mr, nr, a, b, n, c, ldc);
  }
}

// Token rows per block: the block's logits stay within about kBlockLogitBytes.
constexpr int64_t kBlockLogitBytes = 64 * 1024;
constexpr int64_t kMaxBlockTokens = 96;

inline int64_t block_tokens(int64_t E) {
  int64_t rows = kBlockLogitBytes / (E * static_cast<int64_t>(sizeof(float)));
  rows = std::min<int64_t>(std::max<int64_t>(rows, Ops::kTileM), kMaxBlockTokens);
  return rows / Ops::kTileM * Ops::kTileM;
}

// logits[i * ldl + e] = hidden[b0 + i] . gate[e] for nb <= kMaxBlockTokens tokens and the
// experts [e_begin, e_end). The value of each logit depends only on H's chunking and on the
// expert's place in its kDotTileN group of a kTileN panel (which fixes its reduction in
// dot_tile), never on the token tile or on [e_begin, e_end) as long as e_begin is a multiple of
// kTileN: splitting experts in whole panels gives the bits of the unsplit GEMM. `converted`
// holds nb x kChunkH floats when hidden is bf16.
inline void router_gemm(const RouterTopkArgs& r, int64_t b0, int64_t nb, int64_t e_begin,
                        int64_t e_end, float* logits, int64_t ldl, float* converted) {
  const bool bf16 = r.hidden_dtype == MOEKIT_BF16;
  const int64_t H = r.H;
  const float* a_rows[kMaxBlockTokens];
  const float* b_rows[Ops::kTileN];
  for (int64_t i = 0; i < nb; ++i)
    std::memset(logits + i * ldl + e_begin, 0,
                static_cast<size_t>(e_end - e_begin) * sizeof(float));
  for (int64_t h0 = 0; h0 < H; h0 += Ops::kChunkH) {
    const int64_t hc = std::min<int64_t>(Ops::kChunkH, H - h0);
    for (int64_t i = 0; i < nb; ++i) {
      if (bf16) {
        const uint16_t* src =
            static_cast<const uint16_t*>(r.hidden) + (b0 + i) * r.hidden_stride + h0;
        Ops::load_row(src, true, hc, converted + i * Ops::kChunkH);
        a_rows[i] = converted + i * Ops::kChunkH;
      } else {
        a_rows[i] = static_cast<const float*>(r.hidden) + (b0 + i) * r.hidden_stride + h0;
      }
    }
    for (int64_t e0 = e_begin; e0 < e_end; e0 += Ops::kTileN) {
      const int nr = static_cast<int>(std::min<int64_t>(Ops::kTileN, e_end - e0));
      for (int j = 0; j < nr; ++j) b_rows[j] = r.gate + (e0 + j) * r.gate_stride + h0;
      // Dot tiles of at most Ops::kDotTileN experts of the panel, each over every token tile.
      for (int j0 = 0; j0 < nr; j0 += Ops::kDotTileN) {
        const int nj = std::min(Ops::kDotTileN, nr - j0);
        for (int64_t i0 = 0; i0 < nb; i0 += Ops::kTileM) {
          const int mr = static_cast<int>(std::min<int64_t>(Ops::kTileM, nb - i0));
          tile_mn<Ops::kTileM>(mr, nj, a_rows + i0, b_rows + j0, hc,
                               logits + i0 * ldl + e0 + j0, ldl);
        }
      }
    }
  }
}

// Copies row i of the logits to logits_out if asked, and routes it as token m.
inline void emit_and_route(const RouterTopkArgs& r, const float* row, int64_t m, RowScratch& sc) {
  if (r.logits_out)
    std::memcpy(r.logits_out + m * r.logits_out_stride, row,
                static_cast<size_t>(r.route.E) * sizeof(float));
  route_row(r.route, row, false, m, sc);
}

#ifdef MOEKIT_TOPK_PACKED_ROUTER
// NOTE [packed-token router GEMM]
// With 16 or more tokens per thread the dot-product tiles (horizontal reductions, two vector
// loads per FMA pair) lose to an outer-product kernel. The small operand is packed instead of
// the gate: a panel of kPanelTokens tokens is transposed to [H][kPanelTokens] (register
// transposes, pack_panel), and the tile (bcast_tile_n) multiplies kBcastExperts gate rows, one
// broadcast scalar per row and h, by the panel's token vectors: a few vector loads +
// kBcastExperts broadcasts per (vectors x kBcastExperts) FMAs, no reductions, gate rows read in
// place (sequentially, from L2 after the first panel). The whole H is summed in registers;
// results go to an expert-major block buffer [E][kPackedBlockTokens] whose columns are then
// routed token by token. The ISA file defines kPackedMinTokens, kPanelTokens, kBcastExperts,
// pack_panel and bcast_tile<NR> (declared before this file), and MOEKIT_TOPK_PACKED_ROUTER.

// The bcast_tile of nr (1..NR) gate rows.
template <int NR>
inline void bcast_tile_n(int nr, const float* const* g, const float* panel, int64_t H, float* out,
                         int64_t ldo) {
  if constexpr (NR >= 1) {
    if (nr == NR) return bcast_tile<NR>(g, panel, H, out, ldo);
    bcast_tile_n<NR - 1>(nr, g, panel, H, out, ldo);
  }
}

constexpr int64_t kPackedBlockTokens = 64;  // packed hidden: 64 x H floats (768 KB at H=3072)
static_assert(kPackedBlockTokens % kPanelTokens == 0, "whole panels per block");

inline void router_rows_packed(const RouterTopkArgs& r, int64_t m0, int64_t m1) {
  const int64_t E = r.route.E, H = r.H;
  static thread_local AlignedScratch panel_scratch, logit_scratch;
  float* panels = panel_scratch.get(static_cast<size_t>(kPackedBlockTokens * H));
  float* block_logits = logit_scratch.get(static_cast<size_t>(E * kPackedBlockTokens + E));
  float* row = block_logits + E * kPackedBlockTokens;  // one token's logits, contiguous
  const float* g[kBcastExperts];
  RowScratch sc;
  for (int64_t b0 = m0; b0 < m1; b0 += kPackedBlockTokens) {
    const int64_t nb = std::min(kPackedBlockTokens, m1 - b0);
    const int64_t num_panels = (nb + kPanelTokens - 1) / kPanelTokens;
    for (int64_t p = 0; p < num_panels; ++p)
      pack_panel(r, b0 + p * kPanelTokens, std::min<int64_t>(kPanelTokens, nb - p * kPanelTokens),
                 panels + p * H * kPanelTokens);
    for (int64_t e0 = 0; e0 < E; e0 += kBcastExperts) {
      const int nr = static_cast<int>(std::min<int64_t>(kBcastExperts, E - e0));
      for (int j = 0; j < nr; ++j) g[j] = r.gate + (e0 + j) * r.gate_stride;
      for (int64_t p = 0; p < num_panels; ++p)
        bcast_tile_n<kBcastExperts>(nr, g, panels + p * H * kPanelTokens, H,
                                    block_logits + e0 * kPackedBlockTokens + p * kPanelTokens,
                                    kPackedBlockTokens);
    }
    for (int64_t i = 0; i < nb; ++i) {
      for (int64_t e = 0; e < E; ++e) row[e] = block_logits[e * kPackedBlockTokens + i];
      emit_and_route(r, row, b0 + i, sc);
    }
  }
}
#endif  // MOEKIT_TOPK_PACKED_ROUTER

inline void router_rows(const RouterTopkArgs& r, int64_t m0, int64_t m1) {
#ifdef MOEKIT_TOPK_PACKED_ROUTER
  // Enough tokens to fill the ISA's packed-token kernel (see router_rows_packed).
  if (m1 - m0 >= kPackedMinTokens) return router_rows_packed(r, m0, m1);
#endif
  const int64_t E = r.route.E;
  const bool bf16 = r.hidden_dtype == MOEKIT_BF16;
  const int64_t block = block_tokens(E);
  static thread_local AlignedScratch logit_scratch, hidden_scratch;
  float* logits = logit_scratch.get(static_cast<size_t>(block * E));
  float* converted = bf16 ? hidden_scratch.get(static_cast<size_t>(block * Ops::kChunkH)) : nullptr;
  RowScratch sc;
  for (int64_t b0 = m0; b0 < m1; b0 += block) {
    const int64_t nb = std::min(block, m1 - b0);
    router_gemm(r, b0, nb, 0, E, logits, E, converted);
    for (int64_t i = 0; i < nb; ++i) emit_and_route(r, logits + i * E, b0 + i, sc);
  }
}

// Tokens from which the router splits tokens over threads. Each thread then streams the whole
// gate (3 MB for MiniMax-M2) once per block of its own tokens. Measured on a 2-core AVX-512 VM
// (E=256, H=3072): one token costs about as much as streaming the gate once (~100 us from L3),
// so 2 and 3 tokens gain little from a second thread, while 4 tokens do (153 us on one thread).
constexpr int64_t kRouterParallelMinTokens = 4;

// NOTE [few-token router split]
// Splitting tokens over threads makes every thread stream the whole gate (3 MB for MiniMax-M2)
// for its own tokens, which pays only when each thread has a full split unit (Ops::kSplitTokens
// tokens: the packed-token kernel's width where the ISA has one). With fewer tokens than that
// (decode, M = 1, up to M = 16 * threads), the experts are split instead, in whole kTileN
// panels: each thread computes the logits of its panels for all the tokens into one shared
// [M, E] buffer (the calling thread's scratch, grown once), so the gate is streamed once by all
// the threads together (16 threads at M = 64: 0.89x OpenBLAS with the token split, each thread
// streaming the gate for 4 tokens). The routing of fewer than kRouterSplitParallelRouteTokens
// rows then runs on the calling thread after the parallel region, as for one token it always
// has (a row takes ~1 us, less than waking the threads again); more rows are routed by all the
// threads, rows split evenly, after a barrier. Each logit is the same dot_tile reduction over
// the same H chunks at the same place in its panel whatever the split, so the results are
// bit-identical to the single-thread path's (see router_gemm).
// The thread count follows the work: a thread is worth waking for about kRouterSplitMinMacs
// multiply-adds (see its comment for the measurement), so tiny E x H stays on one thread.

// Multiply-adds per thread from which the expert split wakes another thread. Measured on a 2-core
// AVX-512 VM, M = 1, per-call times on 1 vs 2 threads (AVX-512 / AVX2 kernels): 32K MACs
// (E=16, H=2048) lose on two threads (1.9 -> 2.3 us / 2.0 -> 2.5 us), 64K (E=32, H=2048 and
// E=64, H=1024) gain 1.15x, 128K gain 1.45x.
constexpr int64_t kRouterSplitMinMacs = 32 * 1024;
// Tokens from which the expert split also routes in parallel (after a barrier): a row takes
// ~1 us, so a few rows are cheaper on the calling thread than a barrier over all the threads.
constexpr int64_t kRouterSplitParallelRouteTokens = 8;

// Threads for the expert split of M tokens (1: run on the calling thread).
inline int router_split_threads(int64_t M, int64_t E, int64_t H, int max_threads) {
  const int64_t panels = (E + Ops::kTileN - 1) / Ops::kTileN;
  const int64_t by_work = M * E * H / kRouterSplitMinMacs;
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(max_threads), panels, by_work})));
}

inline void router_split_experts(const RouterTopkArgs& r, int threads) {
  const int64_t M = r.route.M, E = r.route.E;
  const bool bf16 = r.hidden_dtype == MOEKIT_BF16;
  const int64_t panels = (E + Ops::kTileN - 1) / Ops::kTileN;
  static thread_local AlignedScratch shared_scratch;
  float* logits = shared_scratch.get(static_cast<size_t>(M * E));
  auto compute = [&](int64_t p0, int64_t p1) {
    static thread_local AlignedScratch hidden_scratch;
    const int64_t block = std::min<int64_t>(M, kMaxBlockTokens);
    float* converted =
        bf16 ? hidden_scratch.get(static_cast<size_t>(block * Ops::kChunkH)) : nullptr;
    const int64_t e_begin = p0 * Ops::kTileN, e_end = std::min(E, p1 * Ops::kTileN);
    for (int64_t b0 = 0; b0 < M; b0 += block)
      router_gemm(r, b0, std::min(block, M - b0), e_begin, e_end, logits + b0 * E, E, converted);
  };
  const bool route_in_parallel = threads > 1 && M >= kRouterSplitParallelRouteTokens;
  if (threads <= 1) {
    compute(0, panels);
  } else {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      compute(panels * t / nt, panels * (t + 1) / nt);
      if (route_in_parallel) {  // the same for every thread, so all of them meet the barrier
#pragma omp barrier
        RowScratch sc;
        for (int64_t m = M * t / nt; m < M * (t + 1) / nt; ++m)
          emit_and_route(r, logits + m * E, m, sc);
      }
    }
  }
  if (route_in_parallel) return;
  RowScratch sc;
  for (int64_t m = 0; m < M; ++m) emit_and_route(r, logits + m * E, m, sc);
}

inline void router_topk_run(const RouterTopkArgs& r) {
  const int64_t M = r.route.M;
  const int max_threads = num_threads();
  // Too few tokens for one split unit per thread: split the experts instead (see the NOTE).
  if (M < static_cast<int64_t>(Ops::kSplitTokens) * max_threads || M < kRouterParallelMinTokens) {
    const int threads = router_split_threads(M, r.route.E, r.H, max_threads);
    if (threads > 1) return router_split_experts(r, threads);
    if (M < kRouterParallelMinTokens) return router_rows(r, 0, M);
  }
  // Split in units the ISA's best kernel can fill when there are enough tokens for them.
  const int64_t unit = M >= Ops::kSplitTokens * max_threads ? Ops::kSplitTokens : Ops::kTileM;
  const int64_t units = (M + unit - 1) / unit;
  const int threads =
      M >= kRouterParallelMinTokens ? static_cast<int>(std::min<int64_t>(max_threads, units)) : 1;
  if (threads <= 1) {
    router_rows(r, 0, M);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    // Whole units per thread, as evenly as possible.
    const int64_t m0 = std::min(M, units * t / nt * unit);
    const int64_t m1 = std::min(M, units * (t + 1) / nt * unit);
    router_rows(r, m0, m1);
  }
}
