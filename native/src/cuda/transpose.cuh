#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// y[j, i] = x[i, j] for x [rows, cols] whose rows are ld_x floats apart; y is [cols, rows], dense.
// ld_x >= cols; y must not overlap x.
void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y,
               cudaStream_t stream);

}  // namespace cudablocks::cuda
