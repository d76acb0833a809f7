// The fused NF4 GEMM on the device: c = a W^T with W decoded from bitsandbytes' NF4 inside the
// kernel (see cpu/nf4_gemm.hpp for the op's semantics, the reference on the host).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cudablocks/backend.hpp"

namespace cudablocks::cuda {

// Whether the fused kernel runs on the current device for this shape: the library was built for
// sm_90a (wgmma), the device is compute capability 9.0, k a multiple of 64 and blocks of 64.
bool nf4_gemm_supported(std::int64_t k, int blocksize);

// c[m, n] (+)= a[m, k] W^T, or transposed c[m, k] (+)= a[m, n] W, as Backend::nf4_gemm_bf16
// describes; requires nf4_gemm_supported.
void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                   bool transposed, const float* addend, float* c, std::uint16_t* c16, bool add_c16,
                   cudaStream_t stream);

}  // namespace cudablocks::cuda
