#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// out[r, c] = silu(gate_up[r, c]) * gate_up[r, cols + c], out [rows, cols].
// gate_up and out are fp32 (float) or bf16 (std::uint16_t bit patterns; stores round to nearest
// even): bf16-mode blocks keep gate_up in bf16 and feed out to a bf16 GEMM.
void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols, cudaStream_t stream);
void swiglu_forward(const std::uint16_t* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                    cudaStream_t stream);
void swiglu_forward(const std::uint16_t* gate_up, std::uint16_t* out, std::int64_t rows, std::int64_t cols,
                    cudaStream_t stream);
// out^T [cols, rows] = the fp32 swiglu_forward's out, written transposed (the same bits).
void swiglu_forward_transposed(const float* gate_up, float* out_t, std::int64_t rows, std::int64_t cols,
                               cudaStream_t stream);

// d_gate_up [rows, 2 * cols] from dout [rows, cols] and the forward's gate_up (types as above; dout
// bf16 with bf16 gate_up: bf16 mode's down product writes it so).
void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows,
                     std::int64_t cols, cudaStream_t stream);
void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, float* d_gate_up, std::int64_t rows,
                     std::int64_t cols, cudaStream_t stream);
void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, std::uint16_t* d_gate_up,
                     std::int64_t rows, std::int64_t cols, cudaStream_t stream);

}  // namespace cudablocks::cuda
