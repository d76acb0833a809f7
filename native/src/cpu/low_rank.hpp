// The LoRA term of a product added to the product's fp32 result, CPU reference.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// out[t, n] = c[t, n] + bias[n] + sum_{j < rank} u[t, j] * v(n, j), v(n, j) = v[n * v_row + j * v_col],
// for t < rows, n < cols. u [rows, rank] and v hold bf16 bit patterns; c and bias may be nullptr. Summed
// in fp32 in that order (the bias, then j ascending; a bf16 x bf16 product is exact in fp32, so each
// term rounds once). out: fp32 (may be c) or bf16 (rounded once to nearest even).
void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, float* out);
void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                  std::uint16_t* out);

}  // namespace cudablocks::cpu
