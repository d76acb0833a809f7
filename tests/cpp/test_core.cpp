// Core objects (devices, buffers, streams, errors) and RMSNorm on both backends.
#include <gtest/gtest.h>

#include <cmath>

#include "cudablocks/buffer.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/memory.hpp"
#include "cudablocks/ops.hpp"
#include "support.hpp"

namespace cudablocks {
namespace {

using test::random_normal;

TEST(Device, ParsesCpuAndRejectsNonsense) {
  EXPECT_TRUE(Device::parse("cpu").is_cpu());
  EXPECT_EQ(Device::parse("cpu").str(), "cpu");
  EXPECT_THROW(Device::parse("gpu0"), DeviceError);
  EXPECT_THROW(Device::parse("cuda:x"), DeviceError);
  EXPECT_THROW(Device::parse("cuda:-1"), DeviceError);
  // One past the last device never exists.
  EXPECT_THROW(Device::parse("cuda:" + std::to_string(cuda_device_count())), DeviceError);
}

TEST(Buffer, HostRoundTripAndFill) {
  Stream stream{Device()};
  auto data = random_normal(37);
  Buffer b = Buffer::empty({37}, DType::Float32, Device());
  b.copy_from_host(data.data(), stream);
  std::vector<float> back(37, NAN);
  b.copy_to_host(back.data(), stream);
  EXPECT_EQ(back, data);
  b.fill(2.5, stream);
  b.copy_to_host(back.data(), stream);
  for (float v : back) EXPECT_EQ(v, 2.5f);
}

TEST(Buffer, RejectsBadShapesAndFills) {
  EXPECT_THROW(Buffer::empty({-1, 3}, DType::Float32, Device()), ShapeError);
  Buffer b = Buffer::empty({4, 6}, DType::Int32, Device());
  Stream stream{Device()};
  EXPECT_THROW(b.fill(1.5, stream), InvalidArgumentError);
  EXPECT_THROW(b.view(20, {5}), ShapeError);
  EXPECT_THROW(b.reshaped({5, 5}), ShapeError);
  Buffer f = Buffer::empty({24}, DType::Float32, Device());
  EXPECT_THROW(f.copy_from(b, stream), DtypeError);
}

TEST(Memory, CountsLiveAllocations) {
  Device cpu;
  const auto before = memory_stats(cpu).allocated_bytes;
  {
    Buffer b = Buffer::empty({1000}, DType::Float32, cpu);
    EXPECT_EQ(memory_stats(cpu).allocated_bytes, before + 4000);
  }
  EXPECT_EQ(memory_stats(cpu).allocated_bytes, before);
}

// fp64 reference of y = x * rsqrt(mean(x^2) + eps) * w.
std::vector<double> rmsnorm_reference(const std::vector<float>& x, const std::vector<float>& w, int rows, int cols,
                                      double eps) {
  std::vector<double> y(x.size());
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int c = 0; c < cols; ++c) ss += double(x[r * cols + c]) * x[r * cols + c];
    double s = 1.0 / std::sqrt(ss / cols + eps);
    for (int c = 0; c < cols; ++c) y[r * cols + c] = x[r * cols + c] * s * w[c];
  }
  return y;
}

std::vector<float> run_rmsnorm(const Device& device, const std::vector<float>& x, const std::vector<float>& w,
                               int rows, int cols, float eps) {
  Stream stream(device);
  Buffer xb = Buffer::empty({rows, cols}, DType::Float32, device);
  Buffer wb = Buffer::empty({cols}, DType::Float32, device);
  Buffer yb = Buffer::empty({rows, cols}, DType::Float32, device);
  xb.copy_from_host(x.data(), stream);
  wb.copy_from_host(w.data(), stream);
  yb.fill(NAN, stream);  // poison: every element must be written
  rmsnorm_forward(xb, wb, yb, eps, stream);
  std::vector<float> y(x.size());
  yb.copy_to_host(y.data(), stream);
  return y;
}

TEST(RmsNorm, CpuMatchesFloat64Reference) {
  for (auto [rows, cols] : {std::pair{7, 33}, std::pair{64, 2560}}) {
    auto x = random_normal(size_t(rows) * cols, 3.0f);
    auto w = random_normal(cols);
    auto y = run_rmsnorm(Device(), x, w, rows, cols, 1e-6f);
    EXPECT_LT(test::relative_error(y, rmsnorm_reference(x, w, rows, cols, 1e-6)), 1e-6) << rows << "x" << cols;
  }
}

TEST(RmsNorm, RejectsMismatchedShapes) {
  Device cpu;
  Stream stream(cpu);
  Buffer x = Buffer::zeros({4, 8}, DType::Float32, stream);
  Buffer w = Buffer::zeros({7}, DType::Float32, stream);
  Buffer y = Buffer::zeros({4, 8}, DType::Float32, stream);
  EXPECT_THROW(rmsnorm_forward(x, w, y, 1e-6f, stream), ShapeError);
  Buffer wi = Buffer::zeros({8}, DType::Int32, stream);
  EXPECT_THROW(rmsnorm_forward(x, wi, y, 1e-6f, stream), DtypeError);
}

TEST(RmsNorm, CudaMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Device gpu(DeviceType::CUDA, 0);
  // 2560: the float4 path; 33: the scalar path.
  for (auto [rows, cols] : {std::pair{513, 2560}, std::pair{9, 33}}) {
    auto x = random_normal(size_t(rows) * cols, 3.0f);
    auto w = random_normal(cols);
    auto y = run_rmsnorm(gpu, x, w, rows, cols, 1e-6f);
    EXPECT_LT(test::relative_error(y, rmsnorm_reference(x, w, rows, cols, 1e-6)), 1e-6) << rows << "x" << cols;
  }
}

TEST(Buffer, CudaCopiesAndMixedDevicesAreRejected) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Device gpu(DeviceType::CUDA, 0);
  Stream stream(gpu);
  auto data = random_normal(1000);
  Buffer g = Buffer::empty({1000}, DType::Float32, gpu);
  g.copy_from_host(data.data(), stream);
  Buffer g2 = Buffer::empty({1000}, DType::Float32, gpu);
  g2.copy_from(g, stream);
  std::vector<float> back(1000);
  g2.copy_to_host(back.data(), stream);
  EXPECT_EQ(back, data);
  Buffer w = Buffer::zeros({1000}, DType::Float32, Stream(Device()));
  Buffer x2 = Buffer::zeros({1, 1000}, DType::Float32, stream);
  Buffer y2 = Buffer::zeros({1, 1000}, DType::Float32, stream);
  EXPECT_THROW(rmsnorm_forward(x2, w, y2, 1e-6f, stream), DeviceError);
  // bf16 fill on the device: 1.5 is exact in bf16.
  Buffer h = Buffer::empty({3}, DType::BFloat16, gpu);
  h.fill(1.5, stream);
  std::uint16_t bits[3];
  h.copy_to_host(bits, stream);
  for (auto b : bits) EXPECT_EQ(b, 0x3fc0);
}

TEST(Buffer, CudaFillWritesExactlyItsViewAtAnyAlignment) {
  // Views starting at every element offset of a 16-byte line, lengths around the vectorized body,
  // zero (cudaMemsetAsync) and other patterns (vectorized kernel): the view holds the value, the
  // elements on both sides keep theirs.
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Device gpu(DeviceType::CUDA, 0);
  Stream stream(gpu);
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float16, DType::Int32, DType::UInt8}) {
    const std::size_t es = dtype_size(dtype);
    for (double value : {0.0, 7.0, -3.0}) {
      if (dtype == DType::UInt8 && value < 0) continue;
      for (std::int64_t offset = 0; offset < 16 / static_cast<std::int64_t>(es); ++offset) {
        for (std::int64_t n : {1, 3, 8, 37, 1000}) {
          const std::int64_t total = offset + n + 16;
          Buffer b = Buffer::empty({total}, dtype, gpu);
          std::vector<std::uint8_t> before(static_cast<std::size_t>(total) * es);
          for (std::size_t i = 0; i < before.size(); ++i) before[i] = static_cast<std::uint8_t>(i * 7 + 1);
          b.copy_from_host(before.data(), stream);
          b.view(offset, {n}).fill(value, stream);
          Buffer one = Buffer::empty({1}, dtype, Device());  // the CPU backend's bit pattern of the value
          one.fill(value, Stream(Device()));
          std::vector<std::uint8_t> after(before.size());
          b.copy_to_host(after.data(), stream);
          const auto* want = static_cast<const std::uint8_t*>(one.data());
          for (std::int64_t i = 0; i < total; ++i) {
            const bool inside = i >= offset && i < offset + n;
            for (std::size_t k = 0; k < es; ++k) {
              const std::size_t at = static_cast<std::size_t>(i) * es + k;
              ASSERT_EQ(after[at], inside ? want[k] : before[at])
                  << dtype_name(dtype) << " value " << value << " offset " << offset << " n " << n << " element " << i;
            }
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace cudablocks
