// A plain parallel loop for the CPU reference kernels: splits [0, n) into contiguous chunks,
// one per hardware thread, and runs them on std::threads. Small loops run inline.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

namespace cudablocks::cpu {

// Calls body(i) for every i in [0, n). `grain` is the fewest iterations worth a thread.
void parallel_for(std::int64_t n, const std::function<void(std::int64_t)>& body, std::int64_t grain = 1);

// out[c] += sum over r of term(r, c), for a [rows, cols] row-major walk. By blocks of columns,
// so that no two threads write the same element; each block reads all rows in order and sums
// in double: deterministic for any thread count.
template <typename Term>
void add_column_sums(std::int64_t rows, std::int64_t cols, const Term& term, float* out) {
  constexpr std::int64_t block = 256;
  parallel_for((cols + block - 1) / block, [&](std::int64_t b) {
    const std::int64_t c0 = b * block, c1 = std::min(cols, c0 + block);
    double sums[block] = {};
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = c0; c < c1; ++c) sums[c - c0] += term(r, c);
    }
    for (std::int64_t c = c0; c < c1; ++c) out[c] = static_cast<float>(out[c] + sums[c - c0]);
  });
}

}  // namespace cudablocks::cpu
