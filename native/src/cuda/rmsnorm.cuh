#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// y[r, :] = x[r, :] * rstd[r] * w with rstd[r] = 1 / sqrt(mean(x[r, :]^2) + eps); rstd optional.
void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                     std::int64_t cols, float eps, cudaStream_t stream);
// The same with y in bf16 (bit patterns, rounded to nearest even): a bf16 GEMM operand.
void rmsnorm_forward_bf16(const float* x, const float* w, std::uint16_t* y, float* rstd, std::int64_t rows,
                          std::int64_t cols, float eps, cudaStream_t stream);
// y^T [cols, rows] = rmsnorm_forward's y from its rstd [rows], written transposed (the same bits).
void rmsnorm_forward_transposed(const float* x, const float* w, const float* rstd, float* y_t, std::int64_t rows,
                                std::int64_t cols, cudaStream_t stream);

// With s = rstd[r] and g = dy * w:  dx[r, :] = s * (g - x * s^2 * mean(g * x)), plus residual[r, :]
// when residual is given (it may be dx itself), and into dx16 (unless nullptr) rounded to bf16;
// dw[c] += sum_r dy[r, c] * x[r, c] * s (deterministic, no atomics), unless dw == nullptr (a frozen
// norm). Uses per-stream scratch (cuda/scratch.hpp) for the dw partial sums.
void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, const float* residual,
                      float* dx, std::uint16_t* dx16, float* dw, std::int64_t rows, std::int64_t cols,
                      cudaStream_t stream);

}  // namespace cudablocks::cuda
