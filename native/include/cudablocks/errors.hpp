// The exceptions of the native core. Each maps to a documented Python class of the same name
// (python/cudablocks/errors.py); messages say what was wrong and what to do about it.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace cudablocks {

// Base of every error the library raises.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A buffer or array has the wrong shape or layout (Python: ShapeError, also a ValueError).
class ShapeError : public Error {
 public:
  using Error::Error;
};

// A buffer or array has the wrong element type (Python: DtypeError, also a ValueError).
class DtypeError : public Error {
 public:
  using Error::Error;
};

// A device that does not exist, or buffers of different devices mixed (Python: DeviceError, also a ValueError).
class DeviceError : public Error {
 public:
  using Error::Error;
};

// An argument value out of its domain: hyperparameters, sequence lengths, sizes (Python: InvalidArgumentError, also a ValueError).
class InvalidArgumentError : public Error {
 public:
  using Error::Error;
};

// An allocation failed (Python: OutOfMemoryError, also a MemoryError).
class OutOfMemoryError : public Error {
 public:
  OutOfMemoryError(const std::string& where, std::size_t bytes_requested, std::size_t bytes_free,
                   std::size_t bytes_total);
  std::size_t bytes_requested() const { return bytes_requested_; }
  std::size_t bytes_free() const { return bytes_free_; }

 private:
  std::size_t bytes_requested_;
  std::size_t bytes_free_;
};

// The CUDA runtime or cuBLAS reported a failure (Python: CudaError, also a RuntimeError).
class CudaError : public Error {
 public:
  using Error::Error;
};

// A call the object's kind does not support (Python: UnsupportedOperationError).
class UnsupportedOperationError : public Error {
 public:
  using Error::Error;
};

// Formats a byte count for messages: "1.50 GiB".
std::string format_bytes(std::size_t bytes);

}  // namespace cudablocks
