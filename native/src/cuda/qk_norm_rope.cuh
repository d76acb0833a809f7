#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// Per-head RMSNorm (when w != nullptr) then rotary embedding of x [tokens, n_heads * head_dim]
// (see Backend::qk_norm_rope_forward). Rotate-half pairs (i, i + head_dim/2), angle
// positions[t] * inv_freq[i], computed in fp32 as transformers does:
//   inv_freq[i] = 1 / theta^(float(2i) / float(head_dim))   (fp32, correctly rounded pow and divide)
//   angle       = float(positions[t]) * inv_freq[i]           (one fp32 multiply)
//   cos, sin    = sincosf(angle)                               (accurate, not the fast intrinsics)
// head_dim: even, at most 512 (InvalidArgumentError otherwise). positions is a device pointer.
void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                          std::int64_t tokens, int n_heads, int head_dim, float eps, float theta, cudaStream_t stream);

// The backward: dx written; dw[i] += its gradient when w != nullptr (deterministic, per-stream
// scratch for the partial sums).
void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                           const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, float theta,
                           cudaStream_t stream);

}  // namespace cudablocks::cuda
