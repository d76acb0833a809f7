// NF4 quantization in bitsandbytes' format (core/nf4_format.hpp): the reference implementation.
#pragma once

#include <cstdint>

#include "cudablocks/dtype.hpp"

namespace cudablocks::cpu {

// x: n elements of `dtype` (Float32, BFloat16 or Float16). packed [(n + 1) / 2]: element 2j in the
// high nibble of byte j, 2j + 1 in the low one (an odd n pads the last low nibble with the code of
// 0). absmax [ceil(n / blocksize)]: max |x| of each block of `blocksize` consecutive elements.
void nf4_quantize(const void* x, DType dtype, std::int64_t n, int blocksize, std::uint8_t* packed, float* absmax);

// out[i] = code[nibble i] * absmax[i / blocksize] in fp32, rounded once to out_dtype.
void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize, void* out,
                    DType out_dtype);

// *offset = the mean of absmax[0, n), summed in double in a fixed order, rounded once to float.
void nf4_absmax_mean(const float* absmax, std::int64_t n, float* offset);

// Double quantization: qabsmax[i] = the 8-bit code (under `code`, 256 sorted floats) of
// (absmax[i] - *offset) / absmax2[i / 256], absmax2 [ceil(n / 256)] = max |absmax - *offset| per block.
void nf4_double_quantize(const float* absmax, std::int64_t n, const float* offset, const float* code,
                         std::uint8_t* qabsmax, float* absmax2);

// absmax[i] = code[qabsmax[i]] * absmax2[i / 256] + *offset, each step rounded in fp32.
void nf4_double_dequantize(const std::uint8_t* qabsmax, const float* absmax2, const float* offset, const float* code,
                           std::int64_t n, float* absmax);

}  // namespace cudablocks::cpu
