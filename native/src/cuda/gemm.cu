// GEMM through cuBLAS. FLOPs 2*M*N*K; bytes 4*(M*K + K*N + M*N) (+ M*N read when beta != 0):
// compute-bound at block sizes (M = tokens >= 512), so the whole job is picking cuBLAS's mode.
//
// Row-major -> column-major: a row-major X [r, c] is the column-major X^T [c, r] with leading
// dimension c. So row-major C = op(A) op(B) is computed as the column-major
// C^T [N, M] = op(B)^T [N, K] * op(A)^T [K, M]: B goes first, A second, and each keeps its own
// transpose flag (B row-major [K, N] is column-major B^T [N, K], already op(B)^T when !trans_b).
#include "cuda/gemm.cuh"

#include <climits>
#include <string>

#include "cuda/check.hpp"
#include "cuda/cublas.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

namespace {

cublasComputeType_t compute_type(Precision precision) {
  switch (precision) {
    case Precision::FP32: return CUBLAS_COMPUTE_32F;             // with CUBLAS_DEFAULT_MATH: IEEE fp32
    case Precision::TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;   // tf32 multiply, fp32 accumulate
    case Precision::BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;   // bf16 multiply, fp32 accumulate
  }
  throw InvalidArgumentError("gemm: unknown precision");
}

int as_int(std::int64_t v, const char* name) {
  if (v < 0 || v > INT_MAX) throw InvalidArgumentError(std::string("gemm: ") + name + " = " + std::to_string(v) + " is out of cuBLAS's int range");
  return static_cast<int>(v);
}

// C = beta * C for an empty K (C not read when beta == 0).
void scale_c(std::int64_t m, std::int64_t n, float beta, float* c, cudaStream_t stream) {
  if (beta == 0.0f) {
    CUDABLOCKS_CUDA_CHECK(cudaMemsetAsync(c, 0, sizeof(float) * static_cast<std::size_t>(m) * n, stream));
  } else if (beta != 1.0f) {
    CublasCall call(stream);
    CUDABLOCKS_CUBLAS_CHECK(cublasSscal_64(call.handle(), m * n, &beta, c, 1));
  }
}

// The shared cublasGemmEx call (see the top of this file for the row-major mapping).
void gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const void* a, const void* b,
             cudaDataType_t ab_type, float beta, void* c, cudaDataType_t c_type, cublasComputeType_t compute,
             cudaStream_t stream) {
  CublasCall call(stream);
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ld_b = trans_b ? K : N;  // row length of B as stored
  const int ld_a = trans_a ? M : K;  // row length of A as stored
  CUDABLOCKS_CUBLAS_CHECK(cublasGemmEx(call.handle(), op_b, op_a, N, M, K, &alpha, b, ab_type, ld_b, a, ab_type, ld_a,
                                       &beta, c, c_type, N, compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
               const std::uint16_t* a, const std::uint16_t* b, float beta, float* c, cudaStream_t stream) {
  const int M = as_int(m, "m"), N = as_int(n, "n"), K = as_int(k, "k");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    scale_c(m, n, beta, c, stream);
    return;
  }
  gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, CUDA_R_16BF, beta, c, CUDA_R_32F, CUBLAS_COMPUTE_32F, stream);
}

void gemm_bf16_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                       const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c, cudaStream_t stream) {
  const int M = as_int(m, "m"), N = as_int(n, "n"), K = as_int(k, "k");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    CUDABLOCKS_CUDA_CHECK(cudaMemsetAsync(c, 0, static_cast<std::size_t>(m * n) * sizeof(std::uint16_t), stream));
    return;
  }
  gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, CUDA_R_16BF, 0.0f, c, CUDA_R_16BF, CUBLAS_COMPUTE_32F, stream);
}

void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
          const float* b, float beta, float* c, Precision precision, cudaStream_t stream) {
  const int M = as_int(m, "m"), N = as_int(n, "n"), K = as_int(k, "k");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // op(A) op(B) is zero: C = beta * C (C not read when beta == 0)
    scale_c(m, n, beta, c, stream);
    return;
  }
  gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, CUDA_R_32F, beta, c, CUDA_R_32F, compute_type(precision), stream);
}

}  // namespace cudablocks::cuda
