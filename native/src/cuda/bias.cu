// Bias add and its backward (column sums), plus the shared second stage of column reductions.
//
// add_bias:       read y and bias (bias from L1/L2), write y: 8 bytes per element, 1 FLOP.
// bias_backward:  read dy once (4 bytes per element, 1 FLOP), write a [chunks, cols] partial
//                 (chunks ~ a few per SM's worth of columns), then add_column_partials reads it
//                 back: ~cols * chunks * 8 bytes extra, small next to rows * cols * 4.
// All memory-bound; 16-byte accesses when cols % 4 == 0 and the pointers are 16-byte aligned.
#include "cuda/bias.cuh"

#include <algorithm>
#include <cstdint>

#include "cuda/block_reduce.cuh"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"

namespace cudablocks::cuda {

namespace {

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ float4 operator+(float4 a, float4 b) { return {a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w}; }
__device__ __forceinline__ void zero(float& v) { v = 0.0f; }
__device__ __forceinline__ void zero(float4& v) { v = {0.0f, 0.0f, 0.0f, 0.0f}; }

// y[r, :] += bias. Blocks stride over rows; a block's threads stride over the row's VEC-wide
// column groups (blockDim sized to the row, so narrow rows do not idle most of the block).
template <int VEC>
__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, std::int64_t rows,
                                std::int64_t cols) {
  using Vec = typename VecType<VEC>::type;
  const std::int64_t n = cols / VEC;
  const Vec* bv = reinterpret_cast<const Vec*>(bias);
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    Vec* yr = reinterpret_cast<Vec*>(y + row * cols);
    for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = yr[i] + bv[i];
  }
}

// Column sums of one chunk of rows. Block (32, kRowsY): threadIdx.x picks a VEC-wide column group
// (a warp reads 32 consecutive groups: coalesced), threadIdx.y strides over the chunk's rows; the
// kRowsY partial sums are then added in a fixed order. Writes partial[blockIdx.y, :], or adds into
// out directly when there is a single chunk (direct = true).
constexpr int kRowsY = 8;

template <int VEC>
__global__ void __launch_bounds__(32 * kRowsY) column_sum_kernel(const float* __restrict__ dy, float* __restrict__ out,
                                                                 std::int64_t rows, std::int64_t cols,
                                                                 std::int64_t rows_per_chunk, bool direct) {
  using Vec = typename VecType<VEC>::type;
  __shared__ Vec partial[kRowsY][32];
  const std::int64_t n = cols / VEC;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = min(rows, r0 + rows_per_chunk);
  Vec acc;
  zero(acc);
  if (c < n) {
    const Vec* d = reinterpret_cast<const Vec*>(dy);
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kRowsY) acc = acc + d[r * n + c];
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    Vec sum = partial[0][threadIdx.x];
#pragma unroll
    for (int j = 1; j < kRowsY; ++j) sum = sum + partial[j][threadIdx.x];
    Vec* o = reinterpret_cast<Vec*>(out);
    if (direct) {
      o[c] = o[c] + sum;
    } else {
      o[static_cast<std::int64_t>(blockIdx.y) * n + c] = sum;
    }
  }
}

// out[c] += sum_p partials[p, c]. Block (32, kPartsY): columns across x, parts strided over y,
// then the kPartsY sums added in order by threadIdx.y == 0. Deterministic.
constexpr int kPartsY = 16;

__global__ void __launch_bounds__(32 * kPartsY) add_column_partials_kernel(const float* __restrict__ partials,
                                                                           int parts, std::int64_t cols,
                                                                           float* __restrict__ out) {
  __shared__ float sums[kPartsY][33];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (c < cols) {
    for (int p = threadIdx.y; p < parts; p += kPartsY) acc += partials[static_cast<std::int64_t>(p) * cols + c];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float sum = sums[0][threadIdx.x];
#pragma unroll
    for (int j = 1; j < kPartsY; ++j) sum += sums[j][threadIdx.x];
    out[c] += sum;
  }
}

int threads_for(std::int64_t n) {
  return static_cast<int>(std::clamp<std::int64_t>((n + 31) / 32 * 32, 32, 256));
}

}  // namespace

void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const bool vec4 = cols % 4 == 0 && aligned16(y) && aligned16(bias);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(rows, 16 * multiprocessor_count()));
  if (vec4) {
    add_bias_kernel<4><<<blocks, threads_for(cols / 4), 0, stream>>>(y, bias, rows, cols);
  } else {
    add_bias_kernel<1><<<blocks, threads_for(cols), 0, stream>>>(y, bias, rows, cols);
  }
  CUDABLOCKS_CHECK_LAUNCH("add_bias_kernel");
}

void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const bool vec4 = cols % 4 == 0 && aligned16(dy) && aligned16(dbias);
  const int vec = vec4 ? 4 : 1;
  const std::int64_t col_blocks = (cols / vec + 31) / 32;
  // Enough blocks to keep every SM busy (~4 per SM), but at least 64 rows per chunk so the
  // partials stay small next to dy.
  const std::int64_t target = 4 * static_cast<std::int64_t>(multiprocessor_count());
  const std::int64_t chunks = std::clamp<std::int64_t>(std::min((target + col_blocks - 1) / col_blocks, (rows + 63) / 64),
                                                       1, 65535);
  const std::int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  const dim3 block(32, kRowsY);
  if (chunks == 1) {
    if (vec4) column_sum_kernel<4><<<grid, block, 0, stream>>>(dy, dbias, rows, cols, rows_per_chunk, true);
    else column_sum_kernel<1><<<grid, block, 0, stream>>>(dy, dbias, rows, cols, rows_per_chunk, true);
    CUDABLOCKS_CHECK_LAUNCH("column_sum_kernel");
    return;
  }
  ScratchLease scratch(sizeof(float) * static_cast<std::size_t>(chunks * cols), stream);
  if (vec4) column_sum_kernel<4><<<grid, block, 0, stream>>>(dy, scratch.get<float>(), rows, cols, rows_per_chunk, false);
  else column_sum_kernel<1><<<grid, block, 0, stream>>>(dy, scratch.get<float>(), rows, cols, rows_per_chunk, false);
  CUDABLOCKS_CHECK_LAUNCH("column_sum_kernel");
  add_column_partials(scratch.get<float>(), static_cast<int>(chunks), cols, dbias, stream);
}

void add_column_partials(const float* partials, int parts, std::int64_t cols, float* out, cudaStream_t stream) {
  if (parts == 0 || cols == 0) return;
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32));
  add_column_partials_kernel<<<grid, dim3(32, kPartsY), 0, stream>>>(partials, parts, cols, out);
  CUDABLOCKS_CHECK_LAUNCH("add_column_partials_kernel");
}

}  // namespace cudablocks::cuda
