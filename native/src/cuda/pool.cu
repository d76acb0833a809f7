// Pooling of packed sequences (one row per sequence) and its backward.
//
// Memory-bound and small (the classifier's input: a few rows of hidden floats per batch).
// Forward: one block per sequence, threads striding over columns; Mean sums its rows in order in
// fp32 (coalesced row reads). Backward: one block per token row, which finds its sequence by a
// binary search over cu_seqlens, so that every row of dx is written by exactly one block.
#include "cuda/check.hpp"
#include "cuda/pool.cuh"

#include <algorithm>

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

// out[b, :] = x[end - 1, :] (Last) or mean(x[begin:end, :]) (Mean) for b = blockIdx.x (grid-strided).
__global__ void __launch_bounds__(kThreads) pool_forward_kernel(const float* __restrict__ x,
                                                                const std::int32_t* __restrict__ cu_seqlens,
                                                                float* __restrict__ out, std::int64_t n_seqs,
                                                                std::int64_t tokens, std::int64_t hidden, bool mean) {
  for (std::int64_t b = blockIdx.x; b < n_seqs; b += gridDim.x) {
    const std::int64_t begin = cu_seqlens[b], end = cu_seqlens[b + 1];
    const bool valid = 0 <= begin && begin < end && end <= tokens;
    float* dst = out + b * hidden;
    for (std::int64_t h = threadIdx.x; h < hidden; h += kThreads) {
      float value = 0.0f;
      if (valid && !mean) {
        value = x[(end - 1) * hidden + h];
      } else if (valid) {
        for (std::int64_t t = begin; t < end; ++t) value += x[t * hidden + h];
        value /= static_cast<float>(end - begin);
      }
      dst[h] = value;
    }
  }
}

// dx[t, :] for t = blockIdx.x (grid-strided): the sequence b holding t is the last one with
// cu_seqlens[b] <= t; its gradient row, scaled (Mean) or only at its last token (Last).
__global__ void __launch_bounds__(kThreads) pool_backward_kernel(const float* __restrict__ dout,
                                                                 const std::int32_t* __restrict__ cu_seqlens,
                                                                 float* __restrict__ dx, std::int64_t n_seqs,
                                                                 std::int64_t tokens, std::int64_t hidden, bool mean) {
  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    std::int64_t lo = 0, hi = n_seqs;  // invariant: cu_seqlens[lo] <= t < cu_seqlens[hi] when valid
    while (hi - lo > 1) {
      const std::int64_t mid = (lo + hi) / 2;
      if (cu_seqlens[mid] <= t) lo = mid; else hi = mid;
    }
    const std::int64_t begin = cu_seqlens[lo], end = cu_seqlens[lo + 1];
    const bool pooled = begin <= t && t < end && (mean || t == end - 1);
    const float divisor = mean ? static_cast<float>(end - begin) : 1.0f;  // a division, as the CPU does
    const float* src = dout + lo * hidden;
    float* dst = dx + t * hidden;
    for (std::int64_t h = threadIdx.x; h < hidden; h += kThreads) dst[h] = pooled ? src[h] / divisor : 0.0f;
  }
}

unsigned grid_for(std::int64_t rows) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(rows, 65535)));
}

}  // namespace

void pool_forward(const float* x, const std::int32_t* cu_seqlens, float* out, std::int64_t n_seqs,
                  std::int64_t tokens, std::int64_t hidden, PoolMode mode, cudaStream_t stream) {
  if (n_seqs == 0 || hidden == 0) return;
  pool_forward_kernel<<<grid_for(n_seqs), kThreads, 0, stream>>>(x, cu_seqlens, out, n_seqs, tokens, hidden,
                                                                 mode == PoolMode::Mean);
  CUDABLOCKS_CHECK_LAUNCH("pool_forward_kernel");
}

void pool_backward(const float* dout, const std::int32_t* cu_seqlens, float* dx, std::int64_t n_seqs,
                   std::int64_t tokens, std::int64_t hidden, PoolMode mode, cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return;
  if (n_seqs == 0) {  // no sequence: nothing pooled (and no cu_seqlens[1] to search)
    CUDABLOCKS_CUDA_CHECK(cudaMemsetAsync(dx, 0, sizeof(float) * static_cast<std::size_t>(tokens * hidden), stream));
    return;
  }
  pool_backward_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(dout, cu_seqlens, dx, n_seqs, tokens, hidden,
                                                                  mode == PoolMode::Mean);
  CUDABLOCKS_CHECK_LAUNCH("pool_backward_kernel");
}

}  // namespace cudablocks::cuda
