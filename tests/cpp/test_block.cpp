// The fp32 block from C++: layout, refusals, and (with a GPU) CUDA against the CPU backend.
#include <gtest/gtest.h>

#include <cmath>

#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"
#include "support.hpp"

namespace cudablocks {
namespace {

using test::random_normal;

using test::random_weights;
using test::tiny_config;
using test::Weights;

TEST(ParamLayout, FusedSegmentsAreContiguousAndAligned) {
  ParamLayout layout(tiny_config());
  const ParamEntry* q = layout.find("self_attn.q_proj.weight");
  const ParamEntry* k = layout.find("self_attn.k_proj.weight");
  const ParamEntry* up = layout.find("mlp.up_proj.weight");
  ASSERT_TRUE(q && k && up);
  EXPECT_EQ(q->offset, layout.wqkv);
  EXPECT_EQ(k->offset, q->offset + 32 * 32);
  EXPECT_EQ(up->offset, layout.w_gate_up + 48 * 32);
  EXPECT_EQ(layout.bo, -1);
  for (const ParamEntry& e : layout.entries()) EXPECT_LE(e.offset + e.numel(), layout.total_floats());
  EXPECT_EQ(layout.total_floats() % 64, 0);
}

TEST(Fp32Block, RefusesBadInputBeforeWriting) {
  const TransformerConfig c = tiny_config();
  Weights w = random_weights(c);
  auto block = Fp32Block::create(c, 0, w.map, Device(), 16, Precision::FP32);
  Stream stream{Device()};
  Buffer x = Buffer::empty({10, 32}, DType::Float32, Device());
  x.copy_from_host(random_normal(320).data(), stream);
  Buffer out = Buffer::empty({10, 32}, DType::Float32, Device());
  out.fill(7.0, stream);
  EXPECT_THROW(block->forward(x, out, {4, 5}, stream), InvalidArgumentError);
  EXPECT_THROW(block->forward(x, out, {0, 10}, stream), InvalidArgumentError);
  EXPECT_THROW(block->forward(x, out, {}, stream), InvalidArgumentError);
  EXPECT_THROW(block->forward(x, x, {10}, stream), InvalidArgumentError);
  Buffer narrow = Buffer::empty({10, 31}, DType::Float32, Device());
  EXPECT_THROW(block->forward(narrow, out, {10}, stream), ShapeError);
  auto ws = block->new_grad_workspace(stream);
  EXPECT_THROW(block->backward(x, out, out, {10}, stream, *ws), InvalidArgumentError);  // no forward yet
  std::vector<float> host(320);
  out.copy_to_host(host.data(), stream);
  for (float v : host) EXPECT_EQ(v, 7.0f);

  WeightMap missing = w.map;
  missing.erase("self_attn.q_norm.weight");
  EXPECT_THROW(Fp32Block::create(c, 0, missing, Device(), 16, Precision::FP32), InvalidArgumentError);
  WeightMap misshaped = w.map;
  misshaped["mlp.down_proj.weight"].shape = {48, 32};
  EXPECT_THROW(Fp32Block::create(c, 0, misshaped, Device(), 16, Precision::FP32), ShapeError);
}

// fp32: the same math up to fp32 rounding. bf16: the CPU emulates the bf16 GEMM operands, the CUDA
// block runs them on tensor cores (attention may round its operands too on CUDA), so the two differ
// by operands that round the other way: a loose bound that still catches a wrong operand or layout.
void cuda_matches_cpu(Precision precision, double tol) {
  const TransformerConfig c = tiny_config();
  Weights w = random_weights(c);
  const std::vector<std::int64_t> lens = {9, 1, 20};
  const std::int64_t T = 30, H = 32;
  const auto x_host = random_normal(T * H);
  const auto gy_host = random_normal(T * H);
  std::vector<std::vector<float>> results;
  for (const Device& dev : {Device(), Device(DeviceType::CUDA, 0)}) {
    auto block = Fp32Block::create(c, 1, w.map, dev, 64, precision);
    results.push_back(test::forward_backward(*block, x_host, gy_host, lens, false));
  }
  for (float v : results[1]) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LT(test::relative_error(results[1], results[0]), tol);
}

TEST(Fp32Block, CudaMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  cuda_matches_cpu(Precision::FP32, 1e-4);
}

TEST(Fp32Block, CudaBf16MatchesCpuBf16Emulation) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  cuda_matches_cpu(Precision::BF16, 2e-2);
}

}  // namespace
}  // namespace cudablocks
