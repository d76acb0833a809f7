#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// out[r, c] = silu(gate_up[r, c]) * gate_up[r, cols + c], out [rows, cols].
void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols, cudaStream_t stream);

// d_gate_up [rows, 2 * cols] from dout [rows, cols] and the forward's gate_up.
void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows,
                     std::int64_t cols, cudaStream_t stream);

// The same with bf16 outputs (bit patterns, round to nearest even): the operands of bf16 GEMMs.
void swiglu_forward_bf16(const float* gate_up, std::uint16_t* out, std::int64_t rows, std::int64_t cols,
                         cudaStream_t stream);
void swiglu_backward_bf16(const float* dout, const float* gate_up, std::uint16_t* d_gate_up, std::int64_t rows,
                          std::int64_t cols, cudaStream_t stream);

}  // namespace cudablocks::cuda
