#include "cpu/transpose.hpp"

#include <algorithm>

#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y) {
  // A task per block of 32 columns of x: it reads 32 consecutive floats of each row and writes 32
  // rows of y, none of which another task writes.
  constexpr std::int64_t kBlock = 32;
  parallel_for((cols + kBlock - 1) / kBlock, [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, j1 = std::min(cols, j0 + kBlock);
    for (std::int64_t i = 0; i < rows; ++i) {
      for (std::int64_t j = j0; j < j1; ++j) y[j * rows + i] = x[i * ld_x + j];
    }
  });
}

}  // namespace cudablocks::cpu
