#include <string>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks {

void dropout(const Buffer& x, Buffer& out, double p, std::uint64_t key, bool accumulate, const Stream& stream) {
  const Device& device = stream.device();
  check_device(x, device, "x");
  check_device(out, device, "out");
  check_dtype(x, DType::Float32, "x");
  check_dtype(out, DType::Float32, "out");
  if (out.shape() != x.shape()) {
    throw ShapeError("out has shape " + shape_str(out.shape()) + " but x has shape " + shape_str(x.shape()));
  }
  if (!(p >= 0.0 && p < 1.0)) throw InvalidArgumentError("dropout p must be in [0, 1), got " + std::to_string(p));
  if (x.numel() == 0) return;
  DeviceGuard guard(device);
  backend_for(device).dropout(x.data_as<float>(), out.data_as<float>(), x.numel(), p, key, accumulate, stream);
}

}  // namespace cudablocks
