// Per-head RMSNorm (Qwen3's q_norm / k_norm, optional) followed by rotary position embedding,
// CPU reference. q or k is laid out [T, n_heads * d]; head h of token t is the d floats at
// t * n_heads * d + h * d.
//
// Forward, per (token t, head h), with x the head's d values:
//   h = w == nullptr ? x : w * (x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps)   (Qwen2/Llama: no norm)
//   rope, rotate-half (non-interleaved, as Hugging Face transformers), for i in [0, d/2):
//     y[i]       = h[i] * cos(a_i) - h[i + d/2] * sin(a_i)
//     y[i + d/2] = h[i + d/2] * cos(a_i) + h[i] * sin(a_i)
//     a_i = fp32(positions[t] * inv_freq[i]),  inv_freq [d/2] from TransformerConfig::rope_inv_freq()
// The angle is rounded to fp32 as transformers computes it (so the reference agrees with it, and
// with the CUDA backend, at long positions); cos, sin and the rotation are then computed in
// double. rstd [T * n_heads] is written when w != nullptr.
//
// Backward: RoPE is a rotation, so its backward rotates dy by -a_i; then, with w, the RMSNorm
// backward per head (as rmsnorm_backward, over d): dx = rstd * (w * dh - x * rstd^2 * mean(w * dh * x)),
// dw[i] += sum over tokens and heads of dh[i] * x[i] * rstd. dx is written; w == nullptr gives dx = rotated dy;
// dw == nullptr skips the weight gradient (a frozen norm).
// head_dim must be even.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                          std::int64_t tokens, int n_heads, int head_dim, float eps, const float* inv_freq);

void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                           float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads,
                           int head_dim, const float* inv_freq);

}  // namespace cudablocks::cpu
