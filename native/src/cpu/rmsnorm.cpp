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

}  // namespace cudablocks::cpu
