#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// out = a + b over n elements; out may alias a or b.
void add(const float* a, const float* b, float* out, std::int64_t n, cudaStream_t stream);

}  // namespace cudablocks::cuda
