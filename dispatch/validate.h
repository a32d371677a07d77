// Argument checks shared by the C API entry points. Each check returns MOEKIT_OK or records a
// message "<function>: <argument>: <what is wrong>" and returns the error status.
#ifndef MOEKIT_DISPATCH_VALIDATE_H_
#define MOEKIT_DISPATCH_VALIDATE_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "dispatch/runtime.h"
#include "moekit/moekit.h"

namespace moekit {

// Largest element count a tensor may describe (2^48): keeps every byte offset in range.
constexpr int64_t kMaxElements = int64_t{1} << 48;

class Checker {
 public:
  explicit Checker(const char* function) : fn_(function) {}

  moekit_status fail(moekit_status s, const char* arg, const std::string& what) const {
    return set_error(s, std::string(fn_) + ": " + arg + ": " + what);
  }
  moekit_status invalid(const char* arg, const std::string& what) const {
    return fail(MOEKIT_ERR_INVALID_ARGUMENT, arg, what);
  }

  moekit_status not_null(const char* arg, const void* p) const {
    return p ? MOEKIT_OK : invalid(arg, "is NULL");
  }

  // A tensor of `ndim` dimensions with one of `dtypes`, non-negative sizes, a non-null data
  // pointer (unless it has no elements), a contiguous innermost dimension and outer strides
  // that keep rows from overlapping.
  moekit_status tensor(const char* arg, const moekit_tensor* t, int ndim,
                       std::initializer_list<moekit_dtype> dtypes) const;

  moekit_status dims(const char* arg, const moekit_tensor* t, std::initializer_list<int64_t> want) const;

  // An input the call only reads must not share memory with a tensor it writes: the kernel
  // would read values it has already overwritten. Either may be null (an optional argument left
  // out). Both must have passed tensor() first.
  moekit_status input_apart(const char* input_arg, const moekit_tensor* input,
                            const char* output_arg, const moekit_tensor* output) const;

  const char* function() const { return fn_; }

 private:
  const char* fn_;
};

std::string shape_string(const moekit_tensor* t);

// Stride of dimension d in elements (the contiguous stride when strides are all zero).
int64_t stride_of(const moekit_tensor* t, int d);

// True when the element ranges of a and b overlap in memory.
bool overlaps(const moekit_tensor* a, const moekit_tensor* b);

size_t dtype_size(moekit_dtype d);

}  // namespace moekit

#endif  // MOEKIT_DISPATCH_VALIDATE_H_
