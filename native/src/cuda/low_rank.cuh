#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// out[t, n] = c[t, n] + bias[n] + sum_{j < rank} u[t, j] * v[n * v_row + j * v_col] (u, v bf16;
// c and bias may be nullptr), summed in fp32 on tensor cores; out fp32 (may be c) or bf16. As
// cpu/low_rank.hpp up to the order of the sums.
void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, float* out,
                  cudaStream_t stream);
void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                  std::uint16_t* out, cudaStream_t stream);

}  // namespace cudablocks::cuda
