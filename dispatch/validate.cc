// Shared argument checks for the C API.
#include "dispatch/validate.h"

#include <algorithm>

namespace moekit {

size_t dtype_size(moekit_dtype d) {
  switch (d) {
    case MOEKIT_F32: return 4;
    case MOEKIT_BF16: return 2;
    case MOEKIT_FP8_E4M3: return 1;
    case MOEKIT_I32: return 4;
    case MOEKIT_I64: return 8;
    default: break;  // not a value of the enum
  }
  return 0;
}

std::string shape_string(const moekit_tensor* t) {
  std::string s = "[";
  for (int d = 0; d < t->ndim && d < MOEKIT_MAX_DIMS; ++d) {
    if (d) s += ", ";
    s += std::to_string(t->shape[d]);
  }
  return s + "]";
}

int64_t stride_of(const moekit_tensor* t, int d) {
  bool all_zero = true;
  for (int i = 0; i < t->ndim; ++i) all_zero = all_zero && t->strides[i] == 0;
  if (!all_zero) return t->strides[d];
  int64_t s = 1;
  for (int i = t->ndim - 1; i > d; --i) s *= t->shape[i];
  return s;
}

static void byte_range(const moekit_tensor* t, uintptr_t* lo, uintptr_t* hi) {
  int64_t last = 0;
  bool empty = false;
  for (int d = 0; d < t->ndim; ++d) {
    if (t->shape[d] == 0) empty = true;
    last += (t->shape[d] - 1) * stride_of(t, d);
  }
  *lo = reinterpret_cast<uintptr_t>(t->data);
  *hi = empty ? *lo : *lo + static_cast<uintptr_t>(last + 1) * dtype_size(t->dtype);
}

bool overlaps(const moekit_tensor* a, const moekit_tensor* b) {
  uintptr_t alo, ahi, blo, bhi;
  byte_range(a, &alo, &ahi);
  byte_range(b, &blo, &bhi);
  if (alo == ahi || blo == bhi) return false;  // an empty tensor touches no memory
  return alo < bhi && blo < ahi;
}

moekit_status Checker::tensor(const char* arg, const moekit_tensor* t, int ndim,
                              std::initializer_list<moekit_dtype> dtypes) const {
  if (t == nullptr) return invalid(arg, "is NULL");
  if (t->ndim != ndim)
    return invalid(arg, "expected " + std::to_string(ndim) + " dimensions, got " +
                            std::to_string(t->ndim));
  if (std::find(dtypes.begin(), dtypes.end(), t->dtype) == dtypes.end()) {
    std::string allowed;
    for (moekit_dtype d : dtypes) allowed += std::string(allowed.empty() ? "" : " or ") + moekit_dtype_name(d);
    return fail(dtype_size(t->dtype) == 0 ? MOEKIT_ERR_INVALID_ARGUMENT : MOEKIT_ERR_UNSUPPORTED, arg,
                std::string("dtype ") + moekit_dtype_name(t->dtype) + " is not supported here (expected " +
                    allowed + ")");
  }
  int64_t elements = 1;
  for (int d = 0; d < ndim; ++d) {
    if (t->shape[d] < 0)
      return invalid(arg, "negative size " + std::to_string(t->shape[d]) + " in dimension " +
                              std::to_string(d));
    if (t->shape[d] > kMaxElements || (t->shape[d] > 0 && elements > kMaxElements / t->shape[d]))
      return invalid(arg, "shape " + shape_string(t) + " is too large");
    elements *= t->shape[d];
  }
  if (elements > 0 && t->data == nullptr) return invalid(arg, "data is NULL");
  if (ndim > 0 && t->shape[ndim - 1] > 1 && stride_of(t, ndim - 1) != 1)
    return fail(MOEKIT_ERR_UNSUPPORTED, arg,
                "innermost stride must be 1, got " + std::to_string(stride_of(t, ndim - 1)));
  // The last element must stay within kMaxElements of the first, so that no offset computed
  // from these strides can overflow (shape [2^20, 4] with row stride 2^40 would otherwise pass).
  // Non-positive strides are left to the check below.
  int64_t span = 0;
  for (int d = 0; d < ndim; ++d) {
    const int64_t s = stride_of(t, d);
    if (t->shape[d] <= 1 || s < 1) continue;
    if (s > (kMaxElements - span) / (t->shape[d] - 1))
      return invalid(arg, "shape " + shape_string(t) + " with its strides spans more than 2^48 "
                          "elements (too large)");
    span += (t->shape[d] - 1) * s;
  }
  // Each outer stride must step over the whole extent of the dimensions inside it.
  for (int d = ndim - 2; d >= 0; --d) {
    int64_t inner_extent = 1;
    for (int i = d + 1; i < ndim; ++i)
      inner_extent += (t->shape[i] - 1) * (i == ndim - 1 ? 1 : stride_of(t, i));
    if (t->shape[d] > 1 && stride_of(t, d) < inner_extent)
      return invalid(arg, "stride " + std::to_string(stride_of(t, d)) + " of dimension " +
                              std::to_string(d) + " is smaller than the rows it steps over (" +
                              std::to_string(inner_extent) + ")");
    if (stride_of(t, d) > kMaxElements) return invalid(arg, "stride is too large");
  }
  return MOEKIT_OK;
}

moekit_status Checker::dims(const char* arg, const moekit_tensor* t,
                            std::initializer_list<int64_t> want) const {
  int d = 0;
  for (int64_t w : want) {
    if (w >= 0 && t->shape[d] != w) {
      std::string expected = "[";
      int i = 0;
      for (int64_t x : want) expected += (i++ ? ", " : "") + (x >= 0 ? std::to_string(x) : std::string("*"));
      return invalid(arg, "shape " + shape_string(t) + " does not match the expected " + expected + "]");
    }
    ++d;
  }
  return MOEKIT_OK;
}

moekit_status Checker::input_apart(const char* input_arg, const moekit_tensor* input,
                                   const char* output_arg, const moekit_tensor* output) const {
  if (input == nullptr || output == nullptr || !overlaps(input, output)) return MOEKIT_OK;
  return invalid(input_arg,
                 std::string("overlaps ") + output_arg + ", which the call writes, in memory");
}

}  // namespace moekit
