#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// y[i] = bf16(x[i]) (round to nearest even; bit patterns in y) over n elements.
void to_bf16(const float* x, std::uint16_t* y, std::int64_t n, cudaStream_t stream);
// y[i] = the bf16 value x[i] as fp32 (exact) over n elements.
void from_bf16(const std::uint16_t* x, float* y, std::int64_t n, cudaStream_t stream);

}  // namespace cudablocks::cuda
