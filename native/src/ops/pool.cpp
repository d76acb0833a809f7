#include <string>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks {

namespace {

// The checks of both directions: `pooled` [B, H] and `tokens` [T, H] float32, cu_seqlens int32
// [B + 1]; B sequences of at least one token each need B <= T (and B >= 1 when T > 0).
void check_pool(const Buffer& tokens, const Buffer& cu_seqlens, const Buffer& pooled, const char* tokens_name,
                const char* pooled_name, const Device& device) {
  check_device(tokens, device, tokens_name);
  check_device(cu_seqlens, device, "cu_seqlens");
  check_device(pooled, device, pooled_name);
  check_dtype(tokens, DType::Float32, tokens_name);
  check_dtype(cu_seqlens, DType::Int32, "cu_seqlens");
  check_dtype(pooled, DType::Float32, pooled_name);
  check_shape(tokens, {-1, -1}, tokens_name);
  check_shape(cu_seqlens, {-1}, "cu_seqlens");
  if (cu_seqlens.shape()[0] < 1) {
    throw ShapeError("cu_seqlens must hold n_seqs + 1 >= 1 entries, got " + cu_seqlens.describe());
  }
  const std::int64_t n_seqs = cu_seqlens.shape()[0] - 1, n_tokens = tokens.shape()[0];
  check_shape(pooled, {n_seqs, tokens.shape()[1]}, pooled_name);
  if (n_seqs > n_tokens || (n_seqs == 0 && n_tokens > 0)) {
    throw InvalidArgumentError("pool: " + std::to_string(n_seqs) + " sequences (from cu_seqlens) cannot cover " +
                               std::to_string(n_tokens) + " tokens with every sequence at least one token long");
  }
}

}  // namespace

void pool_forward(const Buffer& x, const Buffer& cu_seqlens, Buffer& out, PoolMode mode, const Stream& stream) {
  const Device& device = stream.device();
  check_pool(x, cu_seqlens, out, "x", "out", device);
  const std::int64_t n_seqs = out.shape()[0], tokens = x.shape()[0], hidden = x.shape()[1];
  if (n_seqs == 0 || hidden == 0) return;
  DeviceGuard guard(device);
  backend_for(device).pool_forward(x.data_as<float>(), cu_seqlens.data_as<std::int32_t>(), out.data_as<float>(),
                                   n_seqs, tokens, hidden, mode, stream);
}

void pool_backward(const Buffer& dout, const Buffer& cu_seqlens, Buffer& dx, PoolMode mode, const Stream& stream) {
  const Device& device = stream.device();
  check_pool(dx, cu_seqlens, dout, "dx", "dout", device);
  const std::int64_t n_seqs = dout.shape()[0], tokens = dx.shape()[0], hidden = dx.shape()[1];
  if (tokens == 0 || hidden == 0) return;
  DeviceGuard guard(device);
  backend_for(device).pool_backward(dout.data_as<float>(), cu_seqlens.data_as<std::int32_t>(), dx.data_as<float>(),
                                    n_seqs, tokens, hidden, mode, stream);
}

}  // namespace cudablocks
