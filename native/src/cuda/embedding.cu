// Embedding lookup (gather) and its gradient (a scatter-add grouped on the host).
//
// Both are memory-bound copies: forward reads 2-4 bytes and writes 4 bytes per output element;
// backward reads each gradient row once and read-modify-writes each touched table row once.
// One block per output row (forward: a token; backward: a distinct vocabulary row), its threads
// striding over the hidden columns: coalesced, and in the backward no two blocks write the same
// row, so the sums need no atomics and run in the host's order (deterministic).
#include "cuda/check.hpp"
#include "cuda/embedding.cuh"

#include <cuda_bf16.h>

#include <algorithm>

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(std::uint16_t bits) { return __bfloat162float(__ushort_as_bfloat16(bits)); }

// out[t, :] = table[ids[t], :] for t = blockIdx.x (grid-strided), zeros for an id out of range.
template <typename T>
__global__ void __launch_bounds__(kThreads) embedding_forward_kernel(const std::int32_t* __restrict__ ids,
                                                                     const T* __restrict__ table,
                                                                     float* __restrict__ out, std::int64_t tokens,
                                                                     std::int64_t vocab, std::int64_t hidden) {
  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const std::int64_t id = ids[t];
    float* dst = out + t * hidden;
    if (id < 0 || id >= vocab) {
      for (std::int64_t h = threadIdx.x; h < hidden; h += kThreads) dst[h] = 0.0f;
      continue;
    }
    const T* src = table + id * hidden;
    for (std::int64_t h = threadIdx.x; h < hidden; h += kThreads) dst[h] = to_float(src[h]);
  }
}

// grad_table[rows[u], :] += sum of grad_out[order[j], :] over the group u = blockIdx.x
// (grid-strided); each thread owns columns and adds the group's rows in order.
__global__ void __launch_bounds__(kThreads) embedding_backward_kernel(
    const float* __restrict__ grad_out, const std::int32_t* __restrict__ rows, const std::int32_t* __restrict__ offsets,
    const std::int32_t* __restrict__ order, float* __restrict__ grad_table, std::int64_t unique_rows,
    std::int64_t order_len, std::int64_t tokens, std::int64_t vocab, std::int64_t hidden) {
  for (std::int64_t u = blockIdx.x; u < unique_rows; u += gridDim.x) {
    const std::int64_t row = rows[u];
    if (row < 0 || row >= vocab) continue;
    const std::int64_t begin = max(std::int64_t{0}, static_cast<std::int64_t>(offsets[u]));
    const std::int64_t end = min(order_len, static_cast<std::int64_t>(offsets[u + 1]));
    float* dst = grad_table + row * hidden;
    for (std::int64_t h = threadIdx.x; h < hidden; h += kThreads) {
      float sum = 0.0f;
      for (std::int64_t j = begin; j < end; ++j) {
        const std::int64_t t = order[j];
        if (t >= 0 && t < tokens) sum += grad_out[t * hidden + h];
      }
      dst[h] += sum;
    }
  }
}

// One block per row up to a grid that is plenty for memory-bound work (a few waves of blocks).
unsigned grid_for(std::int64_t rows) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(rows, 65535)));
}

}  // namespace

void embedding_forward(const std::int32_t* ids, const void* table, DType table_dtype, float* out,
                       std::int64_t tokens, std::int64_t vocab, std::int64_t hidden, cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return;
  if (table_dtype == DType::BFloat16) {
    embedding_forward_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(
        ids, static_cast<const std::uint16_t*>(table), out, tokens, vocab, hidden);
  } else {
    embedding_forward_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(ids, static_cast<const float*>(table), out,
                                                                        tokens, vocab, hidden);
  }
  CUDABLOCKS_CHECK_LAUNCH("embedding_forward_kernel");
}

void embedding_backward(const float* grad_out, const std::int32_t* rows, const std::int32_t* offsets,
                        const std::int32_t* order, float* grad_table, std::int64_t unique_rows,
                        std::int64_t order_len, std::int64_t tokens, std::int64_t vocab, std::int64_t hidden,
                        cudaStream_t stream) {
  if (unique_rows == 0 || hidden == 0) return;
  embedding_backward_kernel<<<grid_for(unique_rows), kThreads, 0, stream>>>(
      grad_out, rows, offsets, order, grad_table, unique_rows, order_len, tokens, vocab, hidden);
  CUDABLOCKS_CHECK_LAUNCH("embedding_backward_kernel");
}

}  // namespace cudablocks::cuda
