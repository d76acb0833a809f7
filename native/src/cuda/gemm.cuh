#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cudablocks/backend.hpp"

namespace cudablocks::cuda {

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C through cuBLAS (see Backend::gemm).
// FP32: IEEE fp32 (SIMT, no tensor cores); TF32: tf32 tensor cores; BF16: bf16 operands, fp32
// accumulation. All buffers fp32. With beta = 0, C is not read.
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
          const float* b, float beta, float* c, Precision precision, cudaStream_t stream);

// The same product on bf16 operands (bit patterns, the layouts of gemm): bf16 tensor cores, fp32
// accumulation (CUBLAS_COMPUTE_32F), fp32 C. Half the operand bytes of gemm and twice tf32's rate.
void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
               const std::uint16_t* a, const std::uint16_t* b, float beta, float* c, cudaStream_t stream);

// c = alpha op(A) op(B) + addend (addend [M, N], may be c itself): the product's epilogue adds the
// addend (cuBLASLt with a separate C when addend != c), so a residual costs no pass of its own.
void gemm_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
              const float* b, const float* addend, float* c, Precision precision, cudaStream_t stream);
void gemm_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                   const std::uint16_t* a, const std::uint16_t* b, const float* addend, float* c, cudaStream_t stream);

// The same, beta 0, with c written as bf16 (rounded from the fp32 accumulation).
void gemm_bf16_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                       const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c, cudaStream_t stream);
// c = alpha op(a) op(b) + c, all of c in bf16 (cuBLAS's epilogue with beta 1; it may round the
// product to bf16 before the sum).
void gemm_bf16_to_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                           const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c, cudaStream_t stream);

}  // namespace cudablocks::cuda
