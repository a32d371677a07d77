// Reference RMSNorm family. Sums of squares and the scaling are done in double; each output
// is rounded once to its dtype.
#include <cmath>
#include <vector>

#include "reference/numeric.h"
#include "reference/reference.h"

namespace moekit {
namespace {

bool is_bf16(moekit_dtype d) { return d == MOEKIT_BF16; }

double sum_of_squares(const void* row, moekit_dtype dtype, int64_t width) {
  double sum = 0.0;
  for (int64_t i = 0; i < width; ++i) {
    const double v = load_float(row, is_bf16(dtype), i);
    sum += v * v;
  }
  return sum;
}

// out[i] = in[i] * inv_rms * w[i]. `in` is read fully before `out` is written, so they may alias.
void scale_row(const void* in, moekit_dtype in_dtype, void* out, moekit_dtype out_dtype,
               const void* w, moekit_dtype w_dtype, int64_t width, double inv_rms) {
  std::vector<double> values(width);
  for (int64_t i = 0; i < width; ++i) values[i] = load_float(in, is_bf16(in_dtype), i);
  for (int64_t i = 0; i < width; ++i) {
    const double wi = load_float(w, is_bf16(w_dtype), i);
    store_float(out, is_bf16(out_dtype), i, static_cast<float>(values[i] * inv_rms * wi));
  }
}

size_t elem_size(moekit_dtype d) { return d == MOEKIT_BF16 ? 2 : 4; }

const void* row_ptr(const void* base, moekit_dtype d, int64_t stride, int64_t r) {
  return static_cast<const char*>(base) + static_cast<size_t>(r * stride) * elem_size(d);
}
void* row_ptr(void* base, moekit_dtype d, int64_t stride, int64_t r) {
  return static_cast<char*>(base) + static_cast<size_t>(r * stride) * elem_size(d);
}

double inv_rms(double sumsq, int64_t width, float eps) {
  return 1.0 / std::sqrt(sumsq / static_cast<double>(width) + static_cast<double>(eps));
}

}  // namespace

void ref_rmsnorm(const RmsnormArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const void* x = row_ptr(a.x, a.x_dtype, a.x_stride, r);
    void* y = row_ptr(a.y, a.y_dtype, a.y_stride, r);
    const double scale = inv_rms(sum_of_squares(x, a.x_dtype, a.width), a.width, a.eps);
    scale_row(x, a.x_dtype, y, a.y_dtype, a.w, a.w_dtype, a.width, scale);
  }
}

void ref_fused_add_rmsnorm(const RmsnormArgs& a) {
  const bool bf16 = is_bf16(a.x_dtype);
  for (int64_t r = 0; r < a.rows; ++r) {
    void* x = row_ptr(const_cast<void*>(a.x), a.x_dtype, a.x_stride, r);
    void* res = row_ptr(a.residual, a.x_dtype, a.residual_stride, r);
    // The residual is stored in its dtype first; the norm reads the stored (rounded) values,
    // as engines do.
    for (int64_t i = 0; i < a.width; ++i) {
      const float sum = load_float(res, bf16, i) + load_float(x, bf16, i);
      store_float(res, bf16, i, sum);
    }
    const double scale = inv_rms(sum_of_squares(res, a.x_dtype, a.width), a.width, a.eps);
    scale_row(res, a.x_dtype, x, a.x_dtype, a.w, a.w_dtype, a.width, scale);
  }
}

void ref_qk_norm(const QkNormArgs& a) {
  for (int64_t t = 0; t < a.tokens; ++t) {
    void* q = row_ptr(a.q, a.q_dtype, a.q_stride, t);
    void* k = row_ptr(a.k, a.k_dtype, a.k_stride, t);
    const double q_ss = sum_of_squares(q, a.q_dtype, a.q_width);
    const double k_ss = sum_of_squares(k, a.k_dtype, a.k_width);
    switch (a.mode) {
      case QkNormArgs::Mode::kPartialSumsq:
        a.q_sumsq[t] = static_cast<float>(q_ss);
        a.k_sumsq[t] = static_cast<float>(k_ss);
        break;
      case QkNormArgs::Mode::kFull:
        scale_row(q, a.q_dtype, q, a.q_dtype, a.q_w, a.q_w_dtype, a.q_width,
                  inv_rms(q_ss, a.q_width, a.eps));
        scale_row(k, a.k_dtype, k, a.k_dtype, a.k_w, a.k_w_dtype, a.k_width,
                  inv_rms(k_ss, a.k_width, a.eps));
        break;
      case QkNormArgs::Mode::kApply:
        scale_row(q, a.q_dtype, q, a.q_dtype, a.q_w, a.q_w_dtype, a.q_width,
                  inv_rms(a.q_sumsq[t], a.q_global_width, a.eps));
        scale_row(k, a.k_dtype, k, a.k_dtype, a.k_w, a.k_w_dtype, a.k_width,
                  inv_rms(a.k_sumsq[t], a.k_global_width, a.eps));
        break;
    }
  }
}

}  // namespace moekit
