#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// y[r, :] = x[r, :] * rstd[r] * w with rstd[r] = 1 / sqrt(mean(x[r, :]^2) + eps); rstd optional.
void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                     std::int64_t cols, float eps);
// y^T [cols, rows]: rmsnorm_forward's y from its rstd, written transposed (the same values).
void rmsnorm_forward_transposed(const float* x, const float* w, const float* rstd, float* y_t, std::int64_t rows,
                                std::int64_t cols);

// The backward of rmsnorm_forward, with rstd saved by it. With s = rstd[r] and n = cols:
//   dx[r, :] = s * (w * dy[r, :] - x[r, :] * s^2 * mean(w * dy[r, :] * x[r, :]))
// plus residual[r, :] when residual is given (it may be dx itself); dw[c] += sum_r dy[r, c] * x[r, c] * s,
// unless dw == nullptr (a frozen norm).
void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, const float* residual,
                      float* dx, float* dw, std::int64_t rows, std::int64_t cols);

}  // namespace cudablocks::cpu
