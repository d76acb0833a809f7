// SwiGLU activation of the MLP, CPU reference.
//
// gate_up [rows, 2 * cols] holds the gate projection in columns [0, cols) and the up projection
// in [cols, 2 * cols) (one fused GEMM produces both):
//   out[r, c] = silu(g) * u,  silu(g) = g * sigmoid(g),  g = gate_up[r, c], u = gate_up[r, cols + c]
// Backward, given dout:
//   d_gate = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  d_up = dout * silu(g)
// Computed in double per element, rounded once.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols);
// out^T [cols, rows]: swiglu_forward's out written transposed (the same values).
void swiglu_forward_transposed(const float* gate_up, float* out_t, std::int64_t rows, std::int64_t cols);

// d_gate_up [rows, 2 * cols] is written (not accumulated).
void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows,
                     std::int64_t cols);

}  // namespace cudablocks::cpu
