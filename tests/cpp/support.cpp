#include "support.hpp"

#include <cmath>
#include <cstdio>

#include "core/float_bits.hpp"
#include "cudablocks/device.hpp"

namespace cudablocks::test {

std::mt19937& rng() {
  static std::mt19937 generator = [] {
    unsigned seed = std::random_device{}();
    std::printf("[tests] random seed %u\n", seed);
    return std::mt19937(seed);
  }();
  return generator;
}

std::vector<float> random_normal(std::size_t n, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng());
  return v;
}

bool have_cuda_device() { return cuda_device_count() > 0; }

template <typename T>
static double relative_error_impl(const std::vector<float>& a, const std::vector<T>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  if (a.size() != b.size() || std::isnan(num)) return INFINITY;  // NaN never passes
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

std::vector<std::uint16_t> bf16_of(const std::vector<float>& v) {
  std::vector<std::uint16_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = float_to_bf16_bits(v[i]);
  return out;
}

std::vector<float> float_of(const std::vector<std::uint16_t>& bits) {
  std::vector<float> out(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) out[i] = bf16_bits_to_float(bits[i]);
  return out;
}

double relative_error(const std::vector<float>& a, const std::vector<double>& b) { return relative_error_impl(a, b); }
double relative_error(const std::vector<float>& a, const std::vector<float>& b) { return relative_error_impl(a, b); }

TransformerConfig tiny_config() {
  TransformerConfig c;
  c.model_type = "qwen3";
  c.hidden_size = 32;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.vocab_size = 10;
  c.max_position_embeddings = 64;
  c.qk_norm = true;
  c.attention_bias = true;
  return c;
}

std::vector<float> rope_inv_freq(int head_dim, float theta) {
  TransformerConfig c = tiny_config();
  c.num_attention_heads = c.num_key_value_heads = 1;
  c.head_dim = head_dim;
  c.rope_theta = theta;
  return c.rope_inv_freq();
}

Weights random_weights(const TransformerConfig& c) {
  Weights w;
  ParamLayout layout(c);
  w.storage.reserve(layout.entries().size());
  for (const ParamEntry& e : layout.entries()) {
    w.storage.push_back(random_normal(static_cast<std::size_t>(e.numel()), e.is_matrix ? 0.2f : 1.0f));
    w.map[e.name] = HostTensor{e.shape, w.storage.back().data()};
  }
  return w;
}

std::vector<float> forward_backward(CudaBlock& block, const std::vector<float>& x_host, const std::vector<float>& gy_host,
                                    const std::vector<std::int64_t>& lens, bool lora) {
  std::int64_t T = 0;
  for (std::int64_t len : lens) T += len;
  const std::int64_t H = block.config().hidden_size;
  const Device dev = block.device();
  Stream stream(dev);
  Buffer x = Buffer::empty({T, H}, DType::Float32, dev), y = Buffer::empty({T, H}, DType::Float32, dev);
  Buffer gy = Buffer::empty({T, H}, DType::Float32, dev), gx = Buffer::empty({T, H}, DType::Float32, dev);
  x.copy_from_host(x_host.data(), stream);
  gy.copy_from_host(gy_host.data(), stream);
  auto ws = lora ? block.new_lora_grad_workspace(stream) : block.new_grad_workspace(stream);
  block.forward(x, y, lens, stream);
  if (lora) {
    block.backward_lora(x, gy, gx, lens, stream, *ws);
  } else {
    block.backward(x, gy, gx, lens, stream, *ws);
  }
  std::vector<float> out(static_cast<std::size_t>(T * H)), gin(static_cast<std::size_t>(T * H));
  std::vector<float> grads(static_cast<std::size_t>(ws->layout().total_floats()));
  y.copy_to_host(out.data(), stream);
  gx.copy_to_host(gin.data(), stream);
  ws->download(grads.data(), stream);
  out.insert(out.end(), gin.begin(), gin.end());
  out.insert(out.end(), grads.begin(), grads.end());
  return out;
}

}  // namespace cudablocks::test
