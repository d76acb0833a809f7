// AdamW as torch.optim.AdamW computes it, with global-norm gradient clipping folded in.
//
// For each element, at step t (counting from 1), with g the gradient times the clip coefficient:
//   p  = p * (1 - lr * weight_decay)                       (decoupled weight decay)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Clipping (torch.nn.utils.clip_grad_norm_): with `norm` the L2 norm of every gradient that
// takes part, the coefficient is min(1, max_grad_norm / (norm + 1e-6)). The squared norm is
// summed on the device (sum_squares over each gradient buffer) and read by the AdamW kernel, so
// no host round trip and no extra pass over the gradients to scale them. A non-finite norm skips
// the step: parameters and moments are left untouched.
#pragma once

#include <cmath>
#include <cstdint>

namespace cudablocks {

struct AdamWHyper {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
  std::int64_t step = 1;
  // Clip to this global norm; infinity clips nothing (non-finite norms still skip the step).
  float max_grad_norm = INFINITY;
};

// The per-step scalars, computed in double as torch does and rounded once to fp32.
struct AdamWScalars {
  float one_minus_beta1, one_minus_beta2, bias2_sqrt, minus_step_size, decay;
};

inline AdamWScalars adamw_scalars(const AdamWHyper& h) {
  const double t = static_cast<double>(h.step);
  const double bias1 = 1.0 - std::pow(static_cast<double>(h.beta1), t);
  const double bias2 = 1.0 - std::pow(static_cast<double>(h.beta2), t);
  return {static_cast<float>(1.0 - h.beta1), static_cast<float>(1.0 - h.beta2),
          static_cast<float>(std::sqrt(bias2)), static_cast<float>(-(h.lr / bias1)),
          static_cast<float>(1.0 - static_cast<double>(h.lr) * h.weight_decay)};
}

// Throws InvalidArgumentError for lr < 0, betas outside [0, 1), eps <= 0, weight_decay < 0,
// step < 1, or max_grad_norm <= 0 — before anything runs.
void validate(const AdamWHyper& hyper);

}  // namespace cudablocks
