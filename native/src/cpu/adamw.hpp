#pragma once

#include <cstdint>

#include "cudablocks/optimizer.hpp"

namespace cudablocks::cpu {

// One AdamW step over n elements in place (see cudablocks/optimizer.hpp for the math).
// grad_sum_squares: nullptr, or the squared global gradient norm (host pointer here) that
// drives clipping and the non-finite skip. param_bf16: nullptr, or n bf16 values that receive
// bf16(param) after the update.
void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                const AdamWHyper& hyper, const float* grad_sum_squares, std::uint16_t* param_bf16 = nullptr);

// *out (+)= sum of x[i]^2, accumulated in double.
void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate);

}  // namespace cudablocks::cpu
