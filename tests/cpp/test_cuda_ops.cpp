// The CUDA backend's block ops against the CPU backend (the reference), through the Backend
// interface: RMSNorm backward, GEMM in its three precisions, bias add and backward, residual add,
// QK-norm + RoPE forward and backward, SwiGLU forward and backward.
//
// Sizes are those of a Qwen3-4B layer (hidden 2560, 32 q / 8 kv heads of 128, intermediate 9728,
// ~850 packed tokens) plus small odd shapes for the scalar (unvectorised) paths. Inputs are fresh
// random numbers each run (the seed is printed); write-only outputs are poisoned with NaN first so
// that an unwritten element fails; accumulated outputs start from random values.
// Tolerances (relative L2): fp32 forward 1e-5, backward 1e-4; GEMM TF32 2e-3, BF16 1e-2.
#include <gtest/gtest.h>

#if CUDABLOCKS_WITH_CUDA

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "core/float_bits.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/optimizer.hpp"
#include "cudablocks/stream.hpp"
#include "support.hpp"

#if CUDABLOCKS_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/elementwise.cuh"
#endif

namespace cudablocks {
namespace {

using test::random_normal;
using test::relative_error;
using Vec = std::vector<float>;

constexpr double kForwardTol = 1e-5;
constexpr double kBackwardTol = 1e-4;

// One device's backend, stream and helpers to move vectors in and out of its buffers.
struct Env {
  Device device;
  const Backend& backend;
  Stream stream;

  explicit Env(const Device& d) : device(d), backend(backend_for(d)), stream(d) {}

  Buffer upload(const Vec& v) {
    Buffer b = Buffer::empty({static_cast<std::int64_t>(v.size())}, DType::Float32, device);
    b.copy_from_host(v.data(), stream);
    return b;
  }
  Buffer upload(const std::vector<std::int32_t>& v) {
    Buffer b = Buffer::empty({static_cast<std::int64_t>(v.size())}, DType::Int32, device);
    b.copy_from_host(v.data(), stream);
    return b;
  }
  Buffer poisoned(std::size_t n) {
    Buffer b = Buffer::empty({static_cast<std::int64_t>(n)}, DType::Float32, device);
    b.fill(NAN, stream);
    return b;
  }
  Vec download(const Buffer& b) {
    Vec v(static_cast<std::size_t>(b.numel()));
    b.copy_to_host(v.data(), stream);
    stream.synchronize();
    return v;
  }
};

Device gpu() { return Device(DeviceType::CUDA, 0); }

// Runs f(env) -> outputs on the CPU and on the GPU.
template <typename F>
std::pair<std::vector<Vec>, std::vector<Vec>> on_both(F&& f) {
  Env cpu{Device()};
  Env cuda{gpu()};
  return {f(cpu), f(cuda)};
}

void expect_close(const std::vector<Vec>& cpu, const std::vector<Vec>& cuda, double tol, const std::string& what) {
  ASSERT_EQ(cpu.size(), cuda.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double err = relative_error(cuda[i], cpu[i]);
    EXPECT_LT(err, tol) << what << ", output " << i;
  }
}

// The same fp32 arithmetic on the same values, in two kernel instantiations: equal up to an FMA
// contraction the compiler may choose differently (a few fp32 ulps, rarely).
void expect_same_values(const Vec& got, const Vec& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  std::size_t exact = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    ASSERT_LE(std::abs(got[i] - want[i]), 1e-6f * std::abs(want[i]) + 1e-30f) << what << " element " << i;
    exact += got[i] == want[i];
  }
  EXPECT_GE(static_cast<double>(exact), 0.999 * static_cast<double>(got.size())) << what;
}

// bf16 buffers: bit patterns.
using Bits = std::vector<std::uint16_t>;

Buffer upload_bits(Env& e, const Bits& v) {
  Buffer b = Buffer::empty({static_cast<std::int64_t>(v.size())}, DType::BFloat16, e.device);
  b.copy_from_host(v.data(), e.stream);
  return b;
}

Bits download_bits(Env& e, const Buffer& b) {
  Bits v(static_cast<std::size_t>(b.numel()));
  b.copy_to_host(v.data(), e.stream);
  e.stream.synchronize();
  return v;
}

Vec positive(std::size_t n) {  // rstd-like factors
  Vec v = random_normal(n, 0.3f);
  for (auto& x : v) x = 1.0f + std::fabs(x);
  return v;
}

// ---------------------------------------------------------------------------------------------

TEST(CudaOps, RmsNormBackwardMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  struct Case { std::int64_t rows, cols; };
  enum class Residual { None, InPlace, Separate };
  for (Case c : {Case{850, 2560}, Case{3001, 2560}, Case{37, 33}, Case{5, 1000}}) {
    for (Residual mode : {Residual::None, Residual::InPlace, Residual::Separate}) {
      const auto n = static_cast<std::size_t>(c.rows * c.cols);
      const Vec dy = random_normal(n), x = random_normal(n, 2.0f), w = random_normal(c.cols);
      const Vec rstd = positive(c.rows), dx0 = random_normal(n), dw0 = random_normal(c.cols);
      auto [ref, out] = on_both([&](Env& e) {
        Buffer dyb = e.upload(dy), xb = e.upload(x), wb = e.upload(w), rb = e.upload(rstd), dwb = e.upload(dw0);
        Buffer res = e.upload(dx0);
        Buffer dxb = mode == Residual::InPlace ? res : e.poisoned(n);
        const float* residual = mode == Residual::None ? nullptr : res.data_as<float>();
        e.backend.rmsnorm_backward(dyb.data_as<float>(), xb.data_as<float>(), wb.data_as<float>(), rb.data_as<float>(),
                                   residual, dxb.data_as<float>(), nullptr, dwb.data_as<float>(), c.rows, c.cols,
                                   e.stream);
        // A frozen norm (dw == nullptr): the same dx (from the same residual), and with dx16 that dx
        // rounded to bf16 as well.
        Buffer res2 = e.upload(dx0);
        Buffer dx2 = mode == Residual::InPlace ? res2 : e.poisoned(n);
        Buffer dx16 = upload_bits(e, Bits(n, 0xffff));
        e.backend.rmsnorm_backward(dyb.data_as<float>(), xb.data_as<float>(), wb.data_as<float>(), rb.data_as<float>(),
                                   mode == Residual::None ? nullptr : res2.data_as<float>(), dx2.data_as<float>(),
                                   dx16.data_as<std::uint16_t>(), nullptr, c.rows, c.cols, e.stream);
        const std::string on = std::string(e.backend.name()) + " frozen norm";
        const Vec frozen = e.download(dx2);
        expect_same_values(frozen, e.download(dxb), on + " dx");
        const Bits bits = download_bits(e, dx16);
        std::size_t unrounded = 0;
        for (std::size_t i = 0; i < n; ++i) unrounded += bits[i] != float_to_bf16_bits(frozen[i]);
        EXPECT_EQ(unrounded, 0u) << on << ": dx16 elements other than dx rounded to bf16";
        return std::vector<Vec>{e.download(dxb), e.download(dwb)};
      });
      expect_close(ref, out, kBackwardTol,
                   std::to_string(c.rows) + "x" + std::to_string(c.cols) + " residual mode " +
                       std::to_string(static_cast<int>(mode)));
    }
  }
}

// ---------------------------------------------------------------------------------------------

struct GemmCase {
  bool ta, tb;
  std::int64_t m, n, k;
  float alpha, beta;
};

TEST(CudaOps, GemmMatchesCpuInEveryPrecision) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const std::vector<GemmCase> cases = {
      {false, true, 850, 2560, 2560, 1.0f, 0.0f},   // forward: X W^T
      {false, false, 850, 2560, 2048, 1.0f, 0.0f},  // dX = dY W
      {true, false, 2560, 2048, 850, 1.0f, 1.0f},   // dW += dY^T X
      {false, false, 37, 53, 29, 0.5f, 0.0f},      {false, true, 37, 53, 29, 1.0f, -1.5f},
      {true, false, 37, 53, 29, 2.0f, 0.0f},       {true, true, 37, 53, 29, 1.0f, 1.0f},
      {true, true, 1, 7, 300, 1.0f, 0.0f},
  };
  for (const GemmCase& g : cases) {
    const auto a = random_normal(static_cast<std::size_t>(g.m * g.k));
    const auto b = random_normal(static_cast<std::size_t>(g.k * g.n));
    const auto c0 = random_normal(static_cast<std::size_t>(g.m * g.n));
    auto run = [&](Env& e, Precision p) {
      Buffer ab = e.upload(a), bb = e.upload(b);
      Buffer cb = g.beta == 0.0f ? e.poisoned(c0.size()) : e.upload(c0);
      e.backend.gemm(g.ta, g.tb, g.m, g.n, g.k, g.alpha, ab.data_as<float>(), bb.data_as<float>(), g.beta,
                     cb.data_as<float>(), p, e.stream);
      return e.download(cb);
    };
    Env cpu{Device()};
    Env cuda{gpu()};
    const Vec ref = run(cpu, Precision::FP32);  // the CPU computes fp32 in every mode
    const std::string what = std::string(g.ta ? "T" : "N") + (g.tb ? "T" : "N") + " " + std::to_string(g.m) + "x" +
                             std::to_string(g.n) + "x" + std::to_string(g.k);
    EXPECT_LT(relative_error(run(cuda, Precision::FP32), ref), 1e-5) << what << " fp32";
    EXPECT_LT(relative_error(run(cuda, Precision::TF32), ref), 2e-3) << what << " tf32";
    EXPECT_LT(relative_error(run(cuda, Precision::BF16), ref), 1e-2) << what << " bf16";
  }
}

TEST(CudaOps, GemmFp32IsNotTf32) {
  // TF32 rounds operands to 10 mantissa bits: 1 + 2^-13 becomes 1. IEEE fp32 keeps it.
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Env cuda{gpu()};
  const std::int64_t m = 64, n = 64, k = 64;
  Buffer a = cuda.upload(Vec(m * k, 1.0f + 1.0f / 8192.0f)), b = cuda.upload(Vec(k * n, 1.0f));
  Buffer c = cuda.poisoned(m * n);
  cuda.backend.gemm(false, false, m, n, k, 1.0f, a.data_as<float>(), b.data_as<float>(), 0.0f, c.data_as<float>(),
                    Precision::FP32, cuda.stream);
  for (float v : cuda.download(c)) ASSERT_EQ(v, 64.0f + 64.0f / 8192.0f);
}

// ---------------------------------------------------------------------------------------------

// ---- bf16 operands ----------------------------------------------------------------------------

using test::bf16_of;

// The producers that write their output transposed (tf32 weight gradients' operands): on the GPU
// exactly the transpose of the plain kernel's output (RMSNorm's from the forward's rstd), and close
// to the CPU's. Shapes with partial tiles, and a Qwen3-4B MLP's at 850 tokens.
TEST(CudaOps, TransposedRmsNormAndSwigluAreTheTransposedOutputs) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{850, 2560}, {850, 9728}, {67, 33}, {130, 200}}) {
    const std::string what = std::to_string(rows) + "x" + std::to_string(cols);
    const auto n = static_cast<std::size_t>(rows * cols);
    const Vec x = random_normal(n, 2.0f), w = random_normal(static_cast<std::size_t>(cols));
    const Vec gate_up = random_normal(2 * n, 3.0f);
    auto [ref, out] = on_both([&](Env& e) {
      Buffer xb = e.upload(x), wb = e.upload(w), gub = e.upload(gate_up);
      Buffer y = e.poisoned(n), rstd = e.poisoned(static_cast<std::size_t>(rows)), act = e.poisoned(n);
      e.backend.rmsnorm_forward(xb.data_as<float>(), wb.data_as<float>(), y.data_as<float>(), rstd.data_as<float>(),
                                rows, cols, 1e-6f, e.stream);
      e.backend.swiglu_forward(gub.data_as<float>(), act.data_as<float>(), rows, cols, e.stream);
      Buffer y_t = e.poisoned(n), act_t = e.poisoned(n), y_tt = e.poisoned(n), act_tt = e.poisoned(n);
      e.backend.rmsnorm_forward_transposed(xb.data_as<float>(), wb.data_as<float>(), rstd.data_as<float>(),
                                           y_t.data_as<float>(), rows, cols, e.stream);
      e.backend.swiglu_forward_transposed(gub.data_as<float>(), act_t.data_as<float>(), rows, cols, e.stream);
      e.backend.transpose(y.data_as<float>(), rows, cols, cols, y_tt.data_as<float>(), e.stream);
      e.backend.transpose(act.data_as<float>(), rows, cols, cols, act_tt.data_as<float>(), e.stream);
      const std::string on = what + " (" + e.backend.name() + ")";
      EXPECT_EQ(e.download(y_t), e.download(y_tt)) << on << " rmsnorm";
      EXPECT_EQ(e.download(act_t), e.download(act_tt)) << on << " swiglu";
      return std::vector<Vec>{e.download(y_t), e.download(act_t)};
    });
    EXPECT_LT(relative_error(out[0], ref[0]), kForwardTol) << what << " rmsnorm";
    EXPECT_LT(relative_error(out[1], ref[1]), kForwardTol) << what << " swiglu";
  }
}

TEST(CudaOps, TransposeMatchesCpuBitwise) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Env cpu{Device()};
  Env cuda{gpu()};
  // Whole tiles (the block's sizes), ragged edges on both sides, one row, and a strided half of
  // a [T, 2 I] matrix as the tf32 weight gradient reads it.
  for (auto [rows, cols, ld] : {std::tuple<std::int64_t, std::int64_t, std::int64_t>{512, 2560, 2560},
                                {1, 1, 1}, {1, 300, 300}, {77, 131, 131}, {600, 97, 2 * 97}, {129, 64, 70}}) {
    const Vec x = random_normal(static_cast<std::size_t>(rows * ld));
    Vec want(static_cast<std::size_t>(rows * cols));
    cpu.backend.transpose(x.data(), rows, cols, ld, want.data(), cpu.stream);
    Buffer xb = cuda.upload(x);
    Buffer yb = cuda.poisoned(want.size());
    cuda.backend.transpose(xb.data_as<float>(), rows, cols, ld, yb.data_as<float>(), cuda.stream);
    const Vec got = cuda.download(yb);
    for (std::size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(float_to_bits(got[i]), float_to_bits(want[i])) << rows << "x" << cols << " ld " << ld << " at " << i;
    }
  }
}

TEST(CudaOps, ToBf16MatchesCpuBitwise) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Env cuda{gpu()};
  for (std::size_t n : {std::size_t{850} * 2560, std::size_t{1}, std::size_t{7}, std::size_t{4099}}) {
    Vec x = random_normal(n, 3.0f);
    if (n > 8) {  // ties, specials
      x[0] = 1.0f + 1.0f / 256;
      x[1] = 1.0f + 3.0f / 256;
      x[2] = INFINITY;
      x[3] = -0.0f;
      x[4] = 1e-40f;
    }
    const Bits want = bf16_of(x);
    Buffer xb = cuda.upload(x);
    // Offsets 0 (vectorised) and 1 (unaligned: the scalar kernel).
    for (std::int64_t offset : {0, 1}) {
      if (static_cast<std::size_t>(offset) >= n) continue;
      const std::int64_t len = static_cast<std::int64_t>(n) - offset;
      Buffer yb = Buffer::empty({len}, DType::BFloat16, cuda.device);
      cuda.backend.to_bf16(xb.data_as<float>() + offset, yb.data_as<std::uint16_t>(), len, cuda.stream);
      const Bits got = download_bits(cuda, yb);
      EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin() + offset)) << "n " << n << " offset " << offset;
      // And back (exact), from bf16 at offsets 0 (vectorised) and 1 (the scalar kernel).
      for (std::int64_t back : {0, 1}) {
        if (back >= len) continue;
        Buffer zb = cuda.poisoned(static_cast<std::size_t>(len - back));
        cuda.backend.from_bf16(yb.data_as<std::uint16_t>() + back, zb.data_as<float>(), len - back, cuda.stream);
        const Vec wide = cuda.download(zb);
        for (std::int64_t i = 0; i < len - back; ++i) {
          ASSERT_EQ(float_to_bits(wide[i]), static_cast<std::uint32_t>(got[back + i]) << 16)
              << "from_bf16, n " << n << " offset " << offset << " + " << back << " element " << i;
        }
      }
    }
  }
}

TEST(CudaOps, AddLowRankMatchesCpu) {
  // The same exact products summed in fp32 in different orders (the CPU's sequence, the tensor
  // core's): a few fp32 ulps apart (near cancellations make single bf16 outputs differ by more, so
  // those are checked as CUDA's own rounded fp32 sums). Qwen3-4B sizes (q's
  // LoRA term at rank 16, gate/up's block-diagonal rank 32, the input-gradient term with A; past
  // rank 32 v's fragments are reloaded per tile) and odd shapes and offsets for the unaligned
  // paths; fp32 out in place and bf16 out, both poisoned or random first; and the term alone (no c).
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  // offset: of c and out; bias_offset: of bias alone (a misaligned bias with aligned c and out);
  // u_offset: of u alone (an even rank with u not 4-byte aligned: the 16-bit reads on full tiles).
  struct Case {
    std::int64_t rows, cols;
    int rank;
    bool a_layout, bias;
    std::int64_t offset, bias_offset, u_offset;
  };
  for (Case k : {Case{850, 4096, 16, false, true, 0, 0, 0}, Case{850, 19456, 32, false, false, 0, 0, 0},
                 Case{850, 2560, 32, true, false, 0, 0, 0}, Case{1000, 4096, 40, true, true, 0, 0, 0},
                 Case{33, 45, 70, false, true, 0, 0, 0}, Case{33, 45, 5, true, true, 0, 0, 0},
                 Case{31, 64, 3, false, false, 1, 0, 0}, Case{5, 8, 0, false, true, 0, 0, 0},
                 Case{100, 512, 16, false, true, 0, 1, 0}, Case{100, 512, 16, false, true, 0, 0, 1}}) {
    const auto n = static_cast<std::size_t>(k.rows * k.cols);
    const Vec c = random_normal(n + k.offset);
    const Vec bias = random_normal(static_cast<std::size_t>(k.cols + k.bias_offset));
    // (rank 0: one unread element each; the block passes nullptr then)
    const Bits u =
        bf16_of(random_normal(static_cast<std::size_t>(std::max<std::int64_t>(1, k.rows * k.rank) + k.u_offset)));
    const Bits v = bf16_of(random_normal(static_cast<std::size_t>(std::max<std::int64_t>(1, k.cols * k.rank))));
    const std::int64_t v_row = k.a_layout ? 1 : k.rank, v_col = k.a_layout ? k.cols : 1;
    auto [ref, out] = on_both([&](Env& e) {
      Buffer cb = e.upload(c), ub = upload_bits(e, u), vb = upload_bits(e, v), bb = e.upload(bias);
      Buffer ob = Buffer::empty({static_cast<std::int64_t>(n + k.offset)}, DType::BFloat16, e.device);
      e.backend.fill(ob.data(), n + k.offset, 2, 0xffffu, e.stream);  // NaN
      const float* b = k.bias ? bb.data_as<float>() + k.bias_offset : nullptr;
      const std::uint16_t* u0 = k.rank > 0 ? ub.data_as<std::uint16_t>() + k.u_offset : nullptr;
      const std::uint16_t* v0 = k.rank > 0 ? vb.data_as<std::uint16_t>() : nullptr;
      float* c0 = cb.data_as<float>() + k.offset;
      e.backend.add_low_rank(c0, b, u0, v0, v_row, v_col, k.rows, k.cols, k.rank, ob.data_as<std::uint16_t>() + k.offset,
                             e.stream);
      e.backend.add_low_rank(c0, b, u0, v0, v_row, v_col, k.rows, k.cols, k.rank, c0, e.stream);
      // Without c: the term (and bias) alone, in fp32 and in bf16 (the NF4 block's main use).
      Buffer tb = e.poisoned(n);
      Buffer tb16 = Buffer::empty({static_cast<std::int64_t>(n)}, DType::BFloat16, e.device);
      e.backend.fill(tb16.data(), n, 2, 0xffffu, e.stream);
      e.backend.add_low_rank(nullptr, b, u0, v0, v_row, v_col, k.rows, k.cols, k.rank, tb.data_as<float>(), e.stream);
      e.backend.add_low_rank(nullptr, b, u0, v0, v_row, v_col, k.rows, k.cols, k.rank, tb16.data_as<std::uint16_t>(),
                             e.stream);
      return std::vector<Vec>{e.download(cb), test::float_of(download_bits(e, ob)), e.download(tb),
                              test::float_of(download_bits(e, tb16))};
    });
    const std::string what = std::to_string(k.rows) + "x" + std::to_string(k.cols) + " rank " + std::to_string(k.rank);
    EXPECT_LT(relative_error(out[0], ref[0]), 1e-6) << what;
    for (std::size_t i = 0; i < k.offset; ++i) EXPECT_EQ(out[0][i], c[i]) << what << ": wrote before the output";
    // The bf16 output is CUDA's own fp32 sum rounded once (the same accumulators either way).
    for (std::size_t i = k.offset; i < n + k.offset; ++i) {
      ASSERT_EQ(out[1][i], bf16_bits_to_float(float_to_bf16_bits(out[0][i]))) << what << " bf16 element " << i;
    }
    const Vec out16(out[1].begin() + k.offset, out[1].end()), ref16(ref[1].begin() + k.offset, ref[1].end());
    EXPECT_LT(relative_error(out16, ref16), 1e-2) << what;
    EXPECT_LT(relative_error(out[2], ref[2]), 1e-6) << what << " without c";
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(out[3][i], bf16_bits_to_float(float_to_bf16_bits(out[2][i]))) << what << " bf16 without c, " << i;
    }
  }
}

TEST(CudaOps, GemmBf16MatchesCpu) {
  // Both compute the exact products of the bf16 values in fp32; only the order of the sums differs.
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const std::vector<GemmCase> cases = {
      {false, true, 850, 2560, 2560, 1.0f, 0.0f},   // forward: X W^T
      {false, false, 850, 2560, 2048, 1.0f, 0.0f},  // dX = dY W
      {true, false, 2560, 2048, 850, 1.0f, 1.0f},   // dW += dY^T X
      {false, false, 37, 53, 29, 0.5f, 0.0f},      {false, true, 37, 53, 29, 1.0f, -1.5f},
      {true, false, 37, 53, 29, 2.0f, 0.0f},       {true, true, 37, 53, 29, 1.0f, 1.0f},
      {true, true, 1, 7, 300, 1.0f, 0.0f},
  };
  for (const GemmCase& g : cases) {
    const Bits a = bf16_of(random_normal(static_cast<std::size_t>(g.m * g.k)));
    const Bits b = bf16_of(random_normal(static_cast<std::size_t>(g.k * g.n)));
    const auto c0 = random_normal(static_cast<std::size_t>(g.m * g.n));
    auto [ref, out] = on_both([&](Env& e) {
      Buffer ab = upload_bits(e, a), bb = upload_bits(e, b);
      Buffer cb = g.beta == 0.0f ? e.poisoned(c0.size()) : e.upload(c0);
      e.backend.gemm_bf16(g.ta, g.tb, g.m, g.n, g.k, g.alpha, ab.data_as<std::uint16_t>(), bb.data_as<std::uint16_t>(),
                          g.beta, cb.data_as<float>(), e.stream);
      return std::vector<Vec>{e.download(cb)};
    });
    expect_close(ref, out, kForwardTol,
                 std::string(g.ta ? "T" : "N") + (g.tb ? "T" : "N") + " " + std::to_string(g.m) + "x" +
                     std::to_string(g.n) + "x" + std::to_string(g.k));
  }
}

TEST(CudaOps, GemmAddMatchesCpu) {
  // The addend in another buffer (cuBLASLt, C != D, at offsets that are not 256-byte aligned; at
  // 4-byte alignment the product and a separate add where cuBLASLt has no algorithm) or in c itself
  // (beta 1), for fp32 operands in each precision and for bf16 operands.
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const std::vector<GemmCase> cases = {
      {false, true, 850, 2560, 2560, 1.0f, 1.0f},  // the blocks' residual products: X W^T + R
      {false, true, 37, 53, 29, 0.5f, 1.0f},       {false, false, 37, 53, 29, 1.0f, 1.0f},
      {true, false, 37, 53, 29, 2.0f, 1.0f},       {true, true, 1, 7, 300, 1.0f, 1.0f},
      {false, true, 5, 7, 0, 1.0f, 1.0f},  // K = 0: c = addend
  };
  for (const GemmCase& g : cases) {
    for (int offset : {0, 1, 4}) {  // floats into each buffer: 4- or 16-byte instead of 256-byte alignment
      for (bool in_place : {false, true}) {
        const auto a = random_normal(static_cast<std::size_t>(g.m * g.k));
        const auto b = random_normal(static_cast<std::size_t>(g.k * g.n));
        const auto addend = random_normal(static_cast<std::size_t>(g.m * g.n));
        const std::string what = std::string(g.ta ? "T" : "N") + (g.tb ? "T" : "N") + " " + std::to_string(g.m) +
                                 "x" + std::to_string(g.n) + "x" + std::to_string(g.k) + " offset " +
                                 std::to_string(offset) + (in_place ? " in place" : "");
        auto pad = [&](const Vec& v) {
          Vec p(static_cast<std::size_t>(offset), 0.0f);
          p.insert(p.end(), v.begin(), v.end());
          return p;
        };
        auto run = [&](Env& e, Precision p, bool bf16_operands) {
          Buffer ab = e.upload(pad(a)), bb = e.upload(pad(b)), rb = e.upload(pad(addend));
          Buffer cb = in_place ? rb : e.poisoned(addend.size() + offset);
          float* c = cb.data_as<float>() + offset;
          const float* r = rb.data_as<float>() + offset;
          if (bf16_operands) {
            Buffer a16 = upload_bits(e, bf16_of(a)), b16 = upload_bits(e, bf16_of(b));
            e.backend.gemm_bf16_add(g.ta, g.tb, g.m, g.n, g.k, g.alpha, a16.data_as<std::uint16_t>(),
                                    b16.data_as<std::uint16_t>(), r, c, e.stream);
          } else {
            e.backend.gemm_add(g.ta, g.tb, g.m, g.n, g.k, g.alpha, ab.data_as<float>() + offset,
                               bb.data_as<float>() + offset, r, c, p, e.stream);
          }
          Vec out = e.download(cb);
          return Vec(out.begin() + offset, out.end());
        };
        Env cpu{Device()};
        Env cuda{gpu()};
        const Vec ref = run(cpu, Precision::FP32, false);
        EXPECT_LT(relative_error(run(cuda, Precision::FP32, false), ref), 1e-5) << what << " fp32";
        EXPECT_LT(relative_error(run(cuda, Precision::TF32, false), ref), 2e-3) << what << " tf32";
        EXPECT_LT(relative_error(run(cuda, Precision::BF16, true), run(cpu, Precision::FP32, true)), kForwardTol)
            << what << " bf16 operands";
      }
    }
  }
}

TEST(CudaOps, AdamwWritesTheBf16Copy) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  for (std::size_t n : {std::size_t{1} << 20, std::size_t{1003}}) {  // the tail path too
    const Vec p = random_normal(n), g = random_normal(n), m = random_normal(n, 0.1f);
    Vec v = random_normal(n, 0.1f);
    for (auto& e : v) e = e * e;
    AdamWHyper h;
    h.lr = 1e-2f;
    h.step = 5;
    auto [ref, out] = on_both([&](Env& e) {
      Buffer pb = e.upload(p), gb = e.upload(g), mb = e.upload(m), vb = e.upload(v);
      Buffer p16 = upload_bits(e, Bits(n, 0xffff));
      e.backend.adamw_step(pb.data_as<float>(), gb.data_as<float>(), mb.data_as<float>(), vb.data_as<float>(),
                           static_cast<std::int64_t>(n), h, nullptr, p16.data_as<std::uint16_t>(), e.stream);
      const Vec params = e.download(pb);
      const Bits copy = download_bits(e, p16);
      EXPECT_EQ(copy, bf16_of(params)) << e.backend.name() << " n " << n;
      return std::vector<Vec>{params};
    });
    expect_close(ref, out, kForwardTol, "adamw params n " + std::to_string(n));
  }
}

// bf16-output variants: the bf16 result is the fp32 op's result rounded (up to an FMA contraction
// that may differ between the two instantiations: at most one bf16 ulp, rarely), and close to the
// CPU's: within one bf16 ulp of its magnitude, plus a floor of 1e-5 of the largest output for the
// elements where the formula cancels (the SwiGLU gradient crosses zero near gate = -1.28, where
// fp32 rounding differences between the backends are amplified relative to the value).
void expect_rounded_from(const Bits& got, const Vec& fp32, const Bits& cpu, const std::string& what) {
  ASSERT_EQ(got.size(), fp32.size());
  float largest = 0.0f;
  for (std::uint16_t c : cpu) largest = std::max(largest, std::abs(bf16_bits_to_float(c)));
  std::size_t exact = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const int want = float_to_bf16_bits(fp32[i]);
    ASSERT_LE(std::abs(static_cast<int>(got[i]) - want), 1) << what << " element " << i;
    const float g = bf16_bits_to_float(got[i]), c = bf16_bits_to_float(cpu[i]);
    ASSERT_LE(std::abs(g - c), std::ldexp(std::abs(c), -7) + 1e-5f * largest) << what << " element " << i;
    exact += got[i] == want;
  }
  EXPECT_GE(static_cast<double>(exact), 0.999 * static_cast<double>(got.size())) << what;
}

TEST(CudaOps, RmsNormAndSwigluBf16OutputsAreTheRoundedFp32Outputs) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  struct Case { std::int64_t rows, cols; };
  for (Case c : {Case{850, 2560}, Case{37, 33}}) {
    const std::string what = std::to_string(c.rows) + "x" + std::to_string(c.cols);
    const auto n = static_cast<std::size_t>(c.rows * c.cols);
    const Vec x = random_normal(n, 2.0f), w = random_normal(c.cols);
    // gate_up as bf16-mode blocks keep it: bf16 values (the fp32 ops get the same values widened).
    const Bits gu_bits = bf16_of(random_normal(2 * n, 2.0f));
    Vec gate_up(gu_bits.size());
    for (std::size_t i = 0; i < gate_up.size(); ++i) gate_up[i] = bf16_bits_to_float(gu_bits[i]);
    // dout likewise (bf16 mode's down product writes it in bf16).
    const Bits dout_bits = bf16_of(random_normal(n));
    Vec dout(dout_bits.size());
    for (std::size_t i = 0; i < dout.size(); ++i) dout[i] = bf16_bits_to_float(dout_bits[i]);
    std::vector<Bits> cpu_bits;
    for (Env* e : {new Env{Device()}, new Env{gpu()}}) {
      std::unique_ptr<Env> env(e);
      Buffer xb = e->upload(x), wb = e->upload(w), gub = e->upload(gate_up), db = e->upload(dout);
      Buffer gu16 = upload_bits(*e, gu_bits), d16 = upload_bits(*e, dout_bits);
      Buffer y = e->poisoned(n), y16 = upload_bits(*e, Bits(n, 0xffff));
      Buffer r1 = e->poisoned(c.rows), r2 = e->poisoned(c.rows);
      e->backend.rmsnorm_forward(xb.data_as<float>(), wb.data_as<float>(), y.data_as<float>(), r1.data_as<float>(),
                                 c.rows, c.cols, 1e-6f, e->stream);
      e->backend.rmsnorm_forward_bf16(xb.data_as<float>(), wb.data_as<float>(), y16.data_as<std::uint16_t>(),
                                      r2.data_as<float>(), c.rows, c.cols, 1e-6f, e->stream);
      Buffer a = e->poisoned(n), a16 = upload_bits(*e, Bits(n, 0xffff));
      e->backend.swiglu_forward(gub.data_as<float>(), a.data_as<float>(), c.rows, c.cols, e->stream);
      e->backend.swiglu_forward(gu16.data_as<std::uint16_t>(), a16.data_as<std::uint16_t>(), c.rows, c.cols,
                                e->stream);
      Buffer a_from16 = e->poisoned(n);
      e->backend.swiglu_forward(gu16.data_as<std::uint16_t>(), a_from16.data_as<float>(), c.rows, c.cols, e->stream);
      Buffer dg = e->poisoned(2 * n), dg16 = upload_bits(*e, Bits(2 * n, 0xffff));
      e->backend.swiglu_backward(db.data_as<float>(), gub.data_as<float>(), dg.data_as<float>(), c.rows, c.cols,
                                 e->stream);
      e->backend.swiglu_backward(d16.data_as<std::uint16_t>(), gu16.data_as<std::uint16_t>(),
                                 dg16.data_as<std::uint16_t>(), c.rows, c.cols, e->stream);
      Buffer dg_from16 = e->poisoned(2 * n);
      e->backend.swiglu_backward(d16.data_as<std::uint16_t>(), gu16.data_as<std::uint16_t>(),
                                 dg_from16.data_as<float>(), c.rows, c.cols, e->stream);
      // bf16 inputs read into fp32 outputs: the fp32 op on the same values.
      expect_same_values(e->download(a_from16), e->download(a), what + " swiglu forward from bf16");
      expect_same_values(e->download(dg_from16), e->download(dg), what + " swiglu backward from bf16");
      const std::vector<Bits> bits = {download_bits(*e, y16), download_bits(*e, a16), download_bits(*e, dg16)};
      const std::vector<Vec> fp32 = {e->download(y), e->download(a), e->download(dg)};
      EXPECT_EQ(e->download(r1), e->download(r2)) << what << " rstd";
      if (cpu_bits.empty()) {
        cpu_bits = bits;
        for (std::size_t i = 0; i < bits.size(); ++i) EXPECT_EQ(bits[i], bf16_of(fp32[i])) << what << " cpu " << i;
      } else {
        expect_rounded_from(bits[0], fp32[0], cpu_bits[0], what + " rmsnorm");
        expect_rounded_from(bits[1], fp32[1], cpu_bits[1], what + " swiglu forward");
        expect_rounded_from(bits[2], fp32[2], cpu_bits[2], what + " swiglu backward");
      }
    }
  }
}

TEST(CudaOps, GemmBf16ToBf16IsTheRoundedProduct) {
  // Against the CPU's exact products summed in fp32, then rounded: the sums' order differs, so a
  // value near a rounding boundary may round the other way (one bf16 ulp), and a sum that cancels
  // to near zero differs by the fp32 error of the sum (a floor of 1e-5 of the largest output);
  // mostly equal.
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const std::vector<GemmCase> cases = {
      {false, true, 850, 2048, 2560, 1.0f, 0.0f},  // forward: X W^T (bf16 mode's gate_up)
      {false, false, 37, 53, 29, 0.5f, 0.0f},
      {true, true, 1, 7, 300, 1.0f, 0.0f},
  };
  // gemm_bf16_to_bf16_add likewise, onto random bf16 values of c (cuBLAS's epilogue, beta 1).
  for (bool add : {false, true}) {
    for (const GemmCase& g : cases) {
      const std::string what = std::string(add ? "add " : "") + std::to_string(g.m) + "x" + std::to_string(g.n) + "x" +
                               std::to_string(g.k);
      const Bits a = bf16_of(random_normal(static_cast<std::size_t>(g.m * g.k)));
      const Bits b = bf16_of(random_normal(static_cast<std::size_t>(g.k * g.n)));
      const auto mn = static_cast<std::size_t>(g.m * g.n);
      const Bits c0 = add ? bf16_of(random_normal(mn, 10.0f)) : Bits(mn, 0xffff);
      std::vector<Bits> results;
      for (Env* e : {new Env{Device()}, new Env{gpu()}}) {
        std::unique_ptr<Env> env(e);
        Buffer ab = upload_bits(*e, a), bb = upload_bits(*e, b);
        Buffer c16 = upload_bits(*e, c0);
        if (add) {
          e->backend.gemm_bf16_to_bf16_add(g.ta, g.tb, g.m, g.n, g.k, g.alpha, ab.data_as<std::uint16_t>(),
                                           bb.data_as<std::uint16_t>(), c16.data_as<std::uint16_t>(), e->stream);
        } else {
          e->backend.gemm_bf16_to_bf16(g.ta, g.tb, g.m, g.n, g.k, g.alpha, ab.data_as<std::uint16_t>(),
                                       bb.data_as<std::uint16_t>(), c16.data_as<std::uint16_t>(), e->stream);
        }
        results.push_back(download_bits(*e, c16));
      }
      const Bits& cpu = results[0];
      const Bits& cuda = results[1];
      ASSERT_EQ(cuda.size(), cpu.size());
      float largest = 0.0f;
      for (std::uint16_t c : cpu) largest = std::max(largest, std::abs(bf16_bits_to_float(c)));
      // cuBLAS's epilogue may round the product to bf16 before adding c (as a sum of two bf16
      // outputs does): one more bf16 rounding of the product's size is allowed with add.
      std::size_t exact = 0;
      for (std::size_t i = 0; i < cpu.size(); ++i) {
        const float got = bf16_bits_to_float(cuda[i]), want = bf16_bits_to_float(cpu[i]);
        const float product = add ? want - bf16_bits_to_float(c0[i]) : 0.0f;
        ASSERT_LE(std::abs(got - want), std::ldexp(std::abs(want), -7) + std::ldexp(std::abs(product), -8) +
                                            1e-5f * largest)
            << what << " element " << i;
        exact += cuda[i] == cpu[i];
      }
      const double share = static_cast<double>(exact) / static_cast<double>(cpu.size());
      if (add) {
        std::cout << what << ": " << share << " of the elements equal to the CPU's single rounding\n";
      } else {
        EXPECT_GE(share, 0.98) << what;
      }
    }
  }
}

TEST(CudaOps, BiasAddAndBackwardMatchCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  struct Case { std::int64_t rows, cols; };
  for (Case c : {Case{850, 1024}, Case{850, 4096}, Case{40, 33}, Case{1000, 7}, Case{3, 128}}) {
    const auto n = static_cast<std::size_t>(c.rows * c.cols);
    const Vec y0 = random_normal(n), bias = random_normal(c.cols), dy = random_normal(n), db0 = random_normal(c.cols);
    auto [ref, out] = on_both([&](Env& e) {
      Buffer yb = e.upload(y0), bb = e.upload(bias), dyb = e.upload(dy), dbb = e.upload(db0);
      e.backend.add_bias(yb.data_as<float>(), bb.data_as<float>(), c.rows, c.cols, e.stream);
      e.backend.bias_backward(dyb.data_as<float>(), dbb.data_as<float>(), c.rows, c.cols, e.stream);
      return std::vector<Vec>{e.download(yb), e.download(dbb)};
    });
    const std::string what = std::to_string(c.rows) + "x" + std::to_string(c.cols);
    EXPECT_LT(relative_error(out[0], ref[0]), kForwardTol) << what << " add_bias";
    EXPECT_LT(relative_error(out[1], ref[1]), kBackwardTol) << what << " bias_backward";
  }
}

#if CUDABLOCKS_WITH_CUDA
// cuda::add is gemm_add's fallback (not a Backend op): exact fp32 adds, aligned, unaligned, aliased.
TEST(CudaOps, AddIsExactAlignedUnalignedAndAliased) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Env cuda{gpu()};
  const auto native = static_cast<cudaStream_t>(cuda.stream.handle());
  for (std::int64_t n : {std::int64_t{850} * 2560 + 3, std::int64_t{5}, std::int64_t{1}}) {
    const Vec a = random_normal(n + 1), b = random_normal(n + 1);
    for (int variant = 0; variant < 3; ++variant) {  // 0: aligned, 1: offset by one element, 2: out = a
      Buffer ab = cuda.upload(a), bb = cuda.upload(b), ob = cuda.poisoned(n + 1);
      const std::int64_t off = variant == 1 ? 1 : 0;
      float* dst = variant == 2 ? ab.data_as<float>() : ob.data_as<float>() + off;
      cudablocks::cuda::add(ab.data_as<float>() + off, bb.data_as<float>() + off, dst, n, native);
      const Vec result = cuda.download(variant == 2 ? ab : ob);
      std::size_t mismatches = 0;
      for (std::int64_t i = 0; i < n; ++i) mismatches += !(result[i + off] == a[i + off] + b[i + off]);
      EXPECT_EQ(mismatches, 0u) << "n " << n << " variant " << variant;
      if (variant == 1) EXPECT_TRUE(std::isnan(result[0])) << "n " << n << ": wrote before the view";
    }
  }
}
#endif  // CUDABLOCKS_WITH_CUDA

// ---------------------------------------------------------------------------------------------

// Positions restarting at 0 for each packed sequence.
std::vector<std::int32_t> packed_positions(const std::vector<int>& lengths) {
  std::vector<std::int32_t> pos;
  for (int len : lengths)
    for (int i = 0; i < len; ++i) pos.push_back(i);
  return pos;
}

struct RopeCase {
  std::vector<int> lengths;
  int heads, head_dim;
  bool norm;
};

TEST(CudaOps, QkNormRopeMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const float eps = 1e-6f, theta = 1000000.0f;
  const std::vector<RopeCase> cases = {
      {{300, 550}, 32, 128, true},  // q of Qwen3-4B
      {{300, 550}, 8, 128, true},   // k
      {{300, 550}, 8, 128, false},  // rope only (Qwen2-style)
      {{17, 4}, 3, 6, true},        // odd half: scalar path
      {{5, 6}, 3, 12, true},        // half not a multiple of 4: pairs
      {{9}, 5, 64, true},           // quads, 4 heads per warp, a partly idle warp
      {{40}, 2, 256, true},         // quads, one head per warp
      {{7}, 3, 512, true},          // quads, two chunks per lane
  };
  for (const RopeCase& rc : cases) {
    const auto pos = packed_positions(rc.lengths);
    const auto tokens = static_cast<std::int64_t>(pos.size());
    const auto n = static_cast<std::size_t>(tokens * rc.heads * rc.head_dim);
    const auto rows = static_cast<std::size_t>(tokens * rc.heads);
    // x holds bf16 values, so the bf16-input ops (bf16 mode's saved q and k) see the same numbers.
    const Bits x_bits = bf16_of(random_normal(n, 2.0f));
    Vec x(n);
    for (std::size_t i = 0; i < n; ++i) x[i] = bf16_bits_to_float(x_bits[i]);
    const Vec w = random_normal(rc.head_dim), dy = random_normal(n);
    const Vec dw0 = random_normal(rc.head_dim);
    const std::string what = std::to_string(rc.heads) + " heads x " + std::to_string(rc.head_dim) +
                             (rc.norm ? " norm" : " no norm");
    // The backward takes rstd from the CPU forward on both backends: the same inputs.
    Vec rstd_in(rows, 1.0f);
    auto [ref, out] = on_both([&](Env& e) {
      Buffer xb = e.upload(x), wb = e.upload(w), pb = e.upload(pos), yb = e.poisoned(n), rb = e.poisoned(rows);
      Buffer fb = e.upload(test::rope_inv_freq(rc.head_dim, theta));
      const float* wp = rc.norm ? wb.data_as<float>() : nullptr;
      e.backend.qk_norm_rope_forward(xb.data_as<float>(), wp, yb.data_as<float>(), rb.data_as<float>(),
                                     pb.data_as<std::int32_t>(), tokens, rc.heads, rc.head_dim, eps, fb.data_as<float>(),
                                     e.stream);
      Vec rstd = rc.norm ? e.download(rb) : Vec(rows, 0.0f);
      if (e.device.is_cpu()) rstd_in = rstd;
      Buffer rin = e.upload(rstd_in), dyb = e.upload(dy), dxb = e.poisoned(n), dwb = e.upload(dw0);
      e.backend.qk_norm_rope_backward(dyb.data_as<float>(), xb.data_as<float>(), wp, rin.data_as<float>(),
                                      dxb.data_as<float>(), dwb.data_as<float>(), pb.data_as<std::int32_t>(), tokens,
                                      rc.heads, rc.head_dim, fb.data_as<float>(), e.stream);
      // The backward reading x as bf16: the same values, the same arithmetic.
      Buffer x16 = upload_bits(e, x_bits), r2 = e.poisoned(rows), dx2 = e.poisoned(n);
      Buffer dw2 = e.upload(dw0);
      e.backend.qk_norm_rope_backward(dyb.data_as<float>(), x16.data_as<std::uint16_t>(), wp, rin.data_as<float>(),
                                      dx2.data_as<float>(), dw2.data_as<float>(), pb.data_as<std::int32_t>(), tokens,
                                      rc.heads, rc.head_dim, fb.data_as<float>(), e.stream);
      const std::string on = what + " (" + e.backend.name() + ", bf16 x)";
      expect_same_values(e.download(dx2), e.download(dxb), on + " dx");
      expect_same_values(e.download(dw2), e.download(dwb), on + " dw");
      // The forward from bf16 x to bf16 y, and dx in bf16 (bf16 mode's attention operands; dq, dk
      // without biases): the bf16 rounding of the same fp32 result (one ulp apart at most where the two instantiations contract
      // an FMA differently, rarely).
      auto expect_rounded = [&](const Buffer& bits16, const Buffer& fp32, const std::string& label) {
        const Bits got = download_bits(e, bits16);
        const Vec want = e.download(fp32);
        std::size_t exact = 0, far = 0;
        for (std::size_t i = 0; i < n; ++i) {
          const int w16 = float_to_bf16_bits(want[i]);
          far += std::abs(static_cast<int>(got[i]) - w16) > 1;
          exact += got[i] == w16;
        }
        EXPECT_EQ(far, 0u) << on << " " << label << ": elements more than one ulp from the rounded fp32 result";
        EXPECT_GE(static_cast<double>(exact), 0.999 * static_cast<double>(n)) << on << " " << label;
      };
      Buffer y16 = Buffer::empty({static_cast<std::int64_t>(n)}, DType::BFloat16, e.device);
      e.backend.qk_norm_rope_forward(x16.data_as<std::uint16_t>(), wp, y16.data_as<std::uint16_t>(),
                                     r2.data_as<float>(), pb.data_as<std::int32_t>(), tokens, rc.heads, rc.head_dim,
                                     eps, fb.data_as<float>(), e.stream);
      expect_rounded(y16, yb, "bf16 y");
      if (rc.norm) expect_same_values(e.download(r2), rstd, on + " rstd");
      Buffer dx16 = upload_bits(e, Bits(n, 0xffff)), dw4 = e.upload(dw0);
      e.backend.qk_norm_rope_backward(dyb.data_as<float>(), x16.data_as<std::uint16_t>(), wp, rin.data_as<float>(),
                                      dx16.data_as<std::uint16_t>(), dw4.data_as<float>(), pb.data_as<std::int32_t>(),
                                      tokens, rc.heads, rc.head_dim, fb.data_as<float>(), e.stream);
      expect_rounded(dx16, dx2, "bf16 dx");
      expect_same_values(e.download(dw4), e.download(dwb), on + " dw, bf16 dx");
      // A frozen norm (dw == nullptr): the same dx, no weight gradient taken.
      Buffer dx3 = e.poisoned(n);
      e.backend.qk_norm_rope_backward(dyb.data_as<float>(), xb.data_as<float>(), wp, rin.data_as<float>(),
                                      dx3.data_as<float>(), nullptr, pb.data_as<std::int32_t>(), tokens, rc.heads,
                                      rc.head_dim, fb.data_as<float>(), e.stream);
      expect_same_values(e.download(dx3), e.download(dxb), on + " dx, frozen norm");
      return std::vector<Vec>{e.download(yb), rstd, e.download(dxb), e.download(dwb)};
    });
    EXPECT_LT(relative_error(out[0], ref[0]), kForwardTol) << what << " y";
    if (rc.norm) EXPECT_LT(relative_error(out[1], ref[1]), kForwardTol) << what << " rstd";
    EXPECT_LT(relative_error(out[2], ref[2]), kBackwardTol) << what << " dx";
    EXPECT_LT(relative_error(out[3], ref[3]), kBackwardTol) << what << " dw";
  }
}

// Long positions (up to 8K): the angle is computed in fp32 as transformers does
// (float(pos) * inv_freq_fp32), so the result matches an fp64 evaluation of that fp32 angle
// closely; against exact fp64 angles (the CPU reference) the fp32 rounding of pos * inv_freq
// (~ulp(8000) = 5e-4 rad) shows as ~4e-5 relative.
TEST(CudaOps, RopeLongPositionsUseTransformersFp32Angles) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const int heads = 8, d = 128, half = d / 2;
  const float theta = 1000000.0f;
  std::vector<std::int32_t> pos(512);
  std::uniform_int_distribution<int> dist(0, 8191);
  for (auto& p : pos) p = dist(test::rng());
  const auto tokens = static_cast<std::int64_t>(pos.size());
  const auto n = static_cast<std::size_t>(tokens * heads * d);
  const Vec x = random_normal(n);
  // fp64 rotation of the fp32 angles.
  std::vector<double> expect(n);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int i = 0; i < half; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(d);
      const float inv = 1.0f / static_cast<float>(std::pow(static_cast<double>(theta), static_cast<double>(exponent)));
      const float angle = static_cast<float>(pos[t]) * inv;
      const double c = std::cos(static_cast<double>(angle)), s = std::sin(static_cast<double>(angle));
      for (int h = 0; h < heads; ++h) {
        const std::size_t base = static_cast<std::size_t>((t * heads + h) * d);
        expect[base + i] = x[base + i] * c - x[base + half + i] * s;
        expect[base + half + i] = x[base + half + i] * c + x[base + i] * s;
      }
    }
  Env cuda{gpu()};
  Buffer xb = cuda.upload(x), pb = cuda.upload(pos), yb = cuda.poisoned(n);
  Buffer fb = cuda.upload(test::rope_inv_freq(d, theta));
  cuda.backend.qk_norm_rope_forward(xb.data_as<float>(), nullptr, yb.data_as<float>(), nullptr,
                                    pb.data_as<std::int32_t>(), tokens, heads, d, 1e-6f, fb.data_as<float>(), cuda.stream);
  EXPECT_LT(relative_error(cuda.download(yb), expect), 1e-6);
}

// ---------------------------------------------------------------------------------------------

TEST(CudaOps, SwigluMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  struct Case { std::int64_t rows, cols; };
  for (Case c : {Case{850, 9728}, Case{7, 33}, Case{3, 2}}) {
    const auto n = static_cast<std::size_t>(c.rows * c.cols);
    const Vec gate_up = random_normal(2 * n, 3.0f), dout = random_normal(n);
    auto [ref, out] = on_both([&](Env& e) {
      Buffer gb = e.upload(gate_up), ob = e.poisoned(n), db = e.upload(dout), dgb = e.poisoned(2 * n);
      e.backend.swiglu_forward(gb.data_as<float>(), ob.data_as<float>(), c.rows, c.cols, e.stream);
      e.backend.swiglu_backward(db.data_as<float>(), gb.data_as<float>(), dgb.data_as<float>(), c.rows, c.cols,
                                e.stream);
      return std::vector<Vec>{e.download(ob), e.download(dgb)};
    });
    const std::string what = std::to_string(c.rows) + "x" + std::to_string(c.cols);
    EXPECT_LT(relative_error(out[0], ref[0]), kForwardTol) << what << " forward";
    EXPECT_LT(relative_error(out[1], ref[1]), kBackwardTol) << what << " backward";
  }
}

}  // namespace
}  // namespace cudablocks

#endif  // CUDABLOCKS_WITH_CUDA
