// The fused NF4 GEMM (Backend::nf4_gemm_bf16), CPU reference: each weight's rows are dequantized
// to bf16 (nf4_dequantize) and multiplied as gemm_bf16 multiplies, so on the CPU the fused product
// equals the staged one (dequantize, then gemm_bf16) bit for bit. The CUDA kernel decodes inside
// the GEMM instead and sums in its own order.
#pragma once

#include <cstdint>

#include "cudablocks/backend.hpp"

namespace cudablocks::cpu {

// k % 64 == 0 and blocks of 64 (the CUDA kernel's condition, so both backends take the same path).
bool nf4_gemm_fused(std::int64_t k, int blocksize);

void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                   bool transposed, const float* addend, float* c, std::uint16_t* c16, bool add_c16);

}  // namespace cudablocks::cpu
