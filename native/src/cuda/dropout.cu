// LoRA dropout: one hash per element (two 64-bit multiplies in splitmix64's mixer), 8 or 12 bytes
// moved: memory-bound, a grid-stride loop. The products are __fmul_rn so that the accumulating
// form is not contracted into an FMA: both backends round x * scale, then add.
#include "cuda/dropout.cuh"

#include <algorithm>

#include "core/dropout_hash.hpp"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

// No __restrict__: out may alias x (each element is read before it is written by the same thread).
template <bool kAccumulate>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const float* x, float* out, std::int64_t n,
                                                           std::uint32_t threshold, float scale, std::uint64_t key) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const bool kept = dropout::keep(key, static_cast<std::uint64_t>(i), threshold);
    if (kAccumulate) {
      if (kept) out[i] += __fmul_rn(x[i], scale);
    } else {
      out[i] = kept ? __fmul_rn(x[i], scale) : 0.0f;
    }
  }
}

}  // namespace

void dropout(const float* x, float* out, std::int64_t n, double p, std::uint64_t key, bool accumulate,
             cudaStream_t stream) {
  if (n == 0) return;
  const std::int64_t cap = 16 * static_cast<std::int64_t>(multiprocessor_count());
  const unsigned grid = static_cast<unsigned>(std::clamp<std::int64_t>((n + kThreads - 1) / kThreads, 1, cap));
  const std::uint32_t threshold = dropout::threshold(p);
  const float scale = dropout::scale(p);
  if (accumulate) {
    dropout_kernel<true><<<grid, kThreads, 0, stream>>>(x, out, n, threshold, scale, key);
    CUDABLOCKS_CHECK_LAUNCH("dropout_kernel<accumulate>");
  } else {
    dropout_kernel<false><<<grid, kThreads, 0, stream>>>(x, out, n, threshold, scale, key);
    CUDABLOCKS_CHECK_LAUNCH("dropout_kernel");
  }
}

}  // namespace cudablocks::cuda
