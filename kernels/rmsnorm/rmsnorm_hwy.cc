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

// Sum of squares of `width` values: full(i) gives the vector at element i, tail(i, n) the
// n < Lanes values left at the end of the row.
template <class Full, class Tail>
HWY_INLINE double ChunkedSumOfSquares(int64_t width, const Full& full, const Tail& tail) {
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
      const VF v0 = full(i), v1 = full(i + lanes), v2 = full(i + 2 * lanes),
               v3 = full(i + 3 * lanes);
      a0 = hn::MulAdd(v0, v0, a0);
      a1 = hn::MulAdd(v1, v1, a1);
      a2 = hn::MulAdd(v2, v2, a2);
      a3 = hn::MulAdd(v3, v3, a3);
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

template <typename T>
double SumOfSquares(const void* row, int64_t width) {
  const DF df;
  const T* x = static_cast<const T*>(row);
  return ChunkedSumOfSquares(
      width, [&](int64_t i) { return LoadRow(df, x + i); },
      [&](int64_t i, int64_t n) { return LoadTail(df, x + i, n); });
}

// residual += x, stored in T; returns the sum of squares of the stored values.
template <typename T>
double AddResidual(void* x_row, void* residual_row, int64_t width) {
  const DF df;
  const T* x = static_cast<const T*>(x_row);
  T* res = static_cast<T*>(residual_row);
  return ChunkedSumOfSquares(
      width,
      [&](int64_t i) {
        const VF sum = hn::Add(LoadRow(df, res + i), LoadRow(df, x + i));
        StoreRow(df, sum, res + i);
        return Stored(df, sum, res);
      },
      [&](int64_t i, int64_t n) {
        const VF sum = hn::Add(LoadTail(df, res + i, n), LoadTail(df, x + i, n));
        StoreTail(df, sum, res + i, n);
        return Stored(df, sum, res);
      });
}

// y = (x * scale) * w. Each element is read before it is written, so y may be x.
template <typename TX, typename TW, typename TY>
void ScaleRow(const void* x_row, const void* w_row, void* y_row, int64_t width, float scale) {
  const DF df;
  const TX* x = static_cast<const TX*>(x_row);
  const TW* w = static_cast<const TW*>(w_row);
  TY* y = static_cast<TY*>(y_row);
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF s = hn::Set(df, scale);
  int64_t i = 0;
  for (; i + 2 * lanes <= width; i += 2 * lanes) {
    const VF v0 = hn::Mul(hn::Mul(LoadRow(df, x + i), s), LoadRow(df, w + i));
    const VF v1 = hn::Mul(hn::Mul(LoadRow(df, x + i + lanes), s), LoadRow(df, w + i + lanes));
    StoreRow(df, v0, y + i);
    StoreRow(df, v1, y + i + lanes);
  }
  for (; i + lanes <= width; i += lanes)
    StoreRow(df, hn::Mul(hn::Mul(LoadRow(df, x + i), s), LoadRow(df, w + i)), y + i);
  if (i < width) {
    const int64_t n = width - i;
    StoreTail(df, hn::Mul(hn::Mul(LoadTail(df, x + i, n), s), LoadTail(df, w + i, n)), y + i, n);
  }
}

using SumFn = double (*)(const void* row, int64_t width);
using AddResidualFn = double (*)(void* x_row, void* residual_row, int64_t width);
using ScaleFn = void (*)(const void* x, const void* w, void* y, int64_t width, float scale);

SumFn PickSum(moekit_dtype x) {
  return x == MOEKIT_BF16 ? SumOfSquares<bf16_bits> : SumOfSquares<float>;
}

template <typename TX, typename TW>
ScaleFn PickScaleY(moekit_dtype y) {
  return y == MOEKIT_BF16 ? ScaleRow<TX, TW, bf16_bits> : ScaleRow<TX, TW, float>;
}
template <typename TX>
ScaleFn PickScaleW(moekit_dtype w, moekit_dtype y) {
  return w == MOEKIT_BF16 ? PickScaleY<TX, bf16_bits>(y) : PickScaleY<TX, float>(y);
}
ScaleFn PickScale(moekit_dtype x, moekit_dtype w, moekit_dtype y) {
  return x == MOEKIT_BF16 ? PickScaleW<bf16_bits>(w, y) : PickScaleW<float>(w, y);
}

void Rmsnorm(const RmsnormArgs& a) {
  const SumFn sum_of_squares = PickSum(a.x_dtype);
  const ScaleFn scale_row = PickScale(a.x_dtype, a.w_dtype, a.y_dtype);
  shared::for_each_row_block(a.rows, a.width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const void* x = shared::row_at(a.x, a.x_dtype, a.x_stride, r);
      void* y = shared::row_at(a.y, a.y_dtype, a.y_stride, r);
      float scale;
      if (shared::trusted_scale(sum_of_squares(x, a.width), a.width, a.eps, &scale))
        scale_row(x, a.w, y, a.width, scale);
      else
        shared::reference_row(x, a.x_dtype, y, a.y_dtype, a.w, a.w_dtype, a.width, a.eps);
    }
  });
}

void FusedAddRmsnorm(const RmsnormArgs& a) {
  const AddResidualFn add_residual =
      a.x_dtype == MOEKIT_BF16 ? AddResidual<bf16_bits> : AddResidual<float>;
  const ScaleFn scale_row = PickScale(a.x_dtype, a.w_dtype, a.x_dtype);
  shared::for_each_row_block(a.rows, a.width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      void* x = shared::row_at(const_cast<void*>(a.x), a.x_dtype, a.x_stride, r);
      void* res = shared::row_at(a.residual, a.x_dtype, a.residual_stride, r);
      float scale;
      if (shared::trusted_scale(add_residual(x, res, a.width), a.width, a.eps, &scale))
        scale_row(res, a.w, x, a.width, scale);
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

  void Run(QkNormArgs::Mode mode, void* row, int64_t t, float eps) const {
    float scale;
    switch (mode) {
      case QkNormArgs::Mode::kFull:
        if (shared::trusted_scale(sum_of_squares(row, width), width, eps, &scale))
          scale_row(row, w, row, width, scale);
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
          scale_row(row, w, row, width, scale);
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
                 scales ? PickScale(a.q_dtype, a.q_w_dtype, a.q_dtype) : nullptr};
  const QkSide k{a.k_dtype,
                 a.k_width,
                 a.k_w,
                 a.k_w_dtype,
                 a.k_sumsq,
                 a.k_global_width,
                 PickSum(a.k_dtype),
                 scales ? PickScale(a.k_dtype, a.k_w_dtype, a.k_dtype) : nullptr};
  shared::for_each_row_block(a.tokens, a.q_width + a.k_width, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {  // q and k of a token together
      q.Run(a.mode, shared::row_at(a.q, a.q_dtype, a.q_stride, t), t, a.eps);
      k.Run(a.mode, shared::row_at(a.k, a.k_dtype, a.k_stride, t), t, a.eps);
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
