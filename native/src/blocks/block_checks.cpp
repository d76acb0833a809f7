// The argument checks shared by the blocks' forward and backward (blocks/block_internal.hpp).
#include "blocks/block_internal.hpp"

namespace cudablocks::blocks {

Batch check_batch(const std::vector<std::int64_t>& seq_lens, std::int64_t max_tokens_, const char* call) {
  if (seq_lens.empty()) throw InvalidArgumentError(std::string(call) + ": seq_lens is empty; give at least one sequence");
  Batch batch;
  batch.cu_seqlens.reserve(seq_lens.size() + 1);
  batch.cu_seqlens.push_back(0);
  for (std::size_t i = 0; i < seq_lens.size(); ++i) {
    const std::int64_t len = seq_lens[i];
    if (len <= 0) {
      throw InvalidArgumentError(std::string(call) + ": seq_lens[" + std::to_string(i) + "] is " + std::to_string(len) +
                                 "; every sequence needs at least one token (seq_lens " + lens_str(seq_lens) + ")");
    }
    if (len > max_tokens_ - batch.tokens) {
      std::int64_t total = 0;
      for (std::int64_t l : seq_lens) total += std::max<std::int64_t>(l, 0);
      throw InvalidArgumentError(std::string(call) + ": seq_lens " + lens_str(seq_lens) + " add up to " +
                                 std::to_string(total) + " tokens, more than this block's max_tokens " +
                                 std::to_string(max_tokens_) + "; split the batch or make the block with a larger max_tokens");
    }
    batch.tokens += len;
    batch.max_seqlen = std::max(batch.max_seqlen, static_cast<int>(len));
    batch.cu_seqlens.push_back(static_cast<std::int32_t>(batch.tokens));
  }
  return batch;
}

void check_activation(const Buffer& b, const TransformerConfig& config_, const Device& device_, std::int64_t tokens,
                      const char* name) {
  check_device(b, device_, name);
  check_dtype(b, DType::Float32, name);
  if (b.ndim() != 2 || b.shape()[1] != config_.hidden_size) {
    throw ShapeError(std::string(name) + " must have shape [tokens, " + std::to_string(config_.hidden_size) +
                     "] (hidden_size " + std::to_string(config_.hidden_size) + "), got " + b.describe());
  }
  if (b.shape()[0] != tokens) {
    throw ShapeError(std::string(name) + " must have shape [" + std::to_string(tokens) + ", " +
                     std::to_string(config_.hidden_size) + "] like x, got " + b.describe());
  }
}

void check_input(const Buffer& x, const TransformerConfig& config_, const Device& device_, const Batch& batch,
                 const std::vector<std::int64_t>& seq_lens) {
  check_activation(x, config_, device_, x.ndim() == 2 ? x.shape()[0] : -1, "x");
  if (x.shape()[0] != batch.tokens) {
    throw InvalidArgumentError("seq_lens " + lens_str(seq_lens) + " add up to " + std::to_string(batch.tokens) +
                               " tokens but x has " + std::to_string(x.shape()[0]) + " rows (" + x.describe() +
                               "); seq_lens must add up to the rows of x");
  }
}

Batch check_backward(const char* call, const char* ws_name, const TransformerConfig& config, const Device& device,
                     std::int64_t max_tokens, const Buffer& x, const Buffer& grad_out, const Buffer& grad_in,
                     const std::vector<std::int64_t>& seq_lens, const Stream& stream, const CudaGradWorkspace& ws,
                     const ParamLayout& layout, const std::function<std::string()>& mismatch) {
  const std::string c = call;
  if (stream.device() != device) {
    throw DeviceError(c + " of a block on " + device.str() + " with a stream of " + stream.device().str());
  }
  Batch batch = check_batch(seq_lens, max_tokens, call);
  check_input(x, config, device, batch, seq_lens);
  check_activation(grad_out, config, device, batch.tokens, "grad_out");
  check_activation(grad_in, config, device, batch.tokens, "grad_in");
  if (ws.device() != device) {
    throw DeviceError(std::string(ws_name) + " is on " + ws.device().str() + " but the block is on " + device.str());
  }
  if (!(ws.layout() == layout)) throw InvalidArgumentError(mismatch());
  if (overlaps(grad_in, x)) throw InvalidArgumentError(c + ": grad_in must not overlap x");
  const bool in_place = grad_in.data() == grad_out.data();
  if (!in_place && overlaps(grad_in, grad_out)) {
    throw InvalidArgumentError(c + ": grad_in must be grad_out itself or not overlap it");
  }
  if (overlaps(grad_in, ws.flat()) || overlaps(grad_out, ws.flat())) {
    throw InvalidArgumentError(c + ": grad_in and grad_out must not overlap " + ws_name);
  }
  return batch;
}

void check_optimizer_step(const char* call, const char* ws_name, const char* other, const char* state_hint,
                          const Device& device, const ParamLayout& layout, const AdamWHyper& hyper,
                          const Stream& stream, const GpuBlockOptimizerState& state, const CudaGradWorkspace& ws,
                          const GradNorm* grad_norm) {
  validate(hyper);
  const std::string c = call;
  if (stream.device() != device) {
    throw DeviceError(c + " of a block on " + device.str() + " with a stream of " + stream.device().str());
  }
  if (!(state.layout() == layout)) {
    throw InvalidArgumentError(c + ": the state was made for " + other + " (" + state.layout().describe() +
                               ") than this block's (" + layout.describe() + ")" + state_hint);
  }
  if (!(ws.layout() == layout)) {
    throw InvalidArgumentError(c + ": " + ws_name + " holds " + other + " (" + ws.layout().describe() +
                               ") than this block's (" + layout.describe() + ")");
  }
  check_device(state.exp_avg(), device, "optimizer state");
  check_device(ws.flat(), device, ws_name);
  if (grad_norm != nullptr) check_device(grad_norm->sum_squares(), device, "grad_norm");
}

std::vector<std::int32_t> position_indices(const Batch& batch) {
  const std::int64_t T = batch.tokens;
  std::vector<std::int32_t> idx(static_cast<std::size_t>(T) + batch.cu_seqlens.size());
  for (std::size_t s = 0; s + 1 < batch.cu_seqlens.size(); ++s) {
    for (std::int32_t t = batch.cu_seqlens[s]; t < batch.cu_seqlens[s + 1]; ++t) idx[t] = t - batch.cu_seqlens[s];
  }
  std::copy(batch.cu_seqlens.begin(), batch.cu_seqlens.end(), idx.begin() + T);
  return idx;
}

}  // namespace cudablocks::blocks
