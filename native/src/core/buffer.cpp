#include "cudablocks/buffer.hpp"

#include <cmath>
#include <cstring>
#include <limits>

#include "core/float_bits.hpp"
#include "core/gpu_runtime.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/memory.hpp"

namespace cudablocks {

std::string shape_str(const Shape& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

std::int64_t shape_numel(const Shape& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

namespace {

void check_shape_valid(const Shape& shape) {
  const std::int64_t limit = std::numeric_limits<std::int64_t>::max() / 8;
  std::int64_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0) throw ShapeError("negative dimension in shape " + shape_str(shape));
    if (d > 0 && n > limit / d) throw ShapeError("shape " + shape_str(shape) + " is too large");
    n *= d;
  }
}

// The bit pattern of `value` in `dtype`, for fill().
std::uint32_t fill_bits(double value, DType dtype) {
  auto integral = [&](double lo, double hi) {
    if (!(value >= lo && value <= hi) || std::floor(value) != value) {
      throw InvalidArgumentError("cannot fill a " + dtype_name(dtype) + " buffer with " + std::to_string(value));
    }
  };
  switch (dtype) {
    case DType::Float32: return float_to_bits(static_cast<float>(value));
    case DType::BFloat16: return float_to_bf16_bits(static_cast<float>(value));
    case DType::Float16: return float_to_fp16_bits(static_cast<float>(value));
    case DType::UInt8: integral(0, 255); return static_cast<std::uint32_t>(value);
    case DType::Int32:
      integral(std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max());
      return static_cast<std::uint32_t>(static_cast<std::int32_t>(value));
  }
  return 0;
}

}  // namespace

Buffer Buffer::empty(const Shape& shape, DType dtype, const Device& device) {
  check_shape_valid(shape);
  Buffer b;
  auto allocation = Allocation::create(device, static_cast<std::size_t>(shape_numel(shape)) * dtype_size(dtype));
  b.data_ = allocation->data();
  b.owner_ = std::move(allocation);
  b.shape_ = shape;
  b.dtype_ = dtype;
  b.device_ = device;
  return b;
}

Buffer Buffer::zeros(const Shape& shape, DType dtype, const Stream& stream) {
  Buffer b = empty(shape, dtype, stream.device());
  b.fill(0.0, stream);
  return b;
}

Buffer Buffer::wrap(void* data, const Shape& shape, DType dtype, const Device& device,
                    std::shared_ptr<void> owner) {
  check_shape_valid(shape);
  Buffer b;
  b.owner_ = std::move(owner);
  b.data_ = data;
  b.shape_ = shape;
  b.dtype_ = dtype;
  b.device_ = device;
  return b;
}

std::string Buffer::describe() const {
  return dtype_name(dtype_) + shape_str(shape_) + " on " + device_.str();
}

Buffer Buffer::view(std::int64_t element_offset, const Shape& shape) const {
  check_shape_valid(shape);
  if (element_offset < 0 || element_offset + shape_numel(shape) > numel()) {
    throw ShapeError("view of " + shape_str(shape) + " at element " + std::to_string(element_offset) +
                     " does not fit in " + describe());
  }
  Buffer b = *this;
  b.data_ = static_cast<char*>(data_) + element_offset * static_cast<std::int64_t>(dtype_size(dtype_));
  b.shape_ = shape;
  return b;
}

Buffer Buffer::reshaped(const Shape& shape) const {
  check_shape_valid(shape);
  if (shape_numel(shape) != numel()) {
    throw ShapeError("cannot reshape " + describe() + " to " + shape_str(shape));
  }
  Buffer b = *this;
  b.shape_ = shape;
  return b;
}

void Buffer::fill(double value, const Stream& stream) {
  if (stream.device() != device_) {
    throw DeviceError("fill of a buffer on " + device_.str() + " with a stream of " + stream.device().str());
  }
  std::uint32_t bits = fill_bits(value, dtype_);
  if (numel() == 0) return;
  DeviceGuard guard(device_);
  backend_for(device_).fill(data_, static_cast<std::size_t>(numel()), dtype_size(dtype_), bits, stream);
}

void Buffer::copy_from(const Buffer& src, const Stream& stream) {
  if (src.dtype_ != dtype_) {
    throw DtypeError("copy_from: source is " + src.describe() + ", destination is " + describe());
  }
  if (src.numel() != numel()) {
    throw ShapeError("copy_from: source is " + src.describe() + ", destination is " + describe());
  }
  const Device& run_on = device_.is_cuda() ? device_ : src.device_;
  if (stream.device() != device_ && stream.device() != src.device_) {
    throw DeviceError("copy_from " + src.device_.str() + " to " + device_.str() + " with a stream of " +
                      stream.device().str() + ": pass a stream of one of the two devices");
  }
  if (numel() == 0) return;
  if (run_on.is_cpu()) {
    std::memmove(data_, src.data_, nbytes());
    return;
  }
  DeviceGuard guard(stream.device().is_cuda() ? stream.device() : run_on);
  gpu::memcpy_async(data_, src.data_, nbytes(), stream.device().is_cuda() ? stream.handle() : nullptr);
  // Host memory written by a device copy is read by host code next: finish it first.
  if (device_.is_cpu()) {
    gpu::stream_synchronize(stream.device().is_cuda() ? stream.handle() : nullptr);
  }
}

void Buffer::copy_from_host(const void* src, const Stream& stream) {
  Buffer host = wrap(const_cast<void*>(src), shape_, dtype_, Device(), nullptr);
  copy_from(host, device_.is_cuda() ? stream : Stream(Device()));
}

void Buffer::copy_to_host(void* dst, const Stream& stream) const {
  Buffer host = wrap(dst, shape_, dtype_, Device(), nullptr);
  host.copy_from(*this, device_.is_cuda() ? stream : Stream(Device()));
}

}  // namespace cudablocks
