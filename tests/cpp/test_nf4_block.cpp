// The nf4 block from C++: the forward equals the fp32 block's on the dequantized weights, refusals,
// and (with a GPU) CUDA against the CPU backend with LoRA on every projection.
#include <gtest/gtest.h>

#include <cmath>

#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/nf4.hpp"
#include "cudablocks/nf4_block.hpp"
#include "support.hpp"

namespace cudablocks {
namespace {

using test::random_normal;

using test::random_weights;
using test::tiny_config;
using test::Weights;

// The weights with every projection replaced by its NF4 round trip (blocksize 64, on the CPU).
Weights dequantized(const TransformerConfig& c, const Weights& w) {
  Weights out;
  ParamLayout layout(c);
  out.storage.reserve(layout.entries().size());
  Stream stream{Device()};
  for (const ParamEntry& e : layout.entries()) {
    const float* src = w.map.at(e.name).data;
    std::vector<float> values(src, src + e.numel());
    if (e.is_matrix) {
      Buffer x = Buffer::empty({e.numel()}, DType::Float32, Device());
      x.copy_from_host(values.data(), stream);
      Buffer packed = Buffer::empty({(e.numel() + 1) / 2}, DType::UInt8, Device());
      Buffer absmax = Buffer::empty({(e.numel() + 63) / 64}, DType::Float32, Device());
      nf4_quantize(x, 64, packed, absmax, stream);
      nf4_dequantize(packed, absmax, 64, x, stream);
      x.copy_to_host(values.data(), stream);
    }
    out.storage.push_back(std::move(values));
    out.map[e.name] = HostTensor{e.shape, out.storage.back().data()};
  }
  return out;
}

std::vector<float> run_forward(CudaBlock& block, const std::vector<float>& x_host, const std::vector<std::int64_t>& lens) {
  const Device& dev = block.device();
  const std::int64_t H = block.config().hidden_size, T = static_cast<std::int64_t>(x_host.size()) / H;
  Stream stream(dev);
  Buffer x = Buffer::empty({T, H}, DType::Float32, dev), y = Buffer::empty({T, H}, DType::Float32, dev);
  x.copy_from_host(x_host.data(), stream);
  block.forward(x, y, lens, stream);
  std::vector<float> out(static_cast<std::size_t>(T * H));
  y.copy_to_host(out.data(), stream);
  return out;
}

TEST(Nf4Block, ForwardEqualsFp32BlockOnDequantizedWeights) {
  const TransformerConfig c = tiny_config();
  Weights w = random_weights(c);
  Weights dq = dequantized(c, w);
  auto nf4 = Nf4Block::create(c, 0, w.map, {}, Device(), 32, nullptr, Precision::FP32, false);
  auto fp32 = Fp32Block::create(c, 0, dq.map, Device(), 32, Precision::FP32);
  const auto x = random_normal(30 * 32);
  const auto a = run_forward(*nf4, x, {9, 1, 20});
  const auto b = run_forward(*fp32, x, {9, 1, 20});
  EXPECT_LT(test::relative_error(a, b), 1e-6);
  EXPECT_GT(nf4->device_bytes(), 0);
  EXPECT_LT(nf4->device_bytes(), static_cast<std::int64_t>(fp32->device_bytes()) / 4);
}

TEST(Nf4Block, RefusesWhatItCannotDo) {
  const TransformerConfig c = tiny_config();
  Weights w = random_weights(c);
  auto block = Nf4Block::create(c, 0, w.map, {}, Device(), 16, nullptr, Precision::BF16, false);
  Stream stream{Device()};
  EXPECT_THROW(block->init_optimizer_state(stream), UnsupportedOperationError);
  EXPECT_THROW(block->new_grad_workspace(stream), UnsupportedOperationError);
  EXPECT_THROW(block->param_layout(), UnsupportedOperationError);
  EXPECT_THROW(block->new_lora_grad_workspace(stream), UnsupportedOperationError);
  EXPECT_THROW(block->init_lora_optimizer_state(stream), UnsupportedOperationError);
  auto fp32 = Fp32Block::create(c, 0, w.map, Device(), 16, Precision::FP32);
  EXPECT_THROW(fp32->lora_layout(), UnsupportedOperationError);
  EXPECT_THROW(fp32->new_lora_grad_workspace(stream), UnsupportedOperationError);

  LoraConfig bad;
  bad.targets = {"q_proj", "qkv"};
  EXPECT_THROW(Nf4Block::create(c, 0, w.map, {}, Device(), 16, &bad, Precision::BF16, false), InvalidArgumentError);
  LoraConfig dropout;
  dropout.dropout = 1.0;
  EXPECT_THROW(Nf4Block::create(c, 0, w.map, {}, Device(), 16, &dropout, Precision::BF16, false),
               InvalidArgumentError);
  WeightMap missing = w.map;
  missing.erase("mlp.gate_proj.weight");
  EXPECT_THROW(Nf4Block::create(c, 0, missing, {}, Device(), 16, nullptr, Precision::BF16, false),
               InvalidArgumentError);
}

// CUDA against the CPU: forward, dL/dx and every LoRA gradient, LoRA on all seven projections with
// nonzero B. fp32 compute: the same math up to summation order; bf16: operands rounded to bf16.
void cuda_matches_cpu(Precision precision, bool double_quant, double tol) {
  const TransformerConfig c = tiny_config();
  Weights w = random_weights(c);
  LoraConfig lora;
  lora.rank = 4;
  lora.alpha = 8.0;
  lora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  lora.seed = 11;
  const std::vector<std::int64_t> lens = {9, 1, 20};
  const std::int64_t T = 30, H = 32;
  const auto x_host = random_normal(T * H);
  const auto gy_host = random_normal(T * H);
  std::vector<std::vector<float>> results;
  std::vector<std::vector<float>> b_values;
  for (const Device& dev : {Device(), Device(DeviceType::CUDA, 0)}) {
    auto block = Nf4Block::create(c, 1, w.map, {}, dev, 64, &lora, dev.is_cpu() ? Precision::FP32 : precision,
                                  double_quant);
    Stream stream(dev);
    WeightMap b_map;
    std::size_t i = 0;
    for (const ParamEntry& e : block->lora_layout()->entries()) {
      if (e.name.find("lora_B") == std::string::npos) continue;
      if (b_values.size() <= i) b_values.push_back(random_normal(static_cast<std::size_t>(e.numel()), 0.3f));
      b_map[e.name] = HostTensor{e.shape, b_values[i++].data()};
    }
    block->upload_lora_weights(b_map, stream);
    stream.synchronize();  // the helper uses a stream of its own
    results.push_back(test::forward_backward(*block, x_host, gy_host, lens, true));
  }
  for (float v : results[1]) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LT(test::relative_error(results[1], results[0]), tol);
}

TEST(Nf4Block, CudaMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  cuda_matches_cpu(Precision::FP32, false, 1e-4);
  cuda_matches_cpu(Precision::FP32, true, 1e-4);
}

TEST(Nf4Block, CudaBf16MatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  cuda_matches_cpu(Precision::BF16, false, 3e-2);
}

}  // namespace
}  // namespace cudablocks
