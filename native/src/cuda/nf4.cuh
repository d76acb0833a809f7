// NF4 quantization in bitsandbytes' format (core/nf4_format.hpp) on the device; the semantics of
// each op are those of its CPU reference (cpu/nf4.hpp). Pointers are device pointers, including
// `offset` (one float) and `code` (the 256-entry 8-bit map).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cudablocks/dtype.hpp"

namespace cudablocks::cuda {

void nf4_quantize(const void* x, DType dtype, std::int64_t n, int blocksize, std::uint8_t* packed, float* absmax,
                  cudaStream_t stream);
void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize, void* out,
                    DType out_dtype, cudaStream_t stream);
void nf4_absmax_mean(const float* absmax, std::int64_t n, float* offset, cudaStream_t stream);
void nf4_double_quantize(const float* absmax, std::int64_t n, const float* offset, const float* code,
                         std::uint8_t* qabsmax, float* absmax2, cudaStream_t stream);
void nf4_double_dequantize(const std::uint8_t* qabsmax, const float* absmax2, const float* offset, const float* code,
                           std::int64_t n, float* absmax, cudaStream_t stream);

}  // namespace cudablocks::cuda
