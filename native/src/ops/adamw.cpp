#include <string>
#include <utility>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks {

void adamw_step(Buffer& param, const Buffer& grad, Buffer& exp_avg, Buffer& exp_avg_sq, const AdamWHyper& hyper,
                const Buffer* grad_sum_squares, const Stream& stream) {
  validate(hyper);
  const Device& device = stream.device();
  const std::pair<const Buffer*, const char*> buffers[] = {
      {&param, "param"}, {&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& [buffer, name] : buffers) {
    check_device(*buffer, device, name);
    check_dtype(*buffer, DType::Float32, name);
    check_aligned(*buffer, 16, name);  // the CUDA kernel loads float4
    if (buffer->numel() != param.numel()) {
      throw ShapeError(std::string(name) + " must hold as many elements as param (" + param.describe() + "), got " +
                       buffer->describe());
    }
  }
  if (grad_sum_squares != nullptr) {
    check_device(*grad_sum_squares, device, "grad_norm");
    check_dtype(*grad_sum_squares, DType::Float32, "grad_norm");
    check_shape(*grad_sum_squares, {1}, "grad_norm");
  }
  if (param.numel() == 0) return;
  DeviceGuard guard(device);
  backend_for(device).adamw_step(param.data_as<float>(), grad.data_as<float>(), exp_avg.data_as<float>(),
                                 exp_avg_sq.data_as<float>(), param.numel(), hyper,
                                 grad_sum_squares != nullptr ? grad_sum_squares->data_as<float>() : nullptr,
                                 /*param_bf16=*/nullptr, stream);
}

}  // namespace cudablocks
