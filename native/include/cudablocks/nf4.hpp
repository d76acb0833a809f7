// Buffer-level NF4 ops (bitsandbytes' 4-bit NF4 format, bit for bit): validate, then run on the
// buffers' backend. Sizes go by element count, so a packed weight may be [(n + 1) / 2] or
// bitsandbytes' [(n + 1) / 2, 1].
#pragma once

#include <cstdint>

#include "cudablocks/buffer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

// Whether bitsandbytes' 4-bit quantization accepts `blocksize` (32, 64, ..., 4096).
bool nf4_valid_blocksize(std::int64_t blocksize);

// x (float32, bfloat16 or float16, any shape, n elements) -> packed (uint8, (n + 1) / 2 elements)
// and absmax (float32, ceil(n / blocksize) elements).
void nf4_quantize(const Buffer& x, std::int64_t blocksize, Buffer& packed, Buffer& absmax, const Stream& stream);

// packed + absmax -> out (float32, bfloat16 or float16; its element count is n).
void nf4_dequantize(const Buffer& packed, const Buffer& absmax, std::int64_t blocksize, Buffer& out,
                    const Stream& stream);

// Double quantization of absmax (float32 [m]): offset (float32, 1 element) is the mean of absmax
// when compute_offset, else it is read; qabsmax (uint8 [m]) and absmax2 (float32 [ceil(m / 256)])
// receive the 8-bit codes under `code` (float32 [256], sorted) and the per-256 scales.
void nf4_double_quantize(const Buffer& absmax, const Buffer& code, Buffer& offset, bool compute_offset,
                         Buffer& qabsmax, Buffer& absmax2, const Stream& stream);

// The inverse: absmax (float32 [m]) = code[qabsmax] * absmax2[i / 256] + offset.
void nf4_double_dequantize(const Buffer& qabsmax, const Buffer& absmax2, const Buffer& offset, const Buffer& code,
                           Buffer& absmax, const Stream& stream);

}  // namespace cudablocks
