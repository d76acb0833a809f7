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
  add_column_sums(rows, cols, [&](std::int64_t r, std::int64_t c) { return static_cast<double>(dy[r * cols + c]); },
                  dbias);
}

}  // namespace cudablocks::cpu
