// The CudaBlock variant's shared parts: precision names, the defaults that refuse a call.
#include "cudablocks/block.hpp"

#include <algorithm>

#include "core/gpu_runtime.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

Precision precision_from_name(const std::string& name) {
  if (name == "fp32") return Precision::FP32;
  if (name == "tf32") return Precision::TF32;
  if (name == "bf16") return Precision::BF16;
  throw InvalidArgumentError("precision must be \"fp32\", \"tf32\" or \"bf16\", got \"" + name + "\"");
}

std::string precision_name(Precision precision) {
  switch (precision) {
    case Precision::FP32: return "fp32";
    case Precision::TF32: return "tf32";
    case Precision::BF16: return "bf16";
  }
  return "fp32";
}

CudaBlock::CudaBlock(const TransformerConfig& config, int layer_idx, const Device& device, std::int64_t max_tokens,
                     Precision precision)
    : config_(config), layer_idx_(layer_idx), device_(device), max_tokens_(max_tokens), precision_(precision),
      last_stream_(Stream::wrap(device, 0)) {}

Stream CudaBlock::last_stream() const {
  std::lock_guard<std::mutex> lock(last_stream_mutex_);
  return last_stream_;
}

void CudaBlock::set_last_stream(const Stream& stream) {
  std::lock_guard<std::mutex> lock(last_stream_mutex_);
  last_stream_ = stream;
}

void CudaBlock::upload_rope_inv_freq(const Stream& stream) {
  const std::vector<float> inv_freq = config_.rope_inv_freq();
  rope_inv_freq_ = Buffer::empty({static_cast<std::int64_t>(inv_freq.size())}, DType::Float32, device_);
  rope_inv_freq_.copy_from_host(inv_freq.data(), stream);
}

void CudaBlock::upload_indices(const std::vector<std::int32_t>& idx, const Stream& stream) {
  Buffer dst = indices_.view(0, {static_cast<std::int64_t>(idx.size())});
  if (!device_.is_cuda()) {
    dst.copy_from_host(idx.data(), stream);
    return;
  }
  if (!indices_staging_) {
    const Event copied(device_);
    const auto n = static_cast<std::size_t>(indices_.numel());
    // Freed only once its last copy has read it.
    indices_staging_ = std::shared_ptr<std::int32_t>(
        static_cast<std::int32_t*>(gpu::host_alloc_pinned(n * sizeof(std::int32_t))), [copied](std::int32_t* p) {
          try {
            copied.synchronize();
          } catch (...) {  // a failed device: nothing is reading it any more
          }
          gpu::host_free_pinned(p);
        });
    indices_copied_ = copied;
  } else {
    indices_copied_->synchronize();  // the previous upload has read the staging (long done, in practice)
  }
  std::copy(idx.begin(), idx.end(), indices_staging_.get());
  dst.copy_from_host(indices_staging_.get(), stream);
  stream.record(*indices_copied_);
}

void CudaBlock::unsupported(const std::string& call, const std::string& instead) const {
  throw UnsupportedOperationError(call + " is not supported by " + kind() + " blocks" +
                                  (instead.empty() ? std::string() : ": " + instead));
}

void CudaBlock::require_full_training(const std::string& call) const {
  const std::string train = "its weights are frozen: train LoRA adapters with backward_lora(), init_lora_optimizer_state() "
                            "and lora_optimizer_step() (make the block with lora=cudablocks.LoraConfig(...)), or use an "
                            "fp32 block (CudaBlock.fp32) to train every weight";
  if (call == "download_weights" || call == "param_layout") {
    unsupported(call, "its weights are frozen NF4: download_lora_weights() gives the LoRA adapters (PEFT names) and "
                      "cudablocks.nf4.dequantize the weights' values; an fp32 block (CudaBlock.fp32) has downloadable weights");
  }
  if (call == "new_grad_workspace") {
    unsupported("a gradient workspace", "its weights are frozen: new_lora_grad_workspace() holds the LoRA adapters' "
                                        "gradients; an fp32 block (CudaBlock.fp32) trains every weight");
  }
  unsupported(call, train);
}

void CudaBlock::backward(const Buffer&, const Buffer&, Buffer&, const std::vector<std::int64_t>&, const Stream&,
                         CudaGradWorkspace&) {
  require_full_training("backward");
}

std::shared_ptr<CudaGradWorkspace> CudaBlock::new_grad_workspace(const Stream&) const {
  require_full_training("new_grad_workspace");
  return nullptr;
}

std::shared_ptr<const ParamLayout> CudaBlock::param_layout() const {
  require_full_training("param_layout");
  return nullptr;
}

void CudaBlock::download_weights(float*, const Stream&) const { require_full_training("download_weights"); }

std::shared_ptr<GpuBlockOptimizerState> CudaBlock::init_optimizer_state(const Stream&) const {
  require_full_training("init_optimizer_state");
  return nullptr;
}

void CudaBlock::optimizer_step(GpuBlockOptimizerState&, const AdamWHyper&, const Stream&, const CudaGradWorkspace&,
                               const GradNorm*, bool) {
  require_full_training("optimizer_step");
}

// LoRA: every call goes through require_lora first, which refuses on blocks without adapters.
void CudaBlock::require_lora(const std::string& call) const {
  unsupported(call, "this block has no LoRA adapters; an fp32 block trains every weight with backward() and "
                    "optimizer_step(); for LoRA make an nf4 block with CudaBlock.nf4(..., lora=cudablocks.LoraConfig(...))");
}

std::shared_ptr<const ParamLayout> CudaBlock::lora_layout() const {
  require_lora("lora_layout");
  return nullptr;
}

void CudaBlock::backward_lora(const Buffer&, const Buffer&, Buffer&, const std::vector<std::int64_t>&, const Stream&,
                              CudaGradWorkspace&, std::optional<std::uint64_t>) {
  require_lora("backward_lora");
}

std::shared_ptr<CudaGradWorkspace> CudaBlock::new_lora_grad_workspace(const Stream&) const {
  require_lora("new_lora_grad_workspace");
  return nullptr;
}

std::shared_ptr<GpuBlockOptimizerState> CudaBlock::init_lora_optimizer_state(const Stream&) const {
  require_lora("init_lora_optimizer_state");
  return nullptr;
}

void CudaBlock::lora_optimizer_step(GpuBlockOptimizerState&, const AdamWHyper&, const Stream&, const CudaGradWorkspace&,
                                    const GradNorm*) {
  require_lora("lora_optimizer_step");
}

void CudaBlock::download_lora_weights(float*, const Stream&) const { require_lora("download_lora_weights"); }

void CudaBlock::upload_lora_weights(const WeightMap&, const Stream&) { require_lora("upload_lora_weights"); }

}  // namespace cudablocks
