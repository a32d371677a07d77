// The generic fused-MoE driver: alignment, operand conversion, chunking, threading and the
// deterministic top-k sum. The per-ISA work happens in the microkernels it is given; see the
// NOTE in moe_microkernel.h for the whole pipeline. Plain C++ (no ISA flags).
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/moe/moe_microkernel.h"
#include "reference/numeric.h"

namespace moekit {
namespace {

// A run of rows of one local expert (at most block_m rows): one gate_up work item per column tile.
struct Segment {
  int32_t start;  // first sorted row
  int32_t rows;
  int32_t expert;  // local expert; E + s for shared expert s (see ExpertList)
};

// The routed handle's E experts followed by the shared handle's S, as one list of local experts.
struct ExpertList {
  const moekit_experts& routed;
  const moekit_experts* shared;
  int64_t E;
  const moekit_experts& handle(int64_t e) const { return e < E ? routed : *shared; }
  int64_t index(int64_t e) const { return e < E ? e : e - E; }  // within its handle
  int64_t inter(int64_t e) const { return e < E ? routed.inter : shared->inter; }
};

int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

// Bump allocator over the workspace; carves the pieces listed in moe_workspace_size's NOTE in
// the same order and sizes.
class Carver {
 public:
  explicit Carver(unsigned char* base) : base_(base) {}
  template <class T>
  T* take(int64_t bytes) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += align64(bytes);
    return p;
  }

 private:
  unsigned char* base_;
  int64_t used_ = 0;
};

int64_t read_id(const void* ids, moekit_dtype dtype, int64_t index) {
  return dtype == MOEKIT_I64 ? static_cast<const int64_t*>(ids)[index]
                             : static_cast<const int32_t*>(ids)[index];
}

}  // namespace

moekit_workspace* thread_workspace(size_t bytes) {
  thread_local moekit_workspace scratch;
  if (scratch.bytes < bytes) {
    scratch.data.reset();  // before allocating the larger one: a lower peak
    scratch.bytes = 0;
    scratch.data = aligned_alloc_bytes(bytes);
    if (!scratch.data) return nullptr;
    scratch.bytes = bytes;
  }
  return &scratch;
}

const char* fused_moe_pipeline_supports(const MoeMicrokernel& uk, const FusedMoeArgs& a) {
  if (a.experts == nullptr) return "no experts";
  // A bf16 handle in the AMX layout holds the VNNI layout's bytes (moe_amx.h).
  const bool amx_as_vnni = a.experts->layout == MOEKIT_LAYOUT_AMX &&
                           uk.layout == MOEKIT_LAYOUT_VNNI && a.experts->dtype == MOEKIT_BF16;
  if (a.experts->layout != uk.layout && !amx_as_vnni) return "needs another packing layout";
  if (a.experts->dtype != uk.weight_dtype) return "needs another weight dtype";
  if ((a.hidden_dtype != MOEKIT_F32 && a.hidden_dtype != MOEKIT_BF16) ||
      (a.out_dtype != MOEKIT_F32 && a.out_dtype != MOEKIT_BF16))
    return "hidden and out must be f32 or bf16";
  if (a.shared != nullptr) {
    const moekit_experts& s = *a.shared;
    if (s.dtype != a.experts->dtype || s.layout != a.experts->layout)
      return "shared experts need the routed experts' dtype and layout";
    if (s.dtype == MOEKIT_FP8_E4M3 &&
        (s.block_n != a.experts->block_n || s.block_k != a.experts->block_k))
      return "shared experts need the routed experts' fp8 block sizes";
    if (s.hidden != a.experts->hidden) return "shared experts need the routed hidden size";
  }
  const int64_t shared_experts = a.shared ? a.shared->num_experts : 0;
  if (a.M > 0 && a.k + shared_experts > (int64_t{1} << 30) / a.M)
    return "too many rows for 32-bit row indices";
  return nullptr;
}

void fused_moe_pipeline(const MoeMicrokernel& uk, const FusedMoeArgs& a) {
  const moekit_experts& w = *a.experts;
  const int64_t M = a.M, k = a.k, H = w.hidden, I = w.inter, E = w.num_experts;
  const int threads = std::max(a.threads, 1);
  // Shared experts are S more local experts after the routed ones, with one row per token
  // (row weight shared_scale[m] or 1): their rows sort after every routed row, so the one-writer,
  // row-ordered accumulation below covers them unchanged.
  const int64_t S = a.shared ? a.shared->num_experts : 0, I_s = a.shared ? a.shared->inter : 0;
  const ExpertList experts{w, a.shared, E};
  const int64_t pairs = M * (k + S);  // rows: routed pairs and shared rows
  const size_t ws_bytes = moe_workspace_size(M, k, H, I, S, I_s, threads);
  // Through the API a.ws is always large enough (see FusedMoeArgs::ws).
  moekit_workspace* scratch =
      a.ws != nullptr && a.ws->bytes >= ws_bytes ? a.ws : thread_workspace(ws_bytes);
  Carver carve(scratch->data.get());
  int32_t* row_token = carve.take<int32_t>(pairs * 4);
  float* row_weight = carve.take<float>(pairs * 4);
  Segment* segments = carve.take<Segment>(pairs * 12);
  int32_t* chunk_first = carve.take<int32_t>((pairs + 1) * 4);  // first segment of each chunk
  const int64_t padded_h = vnni_padded_k(H), I_max = std::max(I, I_s);  // act rows hold either
  // Row strides of the sorted A rows and of the intermediate (moe_row_stride: no L1 aliasing).
  const int64_t ld_sorted = moe_row_stride(H, 2);
  const int64_t ld_act = moe_row_stride(I_max, uk.a_dtype == MOEKIT_BF16 ? 2 : 4);
  unsigned char* x_buffer = carve.take<unsigned char>(M * padded_h * 4);
  unsigned char* act = carve.take<unsigned char>(
      (std::min<int64_t>(pairs, kMoeChunkRows) + kMoePanelN) * moe_row_stride(I_max, 4) * 4);
  float* acc_buffer = carve.take<float>(M * H * 4);
  // Sorted A (uk.sorted_a): a chunk's rows of A in sorted order, with 2 panels of spare rows,
  // and the row indices 0, 1, ... that address them.
  const int64_t sorted_capacity = std::min<int64_t>(pairs, kMoeChunkRows) + 2 * kMoePanelN;
  uint16_t* sorted_x = carve.take<uint16_t>(sorted_capacity * ld_sorted * 2);
  int32_t* sorted_index = carve.take<int32_t>(sorted_capacity * 4);
  const size_t region = moe_tile_scratch_bytes(std::max({H, I, I_s}));
  unsigned char* thread_scratch = carve.take<unsigned char>(0);

  // 1. Align: stable counting sort of the pairs by local expert. The per-expert counters are
  // the only piece whose size depends on E; they live in a per-thread buffer grown once.
  thread_local std::vector<int32_t> counts;
  counts.assign(static_cast<size_t>(E + S) + 1, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = read_id(a.topk_ids, a.topk_ids_dtype, m * a.topk_ids_stride + j);
      if (a.expert_map) e = a.expert_map[e];
      if (e >= 0) ++counts[e + 1];
    }
  for (int64_t s = 0; s < S; ++s) counts[E + s + 1] = static_cast<int32_t>(M);
  for (int64_t e = 0; e < E + S; ++e) counts[e + 1] += counts[e];
  const int64_t rows = counts[E + S];
  int64_t num_segments = 0;
  for (int64_t e = 0; e < E + S; ++e) {
    const int64_t n = counts[e + 1] - counts[e];
    if (n == 0) continue;
    // Equal pieces of at most block_m rows balance better than block_m-sized ones plus a tail.
    const int64_t pieces = (n + uk.block_m - 1) / uk.block_m;
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t begin = n * p / pieces, end = n * (p + 1) / pieces;
      segments[num_segments++] = {static_cast<int32_t>(counts[e] + begin),
                                  static_cast<int32_t>(end - begin), static_cast<int32_t>(e)};
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = read_id(a.topk_ids, a.topk_ids_dtype, m * a.topk_ids_stride + j);
      if (a.expert_map) e = a.expert_map[e];
      if (e < 0) continue;
      const int32_t row = counts[e]++;
      row_token[row] = static_cast<int32_t>(m);
      row_weight[row] = a.topk_weights[m * a.topk_weights_stride + j];
    }
  for (int64_t s = 0; s < S; ++s) {
    const int32_t row0 = counts[E + s];
    for (int64_t m = 0; m < M; ++m) {
      row_token[row0 + m] = static_cast<int32_t>(m);
      row_weight[row0 + m] = a.shared_scale ? a.shared_scale[m] : 1.0f;
    }
  }
  // Segments [0, routed_segments) are routed, the rest shared.
  int64_t routed_segments = 0;
  while (routed_segments < num_segments && segments[routed_segments].expert < E) ++routed_segments;
  // Chunks of whole segments, at most kMoeChunkRows rows each (depends on shapes only).
  int64_t num_chunks = 0;
  for (int64_t s = 0, chunk_rows = kMoeChunkRows; s < num_segments; ++s) {
    if (chunk_rows + segments[s].rows > kMoeChunkRows) {
      chunk_first[num_chunks++] = static_cast<int32_t>(s);
      chunk_rows = 0;
    }
    chunk_rows += segments[s].rows;
  }
  chunk_first[num_chunks] = static_cast<int32_t>(num_segments);

  // 2. The A operand.
  const size_t a_size = uk.a_dtype == MOEKIT_BF16 ? 2 : 4;
  // sorted_a kernels (bf16 A, padded) copy bf16 hidden rows straight into sorted order; other
  // hidden dtypes are converted once into x_buffer first.
  const bool sorted = uk.sorted_a && uk.a_dtype == MOEKIT_BF16 && uk.pad_a;
  const bool convert_x = sorted ? a.hidden_dtype != MOEKIT_BF16
                                : a.hidden_dtype != uk.a_dtype || uk.pad_a;
  const void* x = convert_x ? static_cast<const void*>(x_buffer) : a.hidden;
  const int64_t ldx = convert_x ? padded_h : a.hidden_stride;
  if (sorted)
    for (int64_t i = 0; i < sorted_capacity; ++i) sorted_index[i] = static_cast<int32_t>(i);

  // Output accumulation: f32 output is accumulated in place, bf16 in the workspace.
  const bool out_f32 = a.out_dtype == MOEKIT_F32;
  float* acc = out_f32 ? static_cast<float*>(a.out) : acc_buffer;
  const int64_t ld_acc = out_f32 ? a.out_stride : H;
  // Column tiles of I per routed segment and of I_s per shared segment.
  const int64_t up_tiles = (I + uk.gate_up_n - 1) / uk.gate_up_n;
  const int64_t up_tiles_s = (I_s + uk.gate_up_n - 1) / uk.gate_up_n;
  // Down items: tiles of down_n columns, except the last quarter of H, cut into tiles of half
  // that width, so that the phase ends on short items. With equal items, threads waited about
  // a fifth of the M = 4096 down phase for the last ones (16-core AMX machine, scratch phase
  // timers); the narrow tail was 4-9% faster over the call. Depends on shapes only.
  const int64_t narrow_n = (uk.down_n / 2 + 15) / 16 * 16;
  const int64_t wide_end = std::min(H, (H * 3 / 4) / uk.down_n * uk.down_n);
  const int64_t wide_tiles = wide_end / uk.down_n;
  const int64_t down_tiles = wide_tiles + (H - wide_end + narrow_n - 1) / narrow_n;
  // sorted_a: chunk c's rows of A in sorted order, then zeroed spare rows, copied in pieces of
  // kCopyRows rows. Chunk c + 1's pieces are extra work items of chunk c's down phase (nothing
  // reads sorted_x then), which fill the time threads would otherwise wait for the last down
  // tiles and save the copy its own phase.
  constexpr int64_t kCopyRows = 64;
  const auto chunk_row_range = [&](int64_t c, int64_t* row0) {
    const Segment& begin = segments[chunk_first[c]];
    const Segment& last = segments[chunk_first[c + 1] - 1];
    *row0 = begin.start;
    return last.start + last.rows - begin.start;
  };
  const auto copy_pieces = [&](int64_t c) {
    int64_t row0;
    return (chunk_row_range(c, &row0) + 2 * kMoePanelN + kCopyRows - 1) / kCopyRows;
  };
  const auto copy_sorted = [&](int64_t c, int64_t piece) {
    int64_t row0;
    const int64_t chunk_rows = chunk_row_range(c, &row0);
    const auto* src = static_cast<const uint16_t*>(x);
    const int64_t end = std::min(chunk_rows + 2 * kMoePanelN, (piece + 1) * kCopyRows);
    for (int64_t r = piece * kCopyRows; r < end; ++r) {
      uint16_t* dst = sorted_x + r * ld_sorted;
      int64_t copied = 0;
      if (r < chunk_rows) {
        std::memcpy(dst, src + row_token[row0 + r] * ldx, static_cast<size_t>(H) * 2);
        copied = H;
      }
      std::fill(dst + copied, dst + padded_h, uint16_t{0});
    }
  };

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    unsigned char* my_scratch = thread_scratch + static_cast<size_t>(tid) * 3 * region;
    void* tile_scratch_1 = my_scratch;
    void* tile_scratch_3 = my_scratch + region;
    void* kernel_scratch = my_scratch + 2 * region;
    if (uk.thread_begin) uk.thread_begin();

    if (convert_x) {
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) {
        const void* src = static_cast<const char*>(a.hidden) +
                          m * a.hidden_stride * (a.hidden_dtype == MOEKIT_BF16 ? 2 : 4);
        const bool src_bf16 = a.hidden_dtype == MOEKIT_BF16;
        if (uk.a_dtype == MOEKIT_BF16) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(x_buffer) + m * padded_h;
          for (int64_t h = 0; h < H; ++h) dst[h] = f32_to_bf16(load_float(src, src_bf16, h));
          std::fill(dst + H, dst + padded_h, uint16_t{0});
        } else {
          float* dst = reinterpret_cast<float*>(x_buffer) + m * padded_h;
          for (int64_t h = 0; h < H; ++h) dst[h] = load_float(src, src_bf16, h);
          std::fill(dst + H, dst + padded_h, 0.0f);
        }
      }
    }

    for (int64_t c = 0; c < num_chunks; ++c) {
      const Segment* first = segments + chunk_first[c];
      const int64_t chunk_segments = chunk_first[c + 1] - chunk_first[c];
      const int64_t row0 = first->start;

      if (sorted && c == 0) {  // later chunks are copied during the previous chunk's down
#pragma omp for schedule(static)
        for (int64_t piece = 0; piece < copy_pieces(0); ++piece) copy_sorted(0, piece);
      }

      // 3a. gate_up: (segment, column tile of its inter) items, tiles of one segment adjacent;
      // the chunk's routed segments (up_tiles items each) come before its shared ones.
      const int64_t chunk_routed =
          std::clamp<int64_t>(routed_segments - chunk_first[c], 0, chunk_segments);
      const int64_t routed_items = chunk_routed * up_tiles;
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < routed_items + (chunk_segments - chunk_routed) * up_tiles_s;
           ++item) {
        const bool routed_item = item < routed_items;
        const int64_t tiles = routed_item ? up_tiles : up_tiles_s;
        const int64_t local = routed_item ? item : item - routed_items;
        const Segment& s = first[(routed_item ? 0 : chunk_routed) + local / tiles];
        const moekit_experts& handle = experts.handle(s.expert);
        const int64_t e = experts.index(s.expert), inter = experts.inter(s.expert);
        const int64_t n0 = (local % tiles) * uk.gate_up_n, n = std::min(uk.gate_up_n, inter - n0);
        MoeGateUpCall call;
        if (sorted) {
          call.a = sorted_x;
          call.lda = ld_sorted;
          call.a_rows = sorted_index + (s.start - row0);
          call.a_consecutive = true;
        } else {
          call.a = x;
          call.lda = ldx;
          call.a_rows = row_token + s.start;
        }
        call.m = s.rows;
        call.K = H;
        call.w1 = uk.weight_tile(handle, e, ExpertMatrix::kW1, n0, n, tile_scratch_1);
        call.w3 = uk.weight_tile(handle, e, ExpertMatrix::kW3, n0, n, tile_scratch_3);
        call.n = n;
        unsigned char* act_rows = act + (s.start - row0) * ld_act * a_size;
        call.act = act_rows + n0 * a_size;
        call.ld_act = ld_act;
        call.scratch = kernel_scratch;
        call.scratch_bytes = region;
        uk.gate_up(call);
        if (uk.pad_a && n0 + n == inter)  // zero the K padding the down kernel may read
          for (int64_t r = 0; r < s.rows; ++r)
            std::memset(act_rows + (r * ld_act + inter) * a_size, 0,
                        (vnni_padded_k(inter) - inter) * a_size);
      }

      // 3b. down: column tiles of H; each walks the chunk's segments in row order. Then the
      // next chunk's copy pieces.
      const int64_t next_copy = sorted && c + 1 < num_chunks ? copy_pieces(c + 1) : 0;
#pragma omp for schedule(dynamic, 1)
      for (int64_t tile = 0; tile < down_tiles + next_copy; ++tile) {
        if (tile >= down_tiles) {
          copy_sorted(c + 1, tile - down_tiles);
          continue;
        }
        const int64_t n0 = tile < wide_tiles ? tile * uk.down_n
                                             : wide_end + (tile - wide_tiles) * narrow_n;
        const int64_t n = std::min(tile < wide_tiles ? uk.down_n : narrow_n, H - n0);
        if (c == 0)
          for (int64_t m = 0; m < M; ++m)
            std::fill(acc + m * ld_acc + n0, acc + m * ld_acc + n0 + n, 0.0f);
        const void* w2 = nullptr;
        const void* w2_next = nullptr;
        int64_t w2_expert = -1;
        for (int64_t si = 0; si < chunk_segments; ++si) {
          const Segment& s = first[si];
          if (s.expert != w2_expert) {  // consecutive segments of an expert share the tile
            w2 = uk.weight_tile(experts.handle(s.expert), experts.index(s.expert),
                                ExpertMatrix::kW2, n0, n, tile_scratch_1);
            w2_expert = s.expert;
            // The next expert's tile, which a kernel may pull toward the cache meanwhile.
            w2_next = nullptr;
            if (uk.weight_tile_in_place) {
              int64_t sn = si + 1;
              while (sn < chunk_segments && first[sn].expert == s.expert) ++sn;
              if (sn < chunk_segments)
                w2_next = uk.weight_tile(experts.handle(first[sn].expert),
                                         experts.index(first[sn].expert), ExpertMatrix::kW2, n0,
                                         n, nullptr);
            }
          }
          MoeDownCall call;
          call.act = act + (s.start - row0) * ld_act * a_size;
          call.ld_act = ld_act;
          call.m = s.rows;
          call.K = experts.inter(s.expert);
          call.w2 = w2;
          call.n = n;
          call.row_weight = row_weight + s.start;
          call.out = acc + n0;
          call.ld_out = ld_acc;
          call.out_rows = row_token + s.start;
          call.w2_next = w2_next;
          call.scratch = kernel_scratch;
          call.scratch_bytes = region;
          uk.down(call);
        }
        if (c == num_chunks - 1 && !out_f32)
          for (int64_t m = 0; m < M; ++m) {
            uint16_t* dst = static_cast<uint16_t*>(a.out) + m * a.out_stride;
            for (int64_t h = n0; h < n0 + n; ++h) dst[h] = f32_to_bf16(acc[m * ld_acc + h]);
          }
      }
    }

    if (num_chunks == 0) {  // nothing routed to this rank: the sum is zero
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t h = 0; h < H; ++h)
          store_float(static_cast<char*>(a.out) + m * a.out_stride * (out_f32 ? 4 : 2), !out_f32, h,
                      0.0f);
    }
    if (uk.thread_end) uk.thread_end();
  }
  (void)rows;
}

}  // namespace moekit
