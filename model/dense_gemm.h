// Dense f32 projections of the model (attention q/k/v/o and lm_head): Y = X W^T with W in the
// checkpoint's [N, K] row-major layout, through OpenBLAS sgemm or a oneDNN matmul.
#ifndef MOEKIT_MODEL_DENSE_GEMM_H_
#define MOEKIT_MODEL_DENSE_GEMM_H_

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

namespace moekit::m2 {

enum class GemmBackend { kOpenBlas, kOneDnn };

const char* gemm_backend_name(GemmBackend b);  // "openblas_sgemm", "onednn_matmul"

class DenseGemm {
 public:
  explicit DenseGemm(GemmBackend backend);
  ~DenseGemm();
  DenseGemm(const DenseGemm&) = delete;
  DenseGemm& operator=(const DenseGemm&) = delete;

  GemmBackend backend() const { return backend_; }

  // y[M, N] (row stride ldy) = x[M, K] (row stride ldx) . w[N, K]^T.
  void run(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, float* y,
           int64_t ldy);

  // Threads for the backend's own pool.
  static void set_threads(int n);

 private:
  struct OneDnnState;
  GemmBackend backend_;
  std::unique_ptr<OneDnnState> dnnl_;
};

}  // namespace moekit::m2

#endif  // MOEKIT_MODEL_DENSE_GEMM_H_
