#include <string>
#include <utility>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks {

void rmsnorm_forward(const Buffer& x, const Buffer& w, Buffer& y, float eps, const Stream& stream, Buffer* rstd) {
  const Device& device = stream.device();
  check_device(x, device, "x");
  check_device(w, device, "w");
  check_device(y, device, "y");
  check_dtype(x, DType::Float32, "x");
  check_dtype(w, DType::Float32, "w");
  check_dtype(y, DType::Float32, "y");
  check_shape(x, {-1, -1}, "x");
  const std::int64_t rows = x.shape()[0], cols = x.shape()[1];
  check_shape(w, {cols}, "w");
  check_shape(y, {rows, cols}, "y");
  if (rstd != nullptr) {
    check_device(*rstd, device, "rstd");
    check_dtype(*rstd, DType::Float32, "rstd");
    check_shape(*rstd, {rows}, "rstd");
  }
  if (!(eps >= 0.0f)) throw InvalidArgumentError("eps must be >= 0, got " + std::to_string(eps));
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(device);
  backend_for(device).rmsnorm_forward(x.data_as<float>(), w.data_as<float>(), y.data_as<float>(),
                                      rstd != nullptr ? rstd->data_as<float>() : nullptr, rows, cols, eps, stream);
}

void rmsnorm_backward(const Buffer& dy, const Buffer& x, const Buffer& w, const Buffer& rstd, Buffer& dx, Buffer& dw,
                      bool accumulate_dx, const Stream& stream) {
  const Device& device = stream.device();
  const std::pair<const Buffer*, const char*> buffers[] = {{&dy, "dy"}, {&x, "x"},   {&w, "w"},
                                                           {&rstd, "rstd"}, {&dx, "dx"}, {&dw, "dw"}};
  for (const auto& [buffer, name] : buffers) {
    check_device(*buffer, device, name);
    check_dtype(*buffer, DType::Float32, name);
  }
  check_shape(x, {-1, -1}, "x");
  const std::int64_t rows = x.shape()[0], cols = x.shape()[1];
  check_shape(dy, {rows, cols}, "dy");
  check_shape(dx, {rows, cols}, "dx");
  check_shape(w, {cols}, "w");
  check_shape(dw, {cols}, "dw");
  check_shape(rstd, {rows}, "rstd");
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(device);
  backend_for(device).rmsnorm_backward(dy.data_as<float>(), x.data_as<float>(), w.data_as<float>(),
                                       rstd.data_as<float>(), accumulate_dx ? dx.data_as<float>() : nullptr,
                                       dx.data_as<float>(), nullptr, dw.data_as<float>(), rows, cols, stream);
}

}  // namespace cudablocks
