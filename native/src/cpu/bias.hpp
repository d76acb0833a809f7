// Bias of a linear layer (Qwen2's q/k/v projections), CPU reference.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// y[r, :] += bias for y [rows, cols].
void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols);

// dbias[c] += sum_r dy[r, c] (summed in double, rounded once).
void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols);

}  // namespace cudablocks::cpu
