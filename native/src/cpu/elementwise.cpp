#include "cpu/elementwise.hpp"

#include <algorithm>

#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

void add(const float* a, const float* b, float* out, std::int64_t n) {
  // Chunks of 64K elements per parallel_for iteration. Each element is read before it is
  // written, so out may alias a or b.
  constexpr std::int64_t chunk = 65536;
  parallel_for((n + chunk - 1) / chunk, [&](std::int64_t i) {
    const std::int64_t begin = i * chunk, end = std::min(n, begin + chunk);
    for (std::int64_t j = begin; j < end; ++j) out[j] = a[j] + b[j];
  }, /*grain=*/4);
}

}  // namespace cudablocks::cpu
