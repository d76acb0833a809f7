// A plain parallel loop for the CPU reference kernels: splits [0, n) into contiguous chunks,
// one per hardware thread, and runs them on std::threads. Small loops run inline.
#pragma once

#include <cstdint>
#include <functional>

namespace cudablocks::cpu {

// Calls body(i) for every i in [0, n). `grain` is the fewest iterations worth a thread.
void parallel_for(std::int64_t n, const std::function<void(std::int64_t)>& body, std::int64_t grain = 1);

}  // namespace cudablocks::cpu
