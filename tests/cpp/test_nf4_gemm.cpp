// The fused NF4 GEMM (Backend::nf4_gemm_bf16): c = a W^T with W stacked from NF4 weights.
//
// References: the product in double of the bf16 operand and the weights as nf4_dequantize decodes
// them (CPU), and on the GPU also the staged path (dequantize to bf16, then gemm_bf16). The decode
// itself is checked exactly: with a = rows of the identity, c holds W's decoded values, each the
// sum of a single exact product. Inputs are fresh random numbers each run (the seed is printed);
// outputs start poisoned with NaN, accumulated ones from random values.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "core/float_bits.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/stream.hpp"
#include "support.hpp"

namespace cudablocks {
namespace {

using Vec = std::vector<float>;
using U16 = std::vector<std::uint16_t>;

// A weight's NF4 form, quantized on the CPU (bitsandbytes' format, blocks of 64).
struct Nf4Weight {
  std::int64_t rows;
  std::vector<std::uint8_t> packed;
  Vec absmax;
  U16 decoded;  // nf4_dequantize's bf16 values [rows, k]
};

Nf4Weight make_weight(std::int64_t rows, std::int64_t k) {
  const Backend& cpu = backend_for(Device());
  const Stream s{Device()};
  const std::int64_t n = rows * k;
  const Vec x = test::random_normal(static_cast<std::size_t>(n), 0.02f);
  Nf4Weight w{rows, std::vector<std::uint8_t>(static_cast<std::size_t>(n / 2)), Vec(static_cast<std::size_t>(n / 64)),
              U16(static_cast<std::size_t>(n))};
  cpu.nf4_quantize(x.data(), DType::Float32, n, 64, w.packed.data(), w.absmax.data(), s);
  cpu.nf4_dequantize(w.packed.data(), w.absmax.data(), n, 64, w.decoded.data(), DType::BFloat16, s);
  return w;
}

using test::download;
using test::upload;

U16 random_bf16(std::size_t n) { return test::bf16_of(test::random_normal(n)); }

// The weights on one device, as the op takes them.
struct DeviceWeights {
  std::vector<Buffer> buffers;
  std::vector<Nf4Rows> rows;
  DeviceWeights(const std::vector<Nf4Weight>& ws, const Device& d, const Stream& s) {
    for (const Nf4Weight& w : ws) {
      buffers.push_back(upload(w.packed, DType::UInt8, d, s));
      buffers.push_back(upload(w.absmax, DType::Float32, d, s));
    }
    for (std::size_t i = 0; i < ws.size(); ++i) {
      rows.push_back({buffers[2 * i].data_as<std::uint8_t>(), buffers[2 * i + 1].data_as<float>(), ws[i].rows});
    }
  }
};

// c = a W^T (+ addend) in double, W [n, k] the stacked decoded weights, or transposed c = a W; and
// the sums of |terms| (the scale of an fp32 summation's error).
struct Reference {
  std::vector<double> c, abs_sum;
};
Reference reference(const U16& a, const std::vector<Nf4Weight>& ws, std::int64_t m, std::int64_t k, bool transposed,
                    const Vec* addend) {
  std::vector<U16> rows;  // W's decoded rows, stacked
  for (const auto& w : ws) {
    for (std::int64_t j = 0; j < w.rows; ++j) {
      rows.emplace_back(w.decoded.begin() + j * k, w.decoded.begin() + (j + 1) * k);
    }
  }
  const auto n = static_cast<std::int64_t>(rows.size());
  const std::int64_t cols = transposed ? k : n, inner = transposed ? n : k;
  std::vector<double> c(static_cast<std::size_t>(m * cols)), abs_sum(c.size());
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      double sum = addend ? (*addend)[i * cols + j] : 0.0, abs = std::fabs(sum);
      for (std::int64_t t = 0; t < inner; ++t) {
        const std::uint16_t w = transposed ? rows[t][j] : rows[j][t];
        const double term = static_cast<double>(bf16_bits_to_float(a[i * inner + t])) * bf16_bits_to_float(w);
        sum += term;
        abs += std::fabs(term);
      }
      c[i * cols + j] = sum;
      abs_sum[i * cols + j] = abs;
    }
  }
  return {c, abs_sum};
}

enum class Out { Plain, Addend, InPlace, Bf16, Bf16Accumulate };
const char* out_name(Out o) {
  switch (o) {
    case Out::Plain: return "fp32";
    case Out::Addend: return "fp32 + addend";
    case Out::InPlace: return "fp32 accumulate";
    case Out::Bf16: return "bf16";
    default: return "bf16 accumulate";
  }
}
bool bf16_out(Out o) { return o == Out::Bf16 || o == Out::Bf16Accumulate; }

// Runs the op on `device` (c = a W^T, or transposed a W) and returns c widened to fp32.
Vec run(const Device& device, const U16& a, const std::vector<Nf4Weight>& ws, std::int64_t m, std::int64_t k,
        bool transposed, Out mode, const Vec& addend) {
  const Backend& be = backend_for(device);
  const Stream s(device);
  std::int64_t n = 0;
  for (const auto& w : ws) n += w.rows;
  const DeviceWeights dw(ws, device, s);
  Buffer ab = upload(a, DType::BFloat16, device, s);
  const auto cn = static_cast<std::size_t>(m * (transposed ? k : n));
  if (bf16_out(mode)) {
    const bool add = mode == Out::Bf16Accumulate;
    // NaN, or the addend's values to add onto
    Buffer c16 = upload(add ? test::bf16_of(addend) : U16(cn, 0x7fc0), DType::BFloat16, device, s);
    be.nf4_gemm_bf16(ab.data_as<std::uint16_t>(), dw.rows.data(), static_cast<int>(dw.rows.size()), m, k, transposed,
                     nullptr, nullptr, c16.data_as<std::uint16_t>(), add, s);
    return test::float_of(download<std::uint16_t>(c16, s));
  }
  Buffer add = upload(addend, DType::Float32, device, s);
  Buffer c = mode == Out::InPlace ? add : upload(Vec(cn, NAN), DType::Float32, device, s);
  const float* addp = mode == Out::Plain ? nullptr : add.data_as<float>();
  be.nf4_gemm_bf16(ab.data_as<std::uint16_t>(), dw.rows.data(), static_cast<int>(dw.rows.size()), m, k, transposed,
                   addp, c.data_as<float>(), nullptr, false, s);
  return download<float>(c, s);
}

// Relative L2 error, and for bf16 output that every element is within a bf16 ulp of the reference's
// nearest bf16, give or take the fp32 sum's own error (1e-5 of the sum of |terms|: a cancelling sum
// may round to another bf16 neighbour).
void check(const Vec& got, const Reference& ref, Out mode, const std::string& what) {
  const std::vector<double>& want = ref.c;
  ASSERT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << " element " << i << " not written";
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
    if (bf16_out(mode)) {
      const float nearest = bf16_bits_to_float(float_to_bf16_bits(static_cast<float>(want[i])));
      const double allowed = std::fabs(nearest) * 0x1p-7 + 1e-5 * ref.abs_sum[i];
      ASSERT_LE(std::fabs(got[i] - nearest), allowed) << what << " element " << i;
    }
  }
  EXPECT_LT(std::sqrt(num / den), bf16_out(mode) ? 4e-3 : 2e-6) << what;
}

struct Case {
  std::vector<std::int64_t> rows;  // the stacked weights
  std::int64_t k, m;
};
const Case kCases[] = {
    {{256, 64, 64}, 320, 200},  // q, k, v-like parts (tiles straddle parts), m past one tile
    {{37}, 64, 5},              // odd n, one step, few rows (32-token tiles)
    {{256, 64, 64}, 320, 40},   // 64-token tiles
    {{640, 640}, 1024, 32},     // a full 32-token tile, several steps
    {{130, 2}, 128, 129},       // n and m one past a tile
    {{640, 640}, 1024, 384},    // gate/up-like, several steps per tile
    {{5632, 5632}, 128, 400},   // enough 256-row tiles to fill an H100/H200: the wide tiling
    {{256}, 2048, 16},          // few tiles, long k: split k (sums of the splits' partials)
    {{300, 100}, 4096, 64},     // split k over parts, n past a tile
};
// The transposed product (c = a W) runs the cases whose n is a multiple of 8; there k is c's width
// (partial column tiles at 320 and 64) and n the sum (steps straddling parts at 300 and 320 rows).

void run_cases(const Device& device) {
  for (const Case& c : kCases) {
    std::vector<Nf4Weight> ws;
    std::int64_t n = 0;
    for (std::int64_t r : c.rows) {
      ws.push_back(make_weight(r, c.k));
      n += r;
    }
    for (bool transposed : {false, true}) {
      if (transposed && n % 8 != 0) continue;
      const std::int64_t inner = transposed ? n : c.k, cols = transposed ? c.k : n;
      const U16 a = random_bf16(static_cast<std::size_t>(c.m * inner));
      const Vec addend = test::random_normal(static_cast<std::size_t>(c.m * cols));
      const Vec addend16 = test::float_of(test::bf16_of(addend));  // as a bf16 output starts
      for (Out mode : {Out::Plain, Out::Addend, Out::InPlace, Out::Bf16, Out::Bf16Accumulate}) {
        const bool adds = mode == Out::Addend || mode == Out::InPlace;
        const Vec got = run(device, a, ws, c.m, c.k, transposed, mode, addend);
        const Vec* added = adds ? &addend : mode == Out::Bf16Accumulate ? &addend16 : nullptr;
        check(got, reference(a, ws, c.m, c.k, transposed, added), mode,
              std::string(backend_for(device).name()) + (transposed ? " a W, " : " a W^T, ") + out_name(mode) +
                  ", m " + std::to_string(c.m) + ", n " + std::to_string(n) + ", k " + std::to_string(c.k));
      }
    }
  }
}

// With a = the first m rows of the identity, c[i, j] = W[j, i] (transposed: c[i, j] = W[i, j]): the
// decoded value itself. Transposed, the first 64 rows only (the fused kernels' few-token tiles).
void check_decode_exact(const Device& device) {
  const std::int64_t k = 192;
  const std::vector<Nf4Weight> ws = {make_weight(200, k), make_weight(56, k)};
  for (bool transposed : {false, true}) {
    const std::int64_t m = transposed ? 64 : 192, inner = transposed ? 256 : k, cols = transposed ? k : 256;
    U16 a(static_cast<std::size_t>(m * inner), 0);
    for (std::int64_t i = 0; i < m; ++i) a[i * inner + i] = float_to_bf16_bits(1.0f);
    const Vec got = run(device, a, ws, m, k, transposed, Out::Plain, Vec(static_cast<std::size_t>(m * cols), 0.0f));
    std::int64_t row = 0;
    for (const auto& w : ws) {
      for (std::int64_t j = 0; j < w.rows; ++j, ++row) {
        for (std::int64_t i = 0; i < k; ++i) {
          // Forward: c[i, row] = W[row, i]; transposed: c[row, i] = W[row, i] for rows < m.
          if (transposed && row >= m) continue;
          const float want = bf16_bits_to_float(w.decoded[j * k + i]);
          ASSERT_EQ(transposed ? got[row * cols + i] : got[i * cols + row], want)
              << (transposed ? "a W" : "a W^T") << ": weight row " << row << ", column " << i;
        }
      }
    }
  }
}

// Calls the kernels cannot take are refused before any work: W's columns not a multiple of 64, and
// transposed, W's rows not a multiple of 8.
void check_refusals(const Device& device) {
  const Backend& be = backend_for(device);
  const Stream s(device);
  const std::vector<Nf4Weight> ws = {make_weight(12, 64)};
  const DeviceWeights dw(ws, device, s);
  Buffer ab = upload(random_bf16(4 * 96), DType::BFloat16, device, s);
  Buffer c = upload(Vec(4 * 96, 0.0f), DType::Float32, device, s);
  auto call = [&](std::int64_t k, bool transposed) {
    be.nf4_gemm_bf16(ab.data_as<std::uint16_t>(), dw.rows.data(), 1, 4, k, transposed, nullptr, c.data_as<float>(),
                     nullptr, false, s);
  };
  EXPECT_THROW(call(96, false), InvalidArgumentError);
  EXPECT_THROW(call(0, false), InvalidArgumentError);
  EXPECT_THROW(call(64, true), InvalidArgumentError);
  EXPECT_EQ(download<float>(c, s), Vec(4 * 96, 0.0f)) << "a refused call wrote c";
}

TEST(Nf4Gemm, CpuMatchesReference) {
  ASSERT_TRUE(backend_for(Device()).nf4_gemm_fused(64, 64, Stream(Device())));
  EXPECT_FALSE(backend_for(Device()).nf4_gemm_fused(96, 64, Stream(Device())));
  EXPECT_FALSE(backend_for(Device()).nf4_gemm_fused(128, 128, Stream(Device())));
  run_cases(Device());
  check_decode_exact(Device());
  check_refusals(Device());
}

bool cuda_fused() {
  if (!test::have_cuda_device()) return false;
  const Device gpu(DeviceType::CUDA, 0);
  return backend_for(gpu).nf4_gemm_fused(64, 64, Stream(gpu));
}

TEST(CudaNf4Gemm, MatchesReference) {
  if (!cuda_fused()) GTEST_SKIP() << "no device with the fused NF4 GEMM (sm_90a build, compute capability 9.0)";
  const Device gpu(DeviceType::CUDA, 0);
  run_cases(gpu);
  check_decode_exact(gpu);
  check_refusals(gpu);
}

// Timing (disabled by default): ./test_nf4_gemm --gtest_also_run_disabled_tests
//   --gtest_filter='*Nf4GemmTiming*'. Qwen3-4B's products (q, k, o, gate/up, down), forward and
// transposed: fused, staged (dequantize + cuBLAS) and cuBLAS alone on the dequantized weight; the
// host clock over 30 back-to-back calls after warm-up.
TEST(CudaNf4GemmTiming, DISABLED_Qwen3Shapes) {
  if (!cuda_fused()) GTEST_SKIP() << "no device with the fused NF4 GEMM";
  const Device gpu(DeviceType::CUDA, 0);
  const Backend& be = backend_for(gpu);
  const Stream s(gpu);
  struct Shape {
    const char* name;
    std::vector<std::int64_t> rows;
    std::int64_t k;
  };
  for (const Shape& sh : {Shape{"q", {4096}, 2560}, Shape{"k", {1024}, 2560}, Shape{"o", {2560}, 4096},
                          Shape{"gate_up", {9728, 9728}, 2560}, Shape{"down", {2560}, 9728}}) {
    std::vector<Nf4Weight> ws;
    std::int64_t n = 0;
    for (std::int64_t r : sh.rows) {
      ws.push_back(make_weight(r, sh.k));
      n += r;
    }
    const DeviceWeights dw(ws, gpu, s);
    Buffer wbf = Buffer::empty({n * sh.k}, DType::BFloat16, gpu);
    for (bool transposed : {false, true}) {
      for (std::int64_t m : {1, 16, 32, 64, 96, 128, 256, 512, 4096}) {
        if (transposed && m > 128) continue;  // the input gradient's fused kernel is for few tokens
        const std::int64_t inner = transposed ? n : sh.k, cols = transposed ? sh.k : n;
        Buffer ab = upload(random_bf16(static_cast<std::size_t>(m * inner)), DType::BFloat16, gpu, s);
        Buffer c = Buffer::empty({m * cols}, DType::Float32, gpu);
        auto* a16 = ab.data_as<std::uint16_t>();
        auto fused = [&] {
          be.nf4_gemm_bf16(a16, dw.rows.data(), static_cast<int>(dw.rows.size()), m, sh.k, transposed, nullptr,
                           c.data_as<float>(), nullptr, false, s);
        };
        auto gemm = [&] {
          be.gemm_bf16(false, !transposed, m, cols, inner, 1.0f, a16, wbf.data_as<std::uint16_t>(), 0.0f,
                       c.data_as<float>(), s);
        };
        auto staged = [&] {
          std::int64_t at = 0;
          for (const Nf4Rows& r : dw.rows) {
            be.nf4_dequantize(r.packed, r.absmax, r.rows * sh.k, 64, wbf.data_as<std::uint16_t>() + at * sh.k,
                              DType::BFloat16, s);
            at += r.rows;
          }
          gemm();
        };
        auto time = [&](auto&& f) {
          for (int i = 0; i < 5; ++i) f();
          s.synchronize();
          const int iters = 30;
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < iters; ++i) f();
          s.synchronize();
          return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
        };
        const double tf = time(fused), ts = time(staged), tg = time(gemm);
        const double flop = 2.0 * static_cast<double>(m) * n * sh.k;
        std::printf("    %s %s m %5lld: fused %.4f ms (%.0f TFLOP/s), staged %.4f ms, cuBLAS on bf16 W %.4f ms "
                    "(%.0f TFLOP/s); fused/cuBLAS %.2fx\n",
                    sh.name, transposed ? "dX " : "fwd", static_cast<long long>(m), tf, flop / tf * 1e-9, ts, tg,
                    flop / tg * 1e-9, tf / tg);
      }
    }
  }
}

}  // namespace
}  // namespace cudablocks
