// Helpers shared by the gtest binaries.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "cudablocks/block.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks::test {

// Seeded from std::random_device, so every run draws fresh inputs; the seed is printed so that a
// failure can be replayed.
std::mt19937& rng();
std::vector<float> random_normal(std::size_t n, float stddev = 1.0f);
// True when a CUDA device is usable (the CUDA cases skip otherwise).
bool have_cuda_device();
// bf16 bit patterns of values rounded to nearest even (core/float_bits.hpp), and their exact widening.
std::vector<std::uint16_t> bf16_of(const std::vector<float>& v);
std::vector<float> float_of(const std::vector<std::uint16_t>& bits);
// A host vector copied into a new 1-D buffer of `dtype` on `device`, and a buffer's bytes back as a
// host vector (after synchronising `stream`).
template <typename T>
Buffer upload(const std::vector<T>& v, DType dtype, const Device& device, const Stream& stream) {
  Buffer b = Buffer::empty({static_cast<std::int64_t>(v.size())}, dtype, device);
  b.copy_from_host(v.data(), stream);
  return b;
}
template <typename T>
std::vector<T> download(const Buffer& b, const Stream& stream) {
  std::vector<T> v(static_cast<std::size_t>(b.nbytes() / sizeof(T)));
  b.copy_to_host(v.data(), stream);
  stream.synchronize();
  return v;
}
// ||a - b|| / ||b|| in double.
double relative_error(const std::vector<float>& a, const std::vector<double>& b);
double relative_error(const std::vector<float>& a, const std::vector<float>& b);

// A tiny Qwen3 config (hidden 32, 4/2 heads of 8, intermediate 48) with q/k/v biases and QK-norm.
TransformerConfig tiny_config();
// The default (unscaled) RoPE inverse frequencies [head_dim / 2] of TransformerConfig::rope_inv_freq().
std::vector<float> rope_inv_freq(int head_dim, float theta);

// One training step of `block` on host x and grad_out [sum(lens), hidden]: forward, then backward
// (backward_lora when `lora`). Returns out, grad_in and the workspace's gradients, concatenated.
std::vector<float> forward_backward(cudablocks::CudaBlock& block, const std::vector<float>& x_host,
                                    const std::vector<float>& gy_host, const std::vector<std::int64_t>& lens,
                                    bool lora);

// Random weights for every tensor of a config's layout, and the storage they point into.
struct Weights {
  std::vector<std::vector<float>> storage;
  WeightMap map;
};
Weights random_weights(const TransformerConfig& config);

}  // namespace cudablocks::test
