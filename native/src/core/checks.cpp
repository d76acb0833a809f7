#include "core/checks.hpp"

#include <cstdint>

#include "cudablocks/errors.hpp"

namespace cudablocks {

void check_dtype(const Buffer& buffer, DType expected, const char* name) {
  if (buffer.dtype() != expected) {
    throw DtypeError(std::string(name) + " must be " + dtype_name(expected) + ", got " + buffer.describe());
  }
}

void check_shape(const Buffer& buffer, std::initializer_list<std::int64_t> expected, const char* name) {
  bool ok = buffer.shape().size() == expected.size();
  std::size_t i = 0;
  for (std::int64_t d : expected) {
    if (!ok) break;
    ok = d < 0 || buffer.shape()[i] == d;
    ++i;
  }
  if (!ok) {
    std::string want = "[";
    i = 0;
    for (std::int64_t d : expected) want += (i++ ? ", " : "") + (d < 0 ? std::string("*") : std::to_string(d));
    throw ShapeError(std::string(name) + " must have shape " + want + "], got " + buffer.describe());
  }
}

void check_device(const Buffer& buffer, const Device& expected, const char* name) {
  if (buffer.device() != expected) {
    throw DeviceError(std::string(name) + " is on " + buffer.device().str() + " but the work runs on " +
                      expected.str() + " (" + buffer.describe() + ")");
  }
}

void check_aligned(const Buffer& buffer, std::size_t alignment, const char* name) {
  if (reinterpret_cast<std::uintptr_t>(buffer.data()) % alignment != 0) {
    throw InvalidArgumentError(std::string(name) + " must start on a " + std::to_string(alignment) +
                               "-byte boundary (a view at an offset that is a multiple of " +
                               std::to_string(alignment / dtype_size(buffer.dtype())) + " elements), got " +
                               buffer.describe());
  }
}

}  // namespace cudablocks
