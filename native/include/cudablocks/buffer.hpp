// Buffer: a dense, row-major (C-contiguous) n-d array on one device.
//
// A buffer shares its memory with every copy of itself and with the views taken from it; the
// memory lives as long as one of them does. Memory comes either from the library (counted in
// memory_stats) or from elsewhere through DLPack, in which case the producer's deleter runs
// when the last buffer lets go.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cudablocks/device.hpp"
#include "cudablocks/dtype.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

using Shape = std::vector<std::int64_t>;

std::string shape_str(const Shape& shape);  // "[4, 8]"
std::int64_t shape_numel(const Shape& shape);

class Buffer {
 public:
  Buffer() = default;
  // Uninitialised memory from the library.
  static Buffer empty(const Shape& shape, DType dtype, const Device& device);
  // Zero-filled, ordered on `stream`.
  static Buffer zeros(const Shape& shape, DType dtype, const Stream& stream);
  // Memory owned by `owner` (kept alive by the buffer), e.g. an imported DLPack tensor.
  static Buffer wrap(void* data, const Shape& shape, DType dtype, const Device& device,
                     std::shared_ptr<void> owner);

  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  std::int64_t numel() const { return shape_numel(shape_); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  const Device& device() const { return device_; }
  void* data() const { return data_; }
  template <typename T>
  T* data_as() const { return static_cast<T*>(data_); }
  bool defined() const { return data_ != nullptr || numel() == 0; }

  // "float32[4, 8] on cuda:0"
  std::string describe() const;

  // A buffer over `shape` starting `element_offset` elements into this one (same memory).
  Buffer view(std::int64_t element_offset, const Shape& shape) const;
  // The same memory seen with another shape of equal element count.
  Buffer reshaped(const Shape& shape) const;

  // Sets every element to `value` (converted to the dtype), ordered on `stream`.
  void fill(double value, const Stream& stream);
  // Copies `src` (same dtype and element count, any device) into this buffer, ordered on `stream`.
  void copy_from(const Buffer& src, const Stream& stream);
  // Host memory of exactly nbytes() bytes in, and out. The host side may be reused on return.
  void copy_from_host(const void* src, const Stream& stream);
  void copy_to_host(void* dst, const Stream& stream) const;

 private:
  std::shared_ptr<void> owner_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::Float32;
  Device device_;
};

}  // namespace cudablocks
