#include "cpu/rmsnorm.hpp"

#include <algorithm>
#include <cmath>

#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                     std::int64_t cols, float eps) {
  parallel_for(rows, [&](std::int64_t r) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    // The mean of squares in double: the reference should not be the noisy side of a comparison.
    double sum_squares = 0.0;
    for (std::int64_t c = 0; c < cols; ++c) sum_squares += static_cast<double>(xr[c]) * xr[c];
    const float s = static_cast<float>(1.0 / std::sqrt(sum_squares / static_cast<double>(cols) + eps));
    // Same order as transformers: normalise, then scale by the weight.
    for (std::int64_t c = 0; c < cols; ++c) yr[c] = w[c] * (xr[c] * s);
    if (rstd != nullptr) rstd[r] = s;
  }, /*grain=*/std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(cols, 1)));
}

void rmsnorm_forward_transposed(const float* x, const float* w, const float* rstd, float* y_t, std::int64_t rows,
                                std::int64_t cols) {
  // A task per column of y (a row of y^T): no two tasks write the same row.
  parallel_for(cols, [&](std::int64_t c) {
    for (std::int64_t r = 0; r < rows; ++r) y_t[c * rows + r] = w[c] * (x[r * cols + c] * rstd[r]);
  }, /*grain=*/std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(rows, 1)));
}

}  // namespace cudablocks::cpu

// Derivation, for one row with s = 1 / sqrt(mean(x^2) + eps) and y_c = w_c * x_c * s:
//   ds/dx_j = -s^3 * x_j / n
//   dL/dx_j = w_j * dy_j * s + sum_c (dy_c * w_c * x_c) * ds/dx_j
//           = s * (w_j * dy_j - x_j * s^2 * mean_c(w_c * dy_c * x_c))
namespace cudablocks::cpu {

void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, const float* residual,
                      float* dx, float* dw, std::int64_t rows, std::int64_t cols) {
  const std::int64_t row_grain = std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(cols, 1));
  // dx, one row at a time; the row's mean in double.
  parallel_for(rows, [&](std::int64_t r) {
    const float* dyr = dy + r * cols;
    const float* xr = x + r * cols;
    float* dxr = dx + r * cols;
    const double s = rstd[r];
    double dot = 0.0;
    for (std::int64_t c = 0; c < cols; ++c) dot += static_cast<double>(w[c]) * dyr[c] * xr[c];
    const double correction = s * s * dot / static_cast<double>(cols);
    for (std::int64_t c = 0; c < cols; ++c) {
      const float g = static_cast<float>(s * (static_cast<double>(w[c]) * dyr[c] - xr[c] * correction));
      dxr[c] = residual != nullptr ? residual[r * cols + c] + g : g;
    }
  }, row_grain);

  // dw[c] += sum_r dy[r, c] * x[r, c] * rstd[r] (none for a frozen norm: dw == nullptr).
  if (dw == nullptr) return;
  add_column_sums(rows, cols, [&](std::int64_t r, std::int64_t c) {
    return static_cast<double>(dy[r * cols + c]) * x[r * cols + c] * static_cast<double>(rstd[r]);
  }, dw);
}

}  // namespace cudablocks::cpu
