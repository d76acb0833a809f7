// fp32 matrix transpose: y [cols, rows] = x [rows, cols]^T. No FLOPs, 8 bytes per element (a
// [4096, 9728] activation: 319 MB, ~0.1 ms at 3 TB/s). Why it exists: tf32 tensor-core GEMMs need
// both operands k-major, and a weight gradient dW = dY^T X (k = tokens) has neither; cuBLAS then
// runs at about 60% of its k-major rate, so the fp32 block transposes dY and X first.
//
// A block moves a 64 x 64 tile through shared memory: it reads rows of x (each warp-wide read
// covers 32 consecutive columns, 128 bytes) and writes rows of y the same way. The tile's rows
// are padded to 65 floats so that reading a column of it hits 32 different banks.
#include "cuda/transpose.cuh"

#include "cuda/check.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kTile = 64;
constexpr int kRowsPerPass = 8;  // a block is 32 x 8 threads: each thread moves 8 x 2 elements

__global__ void __launch_bounds__(32 * kRowsPerPass) transpose_kernel(const float* __restrict__ x, std::int64_t rows,
                                                                      std::int64_t cols, std::int64_t ld_x,
                                                                      float* __restrict__ y) {
  __shared__ float tile[kTile][kTile + 1];
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.y) * kTile;  // x's rows
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kTile;  // x's columns
  const int tx = threadIdx.x, ty = threadIdx.y;
  // Read: tile[r][c] = x[i0 + r, j0 + c].
#pragma unroll
  for (int r = ty; r < kTile; r += kRowsPerPass) {
#pragma unroll
    for (int c = tx; c < kTile; c += 32) {
      const std::int64_t i = i0 + r, j = j0 + c;
      if (i < rows && j < cols) tile[r][c] = x[i * ld_x + j];
    }
  }
  __syncthreads();
  // Write: y[j0 + r, i0 + c] = tile[c][r].
#pragma unroll
  for (int r = ty; r < kTile; r += kRowsPerPass) {
#pragma unroll
    for (int c = tx; c < kTile; c += 32) {
      const std::int64_t j = j0 + r, i = i0 + c;
      if (j < cols && i < rows) y[j * rows + i] = tile[c][r];
    }
  }
}

}  // namespace

void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y,
               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  // Columns of tiles on grid.x (up to 2^31 - 1), rows of tiles on grid.y (up to 65535: 4.2M rows).
  const std::int64_t row_tiles = (rows + kTile - 1) / kTile;
  if (row_tiles > 65535) throw InvalidArgumentError("transpose: more than 4,194,240 rows");
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile), static_cast<unsigned>(row_tiles));
  transpose_kernel<<<grid, dim3(32, kRowsPerPass), 0, stream>>>(x, rows, cols, ld_x, y);
  CUDABLOCKS_CHECK_LAUNCH("transpose_kernel");
}

}  // namespace cudablocks::cuda
