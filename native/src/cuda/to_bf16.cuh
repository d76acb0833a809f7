#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// y[i] = bf16(x[i]) (round to nearest even; bit patterns in y) over n elements.
void to_bf16(const float* x, std::uint16_t* y, std::int64_t n, cudaStream_t stream);

}  // namespace cudablocks::cuda
