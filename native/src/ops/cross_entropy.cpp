#include <cmath>
#include <string>
#include <utility>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks {

void cross_entropy(const Buffer& logits, const Buffer& labels, Buffer& loss_sum, Buffer* dlogits, Buffer* probs,
                   const Buffer* class_weights, float grad_scale, const Stream& stream) {
  const Device& device = stream.device();
  check_device(logits, device, "logits");
  check_device(labels, device, "labels");
  check_device(loss_sum, device, "loss_sum");
  check_dtype(logits, DType::Float32, "logits");
  check_dtype(labels, DType::Int32, "labels");
  check_dtype(loss_sum, DType::Float32, "loss_sum");
  check_shape(logits, {-1, -1}, "logits");
  const std::int64_t batch = logits.shape()[0], classes = logits.shape()[1];
  check_shape(labels, {batch}, "labels");
  check_shape(loss_sum, {1}, "loss_sum");
  for (const auto& [buffer, name] : {std::pair{dlogits, "dlogits"}, std::pair{probs, "probs"}}) {
    if (buffer == nullptr) continue;
    check_device(*buffer, device, name);
    check_dtype(*buffer, DType::Float32, name);
    check_shape(*buffer, {batch, classes}, name);
  }
  if (class_weights != nullptr) {
    check_device(*class_weights, device, "class_weights");
    check_dtype(*class_weights, DType::Float32, "class_weights");
    check_shape(*class_weights, {classes}, "class_weights");
  }
  if (classes == 0 && batch > 0) throw ShapeError("cross_entropy needs at least one class, got " + logits.describe());
  if (!std::isfinite(grad_scale)) {
    throw InvalidArgumentError("grad_scale must be finite, got " + std::to_string(grad_scale));
  }
  if (batch == 0) return;
  DeviceGuard guard(device);
  backend_for(device).cross_entropy(logits.data_as<float>(), labels.data_as<std::int32_t>(),
                                    class_weights != nullptr ? class_weights->data_as<float>() : nullptr,
                                    loss_sum.data_as<float>(), dlogits != nullptr ? dlogits->data_as<float>() : nullptr,
                                    probs != nullptr ? probs->data_as<float>() : nullptr, grad_scale, batch, classes,
                                    stream);
}

}  // namespace cudablocks
