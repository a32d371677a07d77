#include "model/dense_gemm.h"

#include <cblas.h>
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

namespace moekit::m2 {

const char* gemm_backend_name(GemmBackend b) {
  return b == GemmBackend::kOneDnn ? "onednn_matmul" : "openblas_sgemm";
}

// One matmul primitive per (M, K, N, ldx, ldy): creating a primitive costs far more than a
// decode-step GEMM, and the model sees only a handful of shapes.
struct DenseGemm::OneDnnState {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>, dnnl::matmul> primitives;
};

DenseGemm::DenseGemm(GemmBackend backend) : backend_(backend) {
  if (backend_ == GemmBackend::kOneDnn) dnnl_ = std::make_unique<OneDnnState>();
}

DenseGemm::~DenseGemm() = default;

void DenseGemm::run(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N,
                    float* y, int64_t ldy) {
  if (M == 0 || N == 0) return;
  if (backend_ == GemmBackend::kOpenBlas) {
    if (M == 1) {  // decode: sgemm does not take its matrix-vector path for one row
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(N), static_cast<blasint>(K),
                  1.0f, w, static_cast<blasint>(K), x, 1, 0.0f, y, 1);
      return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(M),
                static_cast<blasint>(N), static_cast<blasint>(K), 1.0f, x,
                static_cast<blasint>(ldx), w, static_cast<blasint>(K), 0.0f, y,
                static_cast<blasint>(ldy));
    return;
  }
  using dnnl::memory;
  const memory::desc src_md({M, K}, memory::data_type::f32, {ldx, 1});
  const memory::desc wei_md({K, N}, memory::data_type::f32, {1, K});  // w^T without a copy
  const memory::desc dst_md({M, N}, memory::data_type::f32, {ldy, 1});
  const auto key = std::make_tuple(M, K, N, ldx, ldy);
  auto it = dnnl_->primitives.find(key);
  if (it == dnnl_->primitives.end()) {
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_md, dst_md),
                                          dnnl_->engine);
    it = dnnl_->primitives.emplace(key, dnnl::matmul(pd)).first;
  }
  memory src(src_md, dnnl_->engine, const_cast<float*>(x));
  memory wei(wei_md, dnnl_->engine, const_cast<float*>(w));
  memory dst(dst_md, dnnl_->engine, y);
  it->second.execute(dnnl_->stream,
                     {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  dnnl_->stream.wait();
}

void DenseGemm::set_threads(int n) {
  if (n < 1) return;
  openblas_set_num_threads(n);
  omp_set_num_threads(n);
}

}  // namespace moekit::m2
