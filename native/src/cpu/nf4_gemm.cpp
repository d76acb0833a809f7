#include "cpu/nf4_gemm.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/nf4.hpp"
#include "cpu/to_bf16.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::cpu {

bool nf4_gemm_fused(std::int64_t k, int blocksize) { return blocksize == 64 && k % 64 == 0; }

void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                   bool transposed, const float* addend, float* c, std::uint16_t* c16, bool add_c16) {
  std::int64_t n = 0;
  for (int p = 0; p < parts; ++p) n += w[p].rows;
  // The CUDA kernels' conditions, so that both backends refuse the same calls.
  if (k <= 0 || k % 64 != 0) {
    throw InvalidArgumentError("nf4_gemm_bf16: W's columns must be a positive multiple of 64 (its absmax blocks), "
                               "got " + std::to_string(k));
  }
  if (transposed && n % 8 != 0) throw InvalidArgumentError("nf4_gemm_bf16: transposed, W's rows must be a multiple of 8");
  std::vector<std::uint16_t> weight(static_cast<std::size_t>(n * k));
  std::int64_t row = 0;
  for (int p = 0; p < parts; ++p) {
    nf4_dequantize(w[p].packed, w[p].absmax, w[p].rows * k, 64, weight.data() + row * k, DType::BFloat16);
    row += w[p].rows;
  }
  // c [m, cols] = a [m, inner] W^T (or transposed a W).
  const std::int64_t cols = transposed ? k : n, inner = transposed ? n : k;
  if (c16 != nullptr) {
    std::vector<float> sum(static_cast<std::size_t>(m * cols));
    if (add_c16) from_bf16(c16, sum.data(), m * cols);
    gemm_bf16(false, !transposed, m, cols, inner, 1.0f, a, weight.data(), add_c16 ? 1.0f : 0.0f, sum.data());
    to_bf16(sum.data(), c16, m * cols);
    return;
  }
  if (addend != nullptr && addend != c) std::copy(addend, addend + m * cols, c);
  gemm_bf16(false, !transposed, m, cols, inner, 1.0f, a, weight.data(), addend != nullptr ? 1.0f : 0.0f, c);
}

}  // namespace cudablocks::cpu
