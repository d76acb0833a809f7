#include "cudablocks/nf4.hpp"

#include <initializer_list>
#include <string>
#include <utility>

#include "core/checks.hpp"
#include "core/nf4_format.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

void check_numel(const Buffer& buffer, std::int64_t expected, const char* name, const char* why) {
  if (buffer.numel() != expected) {
    throw ShapeError(std::string(name) + " must hold " + std::to_string(expected) + " elements (" + why + "), got " +
                     buffer.describe());
  }
}

void check_float_dtype(const Buffer& buffer, const char* name) {
  const DType d = buffer.dtype();
  if (d != DType::Float32 && d != DType::BFloat16 && d != DType::Float16) {
    throw DtypeError(std::string(name) + " must be float32, bfloat16 or float16, got " + buffer.describe());
  }
}

void check_blocksize(std::int64_t blocksize) {
  if (!nf4_valid_blocksize(blocksize)) {
    throw InvalidArgumentError("NF4 blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (as "
                               "bitsandbytes), got " + std::to_string(blocksize));
  }
}

std::int64_t blocks_of(std::int64_t n, std::int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// The buffers of double quantization, either way: on `device`, fp32 absmax / code / offset /
// absmax2 and uint8 qabsmax, the 256-value map, one offset and one absmax2 per 256 of the m
// absmax values (the callers check absmax's and qabsmax's counts against m).
void check_double_quant_buffers(const Buffer& absmax, const Buffer& code, const Buffer& offset, const Buffer& qabsmax,
                                const Buffer& absmax2, const Device& device, std::int64_t m) {
  for (auto [b, name] : {std::pair<const Buffer*, const char*>{&absmax, "absmax"}, {&code, "code"},
                         {&offset, "offset"}, {&qabsmax, "qabsmax"}, {&absmax2, "absmax2"}}) {
    check_device(*b, device, name);
  }
  check_dtype(absmax, DType::Float32, "absmax");
  check_dtype(code, DType::Float32, "code");
  check_dtype(offset, DType::Float32, "offset");
  check_dtype(qabsmax, DType::UInt8, "qabsmax");
  check_dtype(absmax2, DType::Float32, "absmax2");
  check_numel(code, 256, "code", "the 8-bit map");
  check_numel(offset, 1, "offset", "one value");
  check_numel(absmax2, blocks_of(m, nf4::kNestedBlocksize), "absmax2", "one per 256 absmax values");
}

}  // namespace

bool nf4_valid_blocksize(std::int64_t blocksize) { return nf4::valid_blocksize(blocksize); }

void nf4_quantize(const Buffer& x, std::int64_t blocksize, Buffer& packed, Buffer& absmax, const Stream& stream) {
  const Device& device = stream.device();
  check_device(x, device, "x");
  check_device(packed, device, "packed");
  check_device(absmax, device, "absmax");
  check_float_dtype(x, "x");
  check_dtype(packed, DType::UInt8, "packed");
  check_dtype(absmax, DType::Float32, "absmax");
  check_blocksize(blocksize);
  const std::int64_t n = x.numel();
  check_numel(packed, (n + 1) / 2, "packed", "two 4-bit codes per byte");
  check_numel(absmax, blocks_of(n, blocksize), "absmax", "one per block");
  if (n == 0) return;
  DeviceGuard guard(device);
  backend_for(device).nf4_quantize(x.data(), x.dtype(), n, static_cast<int>(blocksize), packed.data_as<std::uint8_t>(),
                                   absmax.data_as<float>(), stream);
}

void nf4_dequantize(const Buffer& packed, const Buffer& absmax, std::int64_t blocksize, Buffer& out,
                    const Stream& stream) {
  const Device& device = stream.device();
  check_device(packed, device, "packed");
  check_device(absmax, device, "absmax");
  check_device(out, device, "out");
  check_dtype(packed, DType::UInt8, "packed");
  check_dtype(absmax, DType::Float32, "absmax");
  check_float_dtype(out, "out");
  check_blocksize(blocksize);
  const std::int64_t n = out.numel();
  check_numel(packed, (n + 1) / 2, "packed", "two 4-bit codes per byte of the output's elements");
  check_numel(absmax, blocks_of(n, blocksize), "absmax", "one per block of the output's elements");
  if (n == 0) return;
  DeviceGuard guard(device);
  backend_for(device).nf4_dequantize(packed.data_as<std::uint8_t>(), absmax.data_as<float>(), n,
                                     static_cast<int>(blocksize), out.data(), out.dtype(), stream);
}

void nf4_double_quantize(const Buffer& absmax, const Buffer& code, Buffer& offset, bool compute_offset,
                         Buffer& qabsmax, Buffer& absmax2, const Stream& stream) {
  const Device& device = stream.device();
  const std::int64_t m = absmax.numel();
  check_double_quant_buffers(absmax, code, offset, qabsmax, absmax2, device, m);
  check_numel(qabsmax, m, "qabsmax", "one code per absmax");
  DeviceGuard guard(device);
  const Backend& backend = backend_for(device);
  if (compute_offset) backend.nf4_absmax_mean(absmax.data_as<float>(), m, offset.data_as<float>(), stream);
  if (m == 0) return;
  backend.nf4_double_quantize(absmax.data_as<float>(), m, offset.data_as<float>(), code.data_as<float>(),
                              qabsmax.data_as<std::uint8_t>(), absmax2.data_as<float>(), stream);
}

void nf4_double_dequantize(const Buffer& qabsmax, const Buffer& absmax2, const Buffer& offset, const Buffer& code,
                           Buffer& absmax, const Stream& stream) {
  const Device& device = stream.device();
  const std::int64_t m = qabsmax.numel();
  check_double_quant_buffers(absmax, code, offset, qabsmax, absmax2, device, m);
  check_numel(absmax, m, "absmax", "one per code");
  if (m == 0) return;
  DeviceGuard guard(device);
  backend_for(device).nf4_double_dequantize(qabsmax.data_as<std::uint8_t>(), absmax2.data_as<float>(),
                                            offset.data_as<float>(), code.data_as<float>(), m,
                                            absmax.data_as<float>(), stream);
}

}  // namespace cudablocks
