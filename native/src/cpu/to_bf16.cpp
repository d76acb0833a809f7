#include "cpu/to_bf16.hpp"

#include <algorithm>
#include <vector>

#include "core/float_bits.hpp"
#include "cpu/gemm.hpp"
#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

namespace {

constexpr std::int64_t kChunk = 65536;

}  // namespace

void from_bf16(const std::uint16_t* x, float* y, std::int64_t n) {
  parallel_for((n + kChunk - 1) / kChunk, [&](std::int64_t i) {
    const std::int64_t begin = i * kChunk, end = std::min(n, begin + kChunk);
    for (std::int64_t j = begin; j < end; ++j) y[j] = bf16_bits_to_float(x[j]);
  }, /*grain=*/4);
}

void to_bf16(const float* x, std::uint16_t* y, std::int64_t n) {
  parallel_for((n + kChunk - 1) / kChunk, [&](std::int64_t i) {
    const std::int64_t begin = i * kChunk, end = std::min(n, begin + kChunk);
    for (std::int64_t j = begin; j < end; ++j) y[j] = float_to_bf16_bits(x[j]);
  }, /*grain=*/4);
}

void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
               const std::uint16_t* a, const std::uint16_t* b, float beta, float* c) {
  if (m <= 0 || n <= 0) return;
  const std::int64_t a_n = k > 0 ? m * k : 0, b_n = k > 0 ? k * n : 0;
  std::vector<float> a32(static_cast<std::size_t>(a_n)), b32(static_cast<std::size_t>(b_n));
  from_bf16(a, a32.data(), a_n);
  from_bf16(b, b32.data(), b_n);
  gemm(trans_a, trans_b, m, n, k, alpha, a32.data(), b32.data(), beta, c);
}

}  // namespace cudablocks::cpu
