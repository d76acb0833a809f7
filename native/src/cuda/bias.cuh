#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// y[r, :] += bias for y [rows, cols].
void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols, cudaStream_t stream);

// dbias[c] += sum_r dy[r, c] (deterministic: fixed summation order, no atomics).
void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols, cudaStream_t stream);

// out[c] += sum_p partials[p * cols + c] for p in [0, parts), in a fixed order. The second stage
// of the two-stage column reductions of the backward ops (bias, RMSNorm dw, QK-norm dw).
void add_column_partials(const float* partials, int parts, std::int64_t cols, float* out, cudaStream_t stream);

}  // namespace cudablocks::cuda
