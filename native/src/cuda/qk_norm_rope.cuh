#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// Per-head RMSNorm (when w != nullptr) then rotary embedding of x [tokens, n_heads * head_dim]
// (see Backend::qk_norm_rope_forward). Rotate-half pairs (i, i + head_dim/2), angle computed in
// fp32 as transformers does:
//   angle    = float(positions[t]) * inv_freq[i]   (one fp32 multiply)
//   cos, sin = sincosf(angle)                      (accurate, not the fast intrinsics)
// inv_freq [head_dim/2]: TransformerConfig::rope_inv_freq(). head_dim: even, at most 512
// (InvalidArgumentError otherwise). positions and inv_freq are device pointers. x is fp32 or bf16
// (bit patterns), widened exactly.
void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                          std::int64_t tokens, int n_heads, int head_dim, float eps, const float* inv_freq,
                          cudaStream_t stream);
// bf16 x and y: y rounded to nearest even from the same fp32 result (bf16 mode's attention operands).
void qk_norm_rope_forward(const std::uint16_t* x, const float* w, std::uint16_t* y, float* rstd,
                          const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, float eps,
                          const float* inv_freq, cudaStream_t stream);

// The backward: dx written; dw[i] += its gradient when w != nullptr and dw != nullptr (a frozen
// norm passes dw = nullptr). Deterministic; per-stream scratch for the partial sums.
void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                           const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim,
                           const float* inv_freq, cudaStream_t stream);
void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd, float* dx,
                           float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim,
                           const float* inv_freq, cudaStream_t stream);
// bf16 x and dx: dx rounded to nearest even from the same fp32 result (bf16 mode, where it only
// feeds bf16 products).
void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd,
                           std::uint16_t* dx, float* dw, const std::int32_t* positions, std::int64_t tokens,
                           int n_heads, int head_dim, const float* inv_freq, cudaStream_t stream);

}  // namespace cudablocks::cuda
