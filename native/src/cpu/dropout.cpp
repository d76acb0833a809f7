#include "cpu/dropout.hpp"

#include <algorithm>

#include "core/dropout_hash.hpp"
#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

void dropout(const float* x, float* out, std::int64_t n, double p, std::uint64_t key, bool accumulate) {
  const std::uint32_t threshold = dropout::threshold(p);
  const float scale = dropout::scale(p);
  constexpr std::int64_t chunk = 65536;
  parallel_for((n + chunk - 1) / chunk, [&](std::int64_t c) {
    const std::int64_t begin = c * chunk, end = std::min(n, begin + chunk);
    for (std::int64_t i = begin; i < end; ++i) {
      const bool kept = dropout::keep(key, static_cast<std::uint64_t>(i), threshold);
      if (accumulate) {
        if (kept) out[i] += x[i] * scale;
      } else {
        out[i] = kept ? x[i] * scale : 0.0f;
      }
    }
  }, /*grain=*/4);
}

}  // namespace cudablocks::cpu
