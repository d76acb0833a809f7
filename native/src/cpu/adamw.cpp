#include "cpu/adamw.hpp"

#include <cmath>

#include "core/float_bits.hpp"
#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                const AdamWHyper& h, const float* grad_sum_squares, std::uint16_t* param_bf16) {
  float clip = 1.0f;
  if (grad_sum_squares != nullptr) {
    const float norm = std::sqrt(*grad_sum_squares);
    if (!std::isfinite(norm)) return;  // skip: nothing written
    clip = std::fmin(1.0f, h.max_grad_norm / (norm + 1e-6f));
  }
  // As torch's AdamW: the scalars in double, rounded once to fp32; then the same fp32 operation
  // order per element, so that results agree to rounding.
  const AdamWScalars k = adamw_scalars(h);
  parallel_for(n, [&](std::int64_t i) {
    const float g = grad[i] * clip;
    const float m = exp_avg[i] + k.one_minus_beta1 * (g - exp_avg[i]);  // torch: m.lerp_(g, 1 - beta1)
    const float v = exp_avg_sq[i] * h.beta2 + k.one_minus_beta2 * g * g;
    const float denom = std::sqrt(v) / k.bias2_sqrt + h.eps;
    param[i] = param[i] * k.decay + (k.minus_step_size * m) / denom;
    if (param_bf16 != nullptr) param_bf16[i] = float_to_bf16_bits(param[i]);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }, /*grain=*/1 << 16);
}

void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate) {
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  *out = static_cast<float>(accumulate ? *out + total : total);
}

}  // namespace cudablocks::cpu
