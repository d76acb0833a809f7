#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cudablocks/optimizer.hpp"

namespace cudablocks::cuda {

// One AdamW step over n elements in place (cudablocks/optimizer.hpp). grad_sum_squares: nullptr,
// or a device float holding the squared global gradient norm (clipping and the non-finite skip).
// param_bf16: nullptr, or n bf16 values (8-byte aligned) that receive bf16(param) after the update
// (2 more bytes per element written).
void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                const AdamWHyper& hyper, const float* grad_sum_squares, std::uint16_t* param_bf16,
                cudaStream_t stream);

// *out (+)= sum of x[i]^2 (device float), summed in double, deterministically. x 16-byte aligned.
void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate, cudaStream_t stream);

}  // namespace cudablocks::cuda
