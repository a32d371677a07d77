// RMSNorm family (rmsnorm, fused_add_rmsnorm, qk_norm and its tensor-parallel halves) written
// once with Highway and compiled for AVX3 (AVX-512), AVX2 and the portable baseline target
// (EMU128, or SCALAR where the compiler's EMU128 is blocklisted, e.g. GCC < 12.3). Each target
// gets its own entry points at the end of this file; the dispatch table lists them with their
// levels.
//
// NOTE: numerics, and why they match the double-precision reference.
// - Sums of squares: f32 FMAs into four vector accumulators, folded into f64 lanes every
//   kChunkElements elements, so an f32 partial sum covers at most 8 squares on AVX-512 (128 on
//   the one-lane target); the rest of the sum, horizontal included, is in f64.
// - The scale 1/sqrt(sumsq/width + eps) is computed in double and rounded once to f32; each
//   output is (x * scale) * w in f32 (the reference's order), rounded once to its dtype. bf16
//   stores round to nearest even with integer ops (Highway 1.0.3's DemoteTo truncates); NaN
//   is quieted as reference/numeric.h does.
// - A row whose f32 sum of squares cannot be trusted (an overflowed partial sum, NaN, or a mean
//   square so tiny that f32 squares went subnormal and eps does not hide it) is redone by the
//   reference, so huge, tiny, Inf and NaN rows agree with it bit for bit.
// - fused_add_rmsnorm stores residual + x in the residual's dtype first and normalizes the
//   stored (rounded) values, as the reference does.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef MOEKIT_KERNELS_RMSNORM_RMSNORM_HWY_SHARED_
#define MOEKIT_KERNELS_RMSNORM_RMSNORM_HWY_SHARED_

#include <hwy/cache_control.h>
#include <omp.h>

#include "dispatch/runtime.h"
#include "kernels/rmsnorm/rmsnorm_hwy.h"
#include "reference/numeric.h"
#include "reference/reference.h"

namespace moekit {
namespace rmsnorm_hwy {

// Below this many elements (rows * width) one thread does the whole call. Measured on a 2-core
// AVX-512 machine, hot data, best of 30: an OpenMP region costs about 1 us; 2 threads break
// even near 12K elements and are 1.4-1.75x faster from 32K (bf16 and f32, widths 1024-6144).
// A build may override it (-DMOEKIT_RMSNORM_PARALLEL_MIN_ELEMENTS=n) to measure the crossover.
#ifndef MOEKIT_RMSNORM_PARALLEL_MIN_ELEMENTS
#define MOEKIT_RMSNORM_PARALLEL_MIN_ELEMENTS (int64_t{1} << 15)
#endif
constexpr int64_t kParallelMinElements = MOEKIT_RMSNORM_PARALLEL_MIN_ELEMENTS;

// NOTE: tensors of at least kLargeTensorBytes per call are treated as memory-resident.
// - Out-of-place rmsnorm writes such an output with streaming (non-temporal) stores. A plain
//   store to a line that is not in cache first reads it (read for ownership), so y would cost
//   twice its bytes in memory traffic: out of place, a third of all traffic. Outputs this large
//   come from prefill-sized batches, whose consumer (a matmul over thousands of rows) is
//   compute-bound and loses little by not finding them in cache; small outputs (decode) stay
//   in cache for the memory-bound matmul that reads them next.
// - While a row of such an input is scaled (from cache), the next row's input is prefetched
//   into L2, so that memory stays busy through the compute-only second pass. On cached inputs
//   the prefetches would only take load slots.
// A build may override it (-DMOEKIT_RMSNORM_LARGE_TENSOR_BYTES=n; 0: always).
#ifndef MOEKIT_RMSNORM_LARGE_TENSOR_BYTES
#define MOEKIT_RMSNORM_LARGE_TENSOR_BYTES (int64_t{8} << 20)
#endif
constexpr int64_t kLargeTensorBytes = MOEKIT_RMSNORM_LARGE_TENSOR_BYTES;

inline bool is_large(int64_t rows, int64_t width, size_t elem_bytes) {
  return rows * width * static_cast<int64_t>(elem_bytes) >= kLargeTensorBytes;
}

// When sumsq/width + eps falls below this, subnormal f32 squares could matter: use the reference.
constexpr double kMinTrustedMeanSquare = 1e-30;

inline size_t elem_size(moekit_dtype d) { return d == MOEKIT_BF16 ? 2 : 4; }

inline const void* row_at(const void* base, moekit_dtype d, int64_t stride, int64_t r) {
  return static_cast<const char*>(base) + r * stride * static_cast<int64_t>(elem_size(d));
}
inline void* row_at(void* base, moekit_dtype d, int64_t stride, int64_t r) {
  return static_cast<char*>(base) + r * stride * static_cast<int64_t>(elem_size(d));
}

// Sets *scale to the f32 scale of a row and returns true when the fast path may use it.
inline bool trusted_scale(double sumsq, int64_t width, float eps, float* scale) {
  const double mean_plus_eps = sumsq / static_cast<double>(width) + static_cast<double>(eps);
  if (!(mean_plus_eps >= kMinTrustedMeanSquare) || !std::isfinite(mean_plus_eps)) return false;
  *scale = static_cast<float>(1.0 / std::sqrt(mean_plus_eps));
  return true;
}

// Whether a partial sum of squares (tensor-parallel split, no eps yet) may be used as is.
inline bool trusted_partial_sumsq(double sumsq, int64_t width) {
  return std::isfinite(sumsq) && sumsq >= kMinTrustedMeanSquare * static_cast<double>(width);
}

inline double exact_sum_of_squares(const void* row, moekit_dtype d, int64_t width) {
  double sum = 0.0;
  for (int64_t i = 0; i < width; ++i) {
    const double v = load_float(row, d == MOEKIT_BF16, i);
    sum += v * v;
  }
  return sum;
}

// The reference's rmsnorm of one row: y = x * inv_rms(x) * w (y may be x).
inline void reference_row(const void* x, moekit_dtype x_dtype, void* y, moekit_dtype y_dtype,
                          const void* w, moekit_dtype w_dtype, int64_t width, float eps) {
  RmsnormArgs one;
  one.rows = 1;
  one.width = width;
  one.x = x;
  one.x_dtype = x_dtype;
  one.y = y;
  one.y_dtype = y_dtype;
  one.w = w;
  one.w_dtype = w_dtype;
  one.eps = eps;
  ref_rmsnorm(one);
}

// The reference's qk_norm apply step on one row (in place) with a given sum of squares.
inline void reference_apply_row(void* row, moekit_dtype d, int64_t width, const void* w,
                                moekit_dtype w_dtype, float sumsq, int64_t global_width,
                                float eps) {
  QkNormArgs one;
  one.mode = QkNormArgs::Mode::kApply;
  one.tokens = 1;
  one.q = row;
  one.q_width = width;
  one.q_dtype = d;
  one.q_w = w;
  one.q_w_dtype = w_dtype;
  one.q_sumsq = &sumsq;
  one.q_global_width = global_width;
  // An empty k side: the reference touches none of its elements.
  one.k = row;
  one.k_width = 0;
  one.k_dtype = d;
  one.k_w = w;
  one.k_w_dtype = w_dtype;
  one.k_sumsq = &sumsq;
  one.k_global_width = 1;
  one.eps = eps;
  ref_qk_norm(one);
}

// Runs fn(first_row, end_row) over all rows: on the calling thread when the call is small,
// else in contiguous blocks on num_threads() OpenMP threads.
template <class Fn>
void for_each_row_block(int64_t rows, int64_t elements_per_row, const Fn& fn) {
  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), rows));
  if (threads <= 1 || rows * elements_per_row < kParallelMinElements) {
    fn(int64_t{0}, rows);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t begin = rows * t / n, end = rows * (t + 1) / n;
    if (begin < end) fn(begin, end);
  }
}

}  // namespace rmsnorm_hwy
}  // namespace moekit

#endif  // MOEKIT_KERNELS_RMSNORM_RMSNORM_HWY_SHARED_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/rmsnorm/rmsnorm_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace moekit {
namespace HWY_NAMESPACE {

// Only the targets the dispatch table lists are generated (the others would be dead code).
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_EMU128 || \
    HWY_TARGET == HWY_SCALAR

namespace hn = hwy::HWY_NAMESPACE;
namespace shared = ::moekit::rmsnorm_hwy;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;
using bf16_bits = uint16_t;  // bf16 storage: the upper half of an f32

constexpr int64_t kMaxLanes = 16;  // f32 lanes of the widest target (AVX-512)
// Sum-of-squares elements per f32 partial sum before it is folded into f64 lanes; a multiple
// of 4 vectors on every target.
constexpr int64_t kChunkElements = 512;

HWY_INLINE VF LoadRow(DF df, const float* p) { return hn::LoadU(df, p); }
HWY_INLINE VF LoadRow(DF df, const bf16_bits* p) {
  const hn::Rebind<uint16_t, DF> d16;
  const hn::Rebind<uint32_t, DF> d32;
  return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(d32, hn::LoadU(d16, p))));
}

// bf16 bits of v (in the low half of each u32 lane), rounded to nearest even; NaN quieted.
HWY_INLINE hn::Vec<hn::Rebind<uint32_t, DF>> Bf16Bits(DF df, VF v) {
  const hn::Rebind<uint32_t, DF> d32;
  const auto bits = hn::BitCast(d32, v);
  const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(d32, 1u));
  const auto rounded = hn::ShiftRight<16>(hn::Add(bits, hn::Add(hn::Set(d32, 0x7FFFu), lsb)));
  const auto quiet_nan = hn::ShiftRight<16>(hn::Or(bits, hn::Set(d32, 0x00400000u)));
  const auto is_nan = hn::RebindMask(d32, hn::IsNaN(v));
#if HWY_TARGET == HWY_SCALAR
  // Bitwise select: the compiler turns a one-lane IfThenElse into a select through memory.
  const auto nan_lanes = hn::VecFromMask(d32, is_nan);
  return hn::Or(hn::And(nan_lanes, quiet_nan), hn::AndNot(nan_lanes, rounded));
#else
  return hn::IfThenElse(is_nan, quiet_nan, rounded);
#endif
}

HWY_INLINE void StoreRow(DF df, VF v, float* p) { hn::StoreU(v, df, p); }
HWY_INLINE void StoreRow(DF df, VF v, bf16_bits* p) {
  const hn::Rebind<uint16_t, DF> d16;
  hn::StoreU(hn::TruncateTo(d16, Bf16Bits(df, v)), d16, p);
}

// The value a bf16 (or f32) store of v would hold, read back as f32.
HWY_INLINE VF Stored(DF /*df*/, VF v, float* /*type*/) { return v; }
HWY_INLINE VF Stored(DF df, VF v, bf16_bits* /*type*/) {
  return hn::BitCast(df, hn::ShiftLeft<16>(Bf16Bits(df, v)));
}

// The first n < Lanes(df) elements, through a zero-padded buffer (no access past the row).
template <typename T>
HWY_INLINE VF LoadTail(DF df, const T* p, int64_t n) {
  HWY_ALIGN T buf[kMaxLanes] = {};
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(T));
  return LoadRow(df, buf);
}
template <typename T>
HWY_INLINE void StoreTail(DF df, VF v, T* p, int64_t n) {
  HWY_ALIGN T buf[kMaxLanes];
  StoreRow(df, v, buf);
  std::memcpy(p, buf, static_cast<size_t>(n) * sizeof(T));
}

// NOTE: bf16 pairs. Where a row's tensors are all bf16, a u32 lane holds two neighbouring
// elements: the even one in its low half, the odd one in its high half. Shifting the lane left
// by 16, or clearing its low half, makes either an f32 with one integer op and no shuffle (the
// widening and narrowing conversions all need the one shuffle port); the two rounded results
// merge back the same way. Visiting even and
// odd elements in separate vectors regroups the f32 partial sums of squares, each still of at
// most kChunkElements / (4 * Lanes) squares (8 on AVX-512).
using DU = hn::RebindToUnsigned<DF>;
using VU = hn::Vec<DU>;

HWY_INLINE VU LoadPairs(DU du, const bf16_bits* p) {
  return hn::LoadU(du, reinterpret_cast<const uint32_t*>(p));
}
HWY_INLINE VF EvenOf(DF df, VU pairs) { return hn::BitCast(df, hn::ShiftLeft<16>(pairs)); }
HWY_INLINE VF OddOf(DF df, VU pairs) {
  const DU du;
  return hn::BitCast(df, hn::And(pairs, hn::Set(du, 0xFFFF0000u)));
}

// v's bits plus the round-to-nearest-even bias: the upper half is v rounded to bf16 (the lower
// half is garbage). NaN needs no case of its own in the pair paths: sums and products of bf16
// values give either the default NaN (e.g. infinity * 0) or a bf16 operand's NaN, quieted, so
// a NaN lane is quiet with a zero low half, and adding at most 0x8000 leaves its upper half,
// the quiet bf16 NaN that Bf16Bits would give, as it is.
HWY_INLINE VU RoundedHigh(DU du, VF v) {
  const VU bits = hn::BitCast(du, v);
  return hn::Add(bits,
                 hn::Add(hn::Set(du, 0x7FFFu), hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u))));
}
HWY_INLINE VU MergeRounded(DU du, VU even_rounded, VU odd_rounded) {
  return hn::Or(hn::And(odd_rounded, hn::Set(du, 0xFFFF0000u)), hn::ShiftRight<16>(even_rounded));
}
// The bf16 pairs of (even, odd), rounded to nearest even.
HWY_INLINE VU MergePairs(DF /*df*/, VF even, VF odd) {
  const DU du;
  return MergeRounded(du, RoundedHigh(du, even), RoundedHigh(du, odd));
}

// Sum of squares of `width` values: quad(i, v) sets v[0..3] to the 4 * Lanes values from
// element i on (in any order), full(i) gives the vector at element i, tail(i, n) the
// n < Lanes values left at the end of the row.
template <class Quad, class Full, class Tail>
HWY_INLINE double ChunkedSumOfSquares(int64_t width, const Quad& quad, const Full& full,
                                      const Tail& tail) {
  static_assert(HWY_MAX_BYTES <= kMaxLanes * sizeof(float), "widen kMaxLanes");
  const DF df;
#if HWY_TARGET == HWY_SCALAR
  const hn::Rebind<double, DF> dd;  // one lane
#else
  const hn::Half<DF> dh;
  const hn::Repartition<double, DF> dd;
#endif
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  auto total = hn::Zero(dd);
  int64_t i = 0;
  while (i < width) {
    const int64_t end = std::min(width, i + kChunkElements);
    VF a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
    for (; i + 4 * lanes <= end; i += 4 * lanes) {
      VF v[4];
      quad(i, v);
      a0 = hn::MulAdd(v[0], v[0], a0);
      a1 = hn::MulAdd(v[1], v[1], a1);
      a2 = hn::MulAdd(v[2], v[2], a2);
      a3 = hn::MulAdd(v[3], v[3], a3);
    }
    for (; i + lanes <= end; i += lanes) {
      const VF v = full(i);
      a0 = hn::MulAdd(v, v, a0);
    }
    if (i < end) {  // only at the end of the row: chunks are whole vectors
      const VF v = tail(i, end - i);
      a1 = hn::MulAdd(v, v, a1);
      i = end;
    }
    const VF sum = hn::Add(hn::Add(a0, a1), hn::Add(a2, a3));
#if HWY_TARGET == HWY_SCALAR
    total = hn::Add(total, hn::PromoteTo(dd, sum));
#else
    total = hn::Add(total, hn::PromoteTo(dd, hn::LowerHalf(dh, sum)));
    total = hn::Add(total, hn::PromoteTo(dd, hn::UpperHalf(dh, sum)));
#endif
  }
  return hn::GetLane(hn::SumOfLanes(dd, total));
}

// quad() of ChunkedSumOfSquares from full(): four consecutive vectors.
template <class Full>
HWY_INLINE auto QuadOf(const Full& full) {
  return [&full](int64_t i, VF* v) {
    const int64_t lanes = static_cast<int64_t>(hn::Lanes(DF()));
    for (int k = 0; k < 4; ++k) v[k] = full(i + k * lanes);
  };
}

template <typename T>
double SumOfSquares(const void* row, int64_t width) {
  const DF df;
  const T* x = static_cast<const T*>(row);
  const auto full = [&](int64_t i) { return LoadRow(df, x + i); };
  return ChunkedSumOfSquares(width, QuadOf(full), full,
                             [&](int64_t i, int64_t n) { return LoadTail(df, x + i, n); });
}

// bf16 rows as pairs (see the NOTE on bf16 pairs).
template <>
double SumOfSquares<bf16_bits>(const void* row, int64_t width) {
  const DF df;
  const DU du;
  const bf16_bits* x = static_cast<const bf16_bits*>(row);
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  return ChunkedSumOfSquares(
      width,
      [&](int64_t i, VF* v) {
        const VU p0 = LoadPairs(du, x + i), p1 = LoadPairs(du, x + i + 2 * lanes);
        v[0] = EvenOf(df, p0);
        v[1] = OddOf(df, p0);
        v[2] = EvenOf(df, p1);
        v[3] = OddOf(df, p1);
      },
      [&](int64_t i) { return LoadRow(df, x + i); },
      [&](int64_t i, int64_t n) { return LoadTail(df, x + i, n); });
}

// The one-vector (i) and tail (i, n) steps of AddResidual: residual += x over those elements,
// stored, and the stored values returned as f32.
template <typename T>
struct AddResidualStep {
  const T* x;
  T* res;
  HWY_INLINE VF operator()(int64_t i) const {
    const DF df;
    const VF sum = hn::Add(LoadRow(df, res + i), LoadRow(df, x + i));
    StoreRow(df, sum, res + i);
    return Stored(df, sum, res);
  }
  HWY_INLINE VF operator()(int64_t i, int64_t n) const {
    const DF df;
    const VF sum = hn::Add(LoadTail(df, res + i, n), LoadTail(df, x + i, n));
    StoreTail(df, sum, res + i, n);
    return Stored(df, sum, res);
  }
};

// residual += x, stored in T; returns the sum of squares of the stored values.
template <typename T>
double AddResidual(void* x_row, void* residual_row, int64_t width) {
  const AddResidualStep<T> step{static_cast<const T*>(x_row), static_cast<T*>(residual_row)};
  return ChunkedSumOfSquares(width, QuadOf(step), step, step);
}

// bf16 rows as pairs (see the NOTE on bf16 pairs; NaN as in RoundedHigh).
template <>
double AddResidual<bf16_bits>(void* x_row, void* residual_row, int64_t width) {
  const DF df;
  const DU du;
  const bf16_bits* x = static_cast<const bf16_bits*>(x_row);
  bf16_bits* res = static_cast<bf16_bits*>(residual_row);
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VU high = hn::Set(du, 0xFFFF0000u);
  // Adds 2 * Lanes elements from i on; the stored values, as f32, go to v[0] and v[1].
  const auto add_pairs = [&](int64_t i, VF* v) {
    const VU r = LoadPairs(du, res + i), a = LoadPairs(du, x + i);
    const VU even = RoundedHigh(du, hn::Add(EvenOf(df, r), EvenOf(df, a)));
    const VU odd = RoundedHigh(du, hn::Add(OddOf(df, r), OddOf(df, a)));
    hn::StoreU(MergeRounded(du, even, odd), du, reinterpret_cast<uint32_t*>(res + i));
    v[0] = hn::BitCast(df, hn::And(even, high));
    v[1] = hn::BitCast(df, hn::And(odd, high));
  };
  const AddResidualStep<bf16_bits> step{x, res};
  return ChunkedSumOfSquares(
      width,
      [&](int64_t i, VF* v) {
        add_pairs(i, v);
        add_pairs(i + 2 * lanes, v + 2);
      },
      step, step);
}

// Elements of a row starting at p before p + them is aligned for Stream (all of `width` when
// p is not even element-aligned).
template <typename T>
int64_t ElementsBeforeStreamAligned(const T* p, int64_t width) {
  const uintptr_t vector_bytes = hn::Lanes(DF()) * sizeof(float);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) return width;
  const uintptr_t misaligned = addr % vector_bytes;
  const int64_t head =
      misaligned == 0 ? 0 : static_cast<int64_t>((vector_bytes - misaligned) / sizeof(T));
  return std::min(head, width);
}

// Prefetches the bytes of `next` at the offset of the bytes of x one step of a loop reads
// (step_bytes), so that the next row's x arrives while this row is scaled from cache: the
// sum-of-squares pass then streams from cache instead of waiting on memory. Into L2 only
// (locality 2: prefetcht1): a wide f32 row, its weights and its output already fill L1.
// next may be null.
HWY_INLINE void PrefetchNext(const char* next, int64_t offset, int64_t step_bytes) {
  if (next == nullptr) return;
  for (int64_t b = 0; b < step_bytes; b += 64) __builtin_prefetch(next + offset + b, 0, 2);
}

// y = (x * scale) * w. Each element is read before it is written, so y may be x. next: the
// next row's x, to prefetch (or null). kStream: y is aligned for Stream, and whole vectors
// bypass the cache.
template <typename TX, typename TW, typename TY, bool kStream = false>
void ScaleRowBody(const TX* x, const TW* w, TY* y, int64_t width, float scale, const char* next) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF s = hn::Set(df, scale);
  const auto put = [&](VF v, TY* p) {
    if constexpr (kStream) {
      static_assert(sizeof(TY) == sizeof(float), "streams only f32 rows; bf16 streams as pairs");
      hn::Stream(v, df, p);
    } else {
      StoreRow(df, v, p);
    }
  };
  const int64_t step_bytes = 2 * lanes * static_cast<int64_t>(sizeof(TX));
  int64_t i = 0;
  for (; i + 2 * lanes <= width; i += 2 * lanes) {
    PrefetchNext(next, i * static_cast<int64_t>(sizeof(TX)), step_bytes);
    const VF v0 = hn::Mul(hn::Mul(LoadRow(df, x + i), s), LoadRow(df, w + i));
    const VF v1 = hn::Mul(hn::Mul(LoadRow(df, x + i + lanes), s), LoadRow(df, w + i + lanes));
    put(v0, y + i);
    put(v1, y + i + lanes);
  }
  for (; i + lanes <= width; i += lanes)
    put(hn::Mul(hn::Mul(LoadRow(df, x + i), s), LoadRow(df, w + i)), y + i);
  if (i < width) {
    const int64_t n = width - i;
    StoreTail(df, hn::Mul(hn::Mul(LoadTail(df, x + i, n), s), LoadTail(df, w + i, n)), y + i, n);
  }
}

template <typename TX, typename TW, typename TY, bool kStream>
void ScaleRow(const void* x_row, const void* w_row, void* y_row, int64_t width, float scale,
              const void* next_x) {
  const TX* x = static_cast<const TX*>(x_row);
  const TW* w = static_cast<const TW*>(w_row);
  TY* y = static_cast<TY*>(y_row);
  const char* next = static_cast<const char*>(next_x);
  if constexpr (kStream) {
    const int64_t head = ElementsBeforeStreamAligned(y, width);
    ScaleRowBody<TX, TW, TY>(x, w, y, head, scale, next);
    const int64_t skip = head * static_cast<int64_t>(sizeof(TX));
    ScaleRowBody<TX, TW, TY, true>(x + head, w + head, y + head, width - head, scale,
                                   next ? next + skip : nullptr);
  } else {
    ScaleRowBody<TX, TW, TY>(x, w, y, width, scale, next);
  }
}

// ScaleRow of all-bf16 rows as pairs (see the NOTE on bf16 pairs).
template <bool kStream>
void ScalePairsBody(const bf16_bits* x, const bf16_bits* w, bf16_bits* y, int64_t width,
                    float scale, const char* next) {
  const DF df;
  const DU du;
  const int64_t step = 2 * static_cast<int64_t>(hn::Lanes(df));
  const VF s = hn::Set(df, scale);
  int64_t i = 0;
  for (; i + step <= width; i += step) {
    PrefetchNext(next, 2 * i, 2 * step);
    const VU xp = LoadPairs(du, x + i), wp = LoadPairs(du, w + i);
    const VF even = hn::Mul(hn::Mul(EvenOf(df, xp), s), EvenOf(df, wp));
    const VF odd = hn::Mul(hn::Mul(OddOf(df, xp), s), OddOf(df, wp));
    const VU out = MergePairs(df, even, odd);
    uint32_t* dst = reinterpret_cast<uint32_t*>(y + i);
    if (kStream)
      hn::Stream(out, du, dst);
    else
      hn::StoreU(out, du, dst);
  }
  if (i < width) ScaleRowBody(x + i, w + i, y + i, width - i, scale, nullptr);
}

template <bool kStream>
void ScalePairs(const void* x_row, const void* w_row, void* y_row, int64_t width, float scale,
                const void* next_x) {
  const bf16_bits* x = static_cast<const bf16_bits*>(x_row);
  const bf16_bits* w = static_cast<const bf16_bits*>(w_row);
  bf16_bits* y = static_cast<bf16_bits*>(y_row);
  const char* next = static_cast<const char*>(next_x);
  if (kStream) {
    const int64_t head = ElementsBeforeStreamAligned(y, width);
    ScaleRowBody(x, w, y, head, scale, next);
    ScalePairsBody<true>(x + head, w + head, y + head, width - head, scale,
                         next ? next + 2 * head : nullptr);
  } else {
    ScalePairsBody<false>(x, w, y, width, scale, next);
  }
}

using SumFn = double (*)(const void* row, int64_t width);
using AddResidualFn = double (*)(void* x_row, void* residual_row, int64_t width);
// next_x: the row whose x the caller reads next (prefetched while this one is scaled), or null.
using ScaleFn = void (*)(const void* x, const void* w, void* y, int64_t width, float scale,
                         const void* next_x);

SumFn PickSum(moekit_dtype x) {
  return x == MOEKIT_BF16 ? SumOfSquares<bf16_bits> : SumOfSquares<float>;
}

template <typename TX, typename TW>
ScaleFn PickScaleY(moekit_dtype y, bool stream) {
  if (y == MOEKIT_BF16) return ScaleRow<TX, TW, bf16_bits, false>;
  return stream ? ScaleRow<TX, TW, float, true> : ScaleRow<TX, TW, float, false>;
}
template <typename TX>
ScaleFn PickScaleW(moekit_dtype w, moekit_dtype y, bool stream) {
  return w == MOEKIT_BF16 ? PickScaleY<TX, bf16_bits>(y, stream) : PickScaleY<TX, float>(y, stream);
}
// The row scaler for these dtypes. stream: y is not x and large (see kLargeTensorBytes); bf16
// rows stream only when all three tensors are bf16 (as pairs).
ScaleFn PickScale(moekit_dtype x, moekit_dtype w, moekit_dtype y, bool stream) {
  if (x == MOEKIT_BF16 && w == MOEKIT_BF16 && y == MOEKIT_BF16)
    return stream ? ScalePairs<true> : ScalePairs<false>;
  return x == MOEKIT_BF16 ? PickScaleW<bf16_bits>(w, y, stream) : PickScaleW<float>(w, y, stream);
}

void Rmsnorm(const RmsnormArgs& a) {
  const SumFn sum_of_squares = PickSum(a.x_dtype);
  const bool stream = a.y != a.x && shared::is_large(a.rows, a.width, shared::elem_size(a.y_dtype));
  const bool prefetch = shared::is_large(a.rows, a.width, shared::elem_size(a.x_dtype));
  const ScaleFn scale_row = PickScale(a.x_dtype, a.w_dtype, a.y_dtype, stream);
  shared::for_each_row_block(a.rows, a.width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const void* x = shared::row_at(a.x, a.x_dtype, a.x_stride, r);
      void* y = shared::row_at(a.y, a.y_dtype, a.y_stride, r);
      float scale;
      const void* next_x =
          prefetch && r + 1 < end ? shared::row_at(a.x, a.x_dtype, a.x_stride, r + 1) : nullptr;
      if (shared::trusted_scale(sum_of_squares(x, a.width), a.width, a.eps, &scale))
        scale_row(x, a.w, y, a.width, scale, next_x);
      else
        shared::reference_row(x, a.x_dtype, y, a.y_dtype, a.w, a.w_dtype, a.width, a.eps);
    }
    if (stream) hwy::FlushStream();  // order this thread's streaming stores before the join
  });
}

void FusedAddRmsnorm(const RmsnormArgs& a) {
  const AddResidualFn add_residual =
      a.x_dtype == MOEKIT_BF16 ? AddResidual<bf16_bits> : AddResidual<float>;
  const ScaleFn scale_row = PickScale(a.x_dtype, a.w_dtype, a.x_dtype, false);
  const bool prefetch = shared::is_large(a.rows, a.width, shared::elem_size(a.x_dtype));
  shared::for_each_row_block(a.rows, a.width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      void* x = shared::row_at(const_cast<void*>(a.x), a.x_dtype, a.x_stride, r);
      void* res = shared::row_at(a.residual, a.x_dtype, a.residual_stride, r);
      float scale;
      // The next row's residual: its x follows the same stream and is left to the hardware.
      const void* next_res = prefetch && r + 1 < end
                                 ? shared::row_at(a.residual, a.x_dtype, a.residual_stride, r + 1)
                                 : nullptr;
      if (shared::trusted_scale(add_residual(x, res, a.width), a.width, a.eps, &scale))
        scale_row(res, a.w, x, a.width, scale, next_res);
      else  // the residual is already stored: normalize it as the reference would
        shared::reference_row(res, a.x_dtype, x, a.x_dtype, a.w, a.w_dtype, a.width, a.eps);
    }
  });
}

// One side (q or k) of qk_norm for one token.
struct QkSide {
  moekit_dtype dtype;
  int64_t width;
  const void* w;
  moekit_dtype w_dtype;
  float* sumsq;
  int64_t global_width;
  SumFn sum_of_squares;
  ScaleFn scale_row;

  // next: the row the caller runs next (prefetched while this one is scaled), or null.
  void Run(QkNormArgs::Mode mode, void* row, int64_t t, float eps, const void* next) const {
    float scale;
    switch (mode) {
      case QkNormArgs::Mode::kFull:
        if (shared::trusted_scale(sum_of_squares(row, width), width, eps, &scale))
          scale_row(row, w, row, width, scale, next);
        else
          shared::reference_row(row, dtype, row, dtype, w, w_dtype, width, eps);
        break;
      case QkNormArgs::Mode::kPartialSumsq: {
        double ss = sum_of_squares(row, width);
        if (!shared::trusted_partial_sumsq(ss, width))
          ss = shared::exact_sum_of_squares(row, dtype, width);
        sumsq[t] = static_cast<float>(ss);
        break;
      }
      case QkNormArgs::Mode::kApply:
        if (shared::trusted_scale(sumsq[t], global_width, eps, &scale))
          scale_row(row, w, row, width, scale, next);
        else
          shared::reference_apply_row(row, dtype, width, w, w_dtype, sumsq[t], global_width, eps);
        break;
    }
  }
};

void QkNorm(const QkNormArgs& a) {
  const bool scales = a.mode != QkNormArgs::Mode::kPartialSumsq;
  const QkSide q{a.q_dtype,
                 a.q_width,
                 a.q_w,
                 a.q_w_dtype,
                 a.q_sumsq,
                 a.q_global_width,
                 PickSum(a.q_dtype),
                 scales ? PickScale(a.q_dtype, a.q_w_dtype, a.q_dtype, false) : nullptr};
  const QkSide k{a.k_dtype,
                 a.k_width,
                 a.k_w,
                 a.k_w_dtype,
                 a.k_sumsq,
                 a.k_global_width,
                 PickSum(a.k_dtype),
                 scales ? PickScale(a.k_dtype, a.k_w_dtype, a.k_dtype, false) : nullptr};
  const bool prefetch = shared::is_large(a.tokens, a.q_width, shared::elem_size(a.q_dtype)) ||
                        shared::is_large(a.tokens, a.k_width, shared::elem_size(a.k_dtype));
  shared::for_each_row_block(a.tokens, a.q_width + a.k_width, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {  // q and k of a token together
      const bool more = prefetch && t + 1 < end;
      q.Run(a.mode, shared::row_at(a.q, a.q_dtype, a.q_stride, t), t, a.eps,
            more ? shared::row_at(a.q, a.q_dtype, a.q_stride, t + 1) : nullptr);
      k.Run(a.mode, shared::row_at(a.k, a.k_dtype, a.k_stride, t), t, a.eps,
            more ? shared::row_at(a.k, a.k_dtype, a.k_stride, t + 1) : nullptr);
    }
  });
}

#endif  // HWY_TARGET in {AVX3, AVX2, EMU128, SCALAR}

}  // namespace HWY_NAMESPACE
}  // namespace moekit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE

#if HWY_ARCH_X86 && ((HWY_TARGETS & (HWY_AVX3 | HWY_AVX2)) != (HWY_AVX3 | HWY_AVX2) || \
                     (HWY_TARGETS & HWY_BASELINE_SCALAR) == 0)
#error "rmsnorm_hwy needs Highway's AVX3, AVX2 and baseline targets (build without -march flags)"
#endif

// The portable target: EMU128, or SCALAR where EMU128 is blocklisted.
#if HWY_BASELINE_SCALAR == HWY_EMU128
#define MOEKIT_RMSNORM_PORTABLE N_EMU128
#else
#define MOEKIT_RMSNORM_PORTABLE N_SCALAR
#endif

namespace moekit {

const char* rmsnorm_hwy_supports(const RmsnormArgs&) { return nullptr; }
const char* qk_norm_hwy_supports(const QkNormArgs&) { return nullptr; }

void rmsnorm_avx512_hwy(const RmsnormArgs& a) { N_AVX3::Rmsnorm(a); }
void rmsnorm_avx2_hwy(const RmsnormArgs& a) { N_AVX2::Rmsnorm(a); }
void rmsnorm_scalar_hwy(const RmsnormArgs& a) { MOEKIT_RMSNORM_PORTABLE::Rmsnorm(a); }

void fused_add_rmsnorm_avx512_hwy(const RmsnormArgs& a) { N_AVX3::FusedAddRmsnorm(a); }
void fused_add_rmsnorm_avx2_hwy(const RmsnormArgs& a) { N_AVX2::FusedAddRmsnorm(a); }
void fused_add_rmsnorm_scalar_hwy(const RmsnormArgs& a) {
  MOEKIT_RMSNORM_PORTABLE::FusedAddRmsnorm(a);
}

void qk_norm_avx512_hwy(const QkNormArgs& a) { N_AVX3::QkNorm(a); }
void qk_norm_avx2_hwy(const QkNormArgs& a) { N_AVX2::QkNorm(a); }
void qk_norm_scalar_hwy(const QkNormArgs& a) { MOEKIT_RMSNORM_PORTABLE::QkNorm(a); }

}  // namespace moekit

#endif  // HWY_ONCE
