// The CudaBlock variant's shared parts: precision names, the defaults that refuse a call.
#include "cudablocks/block.hpp"
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

void CudaBlock::unsupported(const std::string& call, const std::string& instead) const {
  throw UnsupportedOperationError(call + " is not supported by " + kind() + " blocks" +
                                  (instead.empty() ? std::string() : ": " + instead));
}

void CudaBlock::backward(const Buffer&, const Buffer&, Buffer&, const std::vector<std::int64_t>&, const Stream&,
                         CudaGradWorkspace&) {
  unsupported("backward", "use an fp32 block (CudaBlock.fp32) to train every weight");
}

std::shared_ptr<CudaGradWorkspace> CudaBlock::new_grad_workspace(const Stream&) const {
  unsupported("a gradient workspace", "use an fp32 block (CudaBlock.fp32) to train every weight");
}

std::shared_ptr<const ParamLayout> CudaBlock::param_layout() const {
  unsupported("param_layout", "");
}

void CudaBlock::download_weights(float*, const Stream&) const {
  unsupported("download_weights", "use an fp32 block (CudaBlock.fp32)");
}

std::shared_ptr<GpuBlockOptimizerState> CudaBlock::init_optimizer_state(const Stream&) const {
  unsupported("init_optimizer_state", "train the LoRA adapters with init_lora_optimizer_state()");
}

void CudaBlock::optimizer_step(GpuBlockOptimizerState&, const AdamWHyper&, const Stream&, const CudaGradWorkspace&,
                               const GradNorm*, bool) {
  unsupported("optimizer_step", "train the LoRA adapters with lora_optimizer_step()");
}

}  // namespace cudablocks
