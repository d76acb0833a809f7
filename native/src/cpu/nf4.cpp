#include "cpu/nf4.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/float_bits.hpp"
#include "core/nf4_format.hpp"
#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

namespace {

float load(const void* x, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::BFloat16: return bf16_bits_to_float(static_cast<const std::uint16_t*>(x)[i]);
    case DType::Float16: return static_cast<float>(reinterpret_cast<const _Float16*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

// 1/a as the CPU rounds it (correctly), with fast-math's flushes.
float reciprocal(float a) { return nf4::ftz(1.0f / nf4::ftz(a)); }

// max |x| over x[0, valid) from bitsandbytes' start value (nf4_format.hpp), with flushes.
template <typename Get>
float block_absmax(Get get, std::int64_t valid, std::int64_t blocksize) {
  float m = nf4::absmax_start(valid, blocksize);
  for (std::int64_t i = 0; i < valid; ++i) m = std::fmax(m, nf4::ftz(std::fabs(get(i))));
  return m;
}

}  // namespace

void nf4_quantize(const void* x, DType dtype, std::int64_t n, int blocksize, std::uint8_t* packed, float* absmax) {
  const std::int64_t blocks = (n + blocksize - 1) / blocksize;
  parallel_for(blocks, [&](std::int64_t b) {
    const std::int64_t first = b * blocksize;
    const std::int64_t valid = std::min<std::int64_t>(blocksize, n - first);
    const float m = block_absmax([&](std::int64_t i) { return load(x, dtype, first + i); }, valid, blocksize);
    absmax[b] = m;
    const float inv = reciprocal(m);
    // blocksize is even, so a block's elements fill whole bytes; the padding element is 0.
    for (std::int64_t i = 0; i < valid; i += 2) {
      const float hi = nf4::ftz(nf4::ftz(load(x, dtype, first + i)) * inv);
      const float lo = i + 1 < valid ? nf4::ftz(nf4::ftz(load(x, dtype, first + i + 1)) * inv) : 0.0f * inv;
      packed[(first + i) / 2] = static_cast<std::uint8_t>(nf4::nf4_encode(hi) << 4 | nf4::nf4_encode(lo));
    }
  }, /*grain=*/std::max(1, 16384 / blocksize));
}

void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize, void* out,
                    DType out_dtype) {
  constexpr std::int64_t chunk = 4096;
  parallel_for((n + chunk - 1) / chunk, [&](std::int64_t c) {
    const std::int64_t end = std::min(n, (c + 1) * chunk);
    for (std::int64_t i = c * chunk; i < end; ++i) {
      const unsigned byte = packed[i / 2];
      const unsigned q = (i & 1) ? (byte & 15u) : (byte >> 4);
      const float v = nf4::ftz(nf4::kCode[q] * nf4::ftz(absmax[i / blocksize]));
      switch (out_dtype) {
        case DType::BFloat16: static_cast<std::uint16_t*>(out)[i] = float_to_bf16_bits(v); break;
        case DType::Float16: static_cast<std::uint16_t*>(out)[i] = float_to_fp16_bits(v); break;
        default: static_cast<float*>(out)[i] = v; break;
      }
    }
  });
}

void nf4_absmax_mean(const float* absmax, std::int64_t n, float* offset) {
  // The order of the CUDA kernel: 1024 strided partial sums, then a halving tree.
  constexpr int lanes = 1024;
  double partial[lanes] = {};
  for (std::int64_t i = 0; i < n; ++i) partial[i % lanes] += static_cast<double>(absmax[i]);
  for (int width = lanes / 2; width > 0; width /= 2) {
    for (int t = 0; t < width; ++t) partial[t] += partial[t + width];
  }
  *offset = n > 0 ? static_cast<float>(partial[0] / static_cast<double>(n)) : 0.0f;
}

void nf4_double_quantize(const float* absmax, std::int64_t n, const float* offset, const float* code,
                         std::uint8_t* qabsmax, float* absmax2) {
  constexpr std::int64_t bs = nf4::kNestedBlocksize;
  const float off = *offset;
  parallel_for((n + bs - 1) / bs, [&](std::int64_t b) {
    const std::int64_t first = b * bs;
    const std::int64_t valid = std::min<std::int64_t>(bs, n - first);
    auto centred = [&](std::int64_t i) { return absmax[first + i] - off; };
    const float m = block_absmax(centred, valid, bs);
    absmax2[b] = m;
    const float inv = reciprocal(m);
    for (std::int64_t i = 0; i < valid; ++i) {
      qabsmax[first + i] = static_cast<std::uint8_t>(nf4::dynamic_encode(code, nf4::ftz(nf4::ftz(centred(i)) * inv)));
    }
  });
}

void nf4_double_dequantize(const std::uint8_t* qabsmax, const float* absmax2, const float* offset, const float* code,
                           std::int64_t n, float* absmax) {
  const float off = *offset;
  for (std::int64_t i = 0; i < n; ++i) {
    // Two roundings, as bitsandbytes (a kernel's product, then torch's add): no fused multiply-add.
    volatile float product = nf4::ftz(code[qabsmax[i]] * nf4::ftz(absmax2[i / nf4::kNestedBlocksize]));
    absmax[i] = product + off;
  }
}

}  // namespace cudablocks::cpu
