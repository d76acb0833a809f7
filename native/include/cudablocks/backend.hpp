// The op interface. Every op has a CPU reference implementation (native/src/cpu/) and a CUDA
// one (native/src/cuda/) at the same relative path; a Backend routes to one set of them. Blocks
// and the pipeline are written once against this interface.
//
// Ops take raw pointers into buffers of the backend's device, explicit sizes and a stream, and
// do no validation: callers (the Buffer-level functions in ops.hpp, the blocks) check first.
// Matrices are row-major.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cudablocks/device.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Sets `count` elements of `element_size` bytes (1, 2 or 4) to the bit pattern `bits`.
  virtual void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits,
                    const Stream& stream) const = 0;

  // RMSNorm over the rows of x [rows, cols]:
  //   y[r, :] = x[r, :] * rstd[r] * w,  rstd[r] = 1 / sqrt(mean(x[r, :]^2) + eps).
  // rstd may be nullptr; when given, it receives the per-row factor (saved for the backward).
  virtual void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd,
                               std::int64_t rows, std::int64_t cols, float eps,
                               const Stream& stream) const = 0;
};

// The backend that runs work on `device`. Throws DeviceError for CUDA when it was not built.
const Backend& backend_for(const Device& device);

}  // namespace cudablocks
