// GEMM, CPU reference.
//
// C[M, N] = alpha * op(A) op(B) + beta * C, row-major and contiguous, with op(A) = A [M, K] or
// A^T for A [K, M] (trans_a), op(B) = B [K, N] or B^T for B [N, K] (trans_b). With beta == 0,
// C is only written, never read (it may hold NaN). The Backend's Precision argument does not reach
// this function: the CPU always computes in fp32 (TF32 and BF16 requests give fp32 results).
//
// Accuracy: each K-block of KC (= 256) products is summed in fp32, the blocks are summed in
// double, and alpha/beta are applied in double; C is rounded to fp32 once.
//
// Speed: cache-blocked (BLIS-style packing of A and B panels, a register-blocked micro-kernel
// the compiler vectorises) and split over threads by tiles of C with cpu::parallel_for.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const float* a, const float* b, float beta, float* c);

}  // namespace cudablocks::cpu
