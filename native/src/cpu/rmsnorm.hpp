#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// y[r, :] = x[r, :] * rstd[r] * w with rstd[r] = 1 / sqrt(mean(x[r, :]^2) + eps); rstd optional.
void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                     std::int64_t cols, float eps);

}  // namespace cudablocks::cpu
