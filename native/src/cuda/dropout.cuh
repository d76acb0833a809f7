#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// LoRA dropout over n elements (cpu/dropout.hpp; the mask of core/dropout_hash.hpp); out may alias x.
void dropout(const float* x, float* out, std::int64_t n, double p, std::uint64_t key, bool accumulate,
             cudaStream_t stream);

}  // namespace cudablocks::cuda
