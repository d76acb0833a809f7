#include "cpu/bias.hpp"

#include <algorithm>

#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols) {
  parallel_for(rows, [&](std::int64_t r) {
    float* yr = y + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) yr[c] += bias[c];
  }, /*grain=*/std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(cols, 1)));
}

void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols) {
  // By blocks of columns, so that no two threads write the same element; each block walks all
  // rows in order (row-major reads) and sums in double.
  constexpr std::int64_t block = 256;
  parallel_for((cols + block - 1) / block, [&](std::int64_t b) {
    const std::int64_t c0 = b * block, c1 = std::min(cols, c0 + block);
    double sums[block] = {};
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* dyr = dy + r * cols;
      for (std::int64_t c = c0; c < c1; ++c) sums[c - c0] += dyr[c];
    }
    for (std::int64_t c = c0; c < c1; ++c) dbias[c] = static_cast<float>(dbias[c] + sums[c - c0]);
  });
}

}  // namespace cudablocks::cpu
