// AdamW for fp32 blocks: moments laid out like the parameters, the global gradient norm, and the
// step as a few flat launches over the contiguous parameter, gradient and moment allocations.
#include <cmath>
#include <utility>
#include <vector>

#include "blocks/block_internal.hpp"
#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

GpuBlockOptimizerState::GpuBlockOptimizerState(std::shared_ptr<const ParamLayout> layout, const Device& device,
                                               const Stream& stream)
    : layout_(std::move(layout)),
      exp_avg_(Buffer::zeros({layout_->total_floats()}, DType::Float32, stream)),
      exp_avg_sq_(Buffer::zeros({layout_->total_floats()}, DType::Float32, stream)) {
  if (stream.device() != device) {
    throw DeviceError("optimizer state for " + device.str() + " made with a stream of " + stream.device().str());
  }
}

GradNorm::GradNorm(const Device& device) : sum_squares_(Buffer::empty({1}, DType::Float32, device)) {}

void GradNorm::compute(const std::vector<const CudaGradWorkspace*>& workspaces, const Stream& stream,
                       const std::vector<Buffer>& buffers) {
  const Device& device = sum_squares_.device();
  if (stream.device() != device) {
    throw DeviceError("GradNorm on " + device.str() + " computed with a stream of " + stream.device().str());
  }
  for (const CudaGradWorkspace* ws : workspaces) {
    if (ws == nullptr) throw InvalidArgumentError("GradNorm.compute: a workspace is None");
    check_device(ws->flat(), device, "gradient workspace");
  }
  for (const Buffer& buffer : buffers) {
    check_device(buffer, device, "gradient buffer");
    check_dtype(buffer, DType::Float32, "gradient buffer");
    check_aligned(buffer, 16, "gradient buffer");  // sum_squares loads float4 on CUDA
  }
  // Every gradient as (data, count); the first sum overwrites, the others accumulate.
  std::vector<std::pair<const float*, std::int64_t>> grads;
  for (const CudaGradWorkspace* ws : workspaces) grads.emplace_back(ws->flat().data_as<float>(), ws->flat().numel());
  for (const Buffer& buffer : buffers) grads.emplace_back(buffer.data_as<float>(), buffer.numel());
  if (grads.empty()) {
    sum_squares_.fill(0.0, stream);
    return;
  }
  DeviceGuard guard(device);
  const Backend& backend = backend_for(device);
  bool accumulate = false;
  for (const auto& [data, count] : grads) {
    backend.sum_squares(data, count, sum_squares_.data_as<float>(), accumulate, stream);
    accumulate = true;
  }
}

float GradNorm::value(const Stream& stream) const {
  float host = 0.0f;
  sum_squares_.copy_to_host(&host, stream);
  return std::sqrt(host);
}

std::shared_ptr<GpuBlockOptimizerState> Fp32Block::init_optimizer_state(const Stream& stream) const {
  if (stream.device() != device_) {
    throw DeviceError("init_optimizer_state of a block on " + device_.str() + " with a stream of " +
                      stream.device().str());
  }
  return std::make_shared<GpuBlockOptimizerState>(layout_, device_, stream);
}

void Fp32Block::optimizer_step(GpuBlockOptimizerState& state, const AdamWHyper& hyper, const Stream& stream,
                               const CudaGradWorkspace& grad_ws, const GradNorm* grad_norm,
                               bool decay_norms_and_biases) {
  blocks::check_optimizer_step("optimizer_step", "grad_ws", "another layout", "", device_, *layout_, hyper, stream, state,
                               grad_ws, grad_norm);

  std::lock_guard<std::mutex> lock(mutex_);
  DeviceGuard guard(device_);
  const Backend& backend = backend_for(device_);
  float* p = params_.data_as<float>();
  const float* g = grad_ws.flat().data_as<float>();
  float* m = state.exp_avg().data_as<float>();
  float* v = state.exp_avg_sq().data_as<float>();
  const float* norm = grad_norm != nullptr ? grad_norm->sum_squares().data_as<float>() : nullptr;
  // bf16 mode: the same pass refreshes the bf16 weight copy that the GEMMs read (2 bytes/param).
  std::uint16_t* p16 = precision_ == Precision::BF16 ? params_bf16_.data_as<std::uint16_t>() : nullptr;

  // Runs of consecutive tensors with the same weight decay, each one launch. A run extends to the
  // next run's first tensor, covering the alignment gaps: they hold zero parameters, gradients
  // and moments, which AdamW keeps at zero.
  const auto& entries = layout_->entries();
  auto decays = [&](const ParamEntry& e) { return e.is_matrix || decay_norms_and_biases; };
  std::size_t i = 0;
  while (i < entries.size()) {
    std::size_t j = i + 1;
    while (j < entries.size() && decays(entries[j]) == decays(entries[i])) ++j;
    const std::int64_t begin = i == 0 ? 0 : entries[i].offset;
    const std::int64_t end = j < entries.size() ? entries[j].offset : layout_->total_floats();
    AdamWHyper h = hyper;
    if (!decays(entries[i])) h.weight_decay = 0.0f;
    backend.adamw_step(p + begin, g + begin, m + begin, v + begin, end - begin, h, norm,
                       p16 != nullptr ? p16 + begin : nullptr, stream);
    i = j;
  }
  set_last_stream(stream);
}

}  // namespace cudablocks
