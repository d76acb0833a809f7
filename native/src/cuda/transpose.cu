// fp32 matrix transpose: y [cols, rows] = x [rows, cols]^T. No FLOPs, 8 bytes per element (a
// [4096, 9728] activation: 319 MB, ~0.1 ms at 3 TB/s). Why it exists: tf32 tensor-core GEMMs need
// both operands k-major, and a weight gradient dW = dY^T X (k = tokens) has neither; cuBLAS then
// runs at about 60% of its k-major rate, so the fp32 block transposes dY and X first.
//
// A block moves a tile of 64 rows x 128 columns of x through shared memory: it reads rows of x
// (each warp-wide read covers 32 consecutive columns, 128 bytes) and writes rows of y the same
// way. The tile's rows are padded to 129 floats so that reading a column of it hits 32 different
// banks. H200, [4096, 9728] out of rows of 19456 floats: 3.2 TB/s (a 64 x 64 tile 2.3, 32 x 32
// 1.8; a copy 4.1).
#include "cuda/transpose.cuh"

#include <algorithm>

#include "cuda/check.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kTileRows = 64;    // of x
constexpr int kTileCols = 128;   // of x
constexpr int kRowsPerPass = 8;  // a block is 32 x 8 threads: each moves 32 elements

__global__ void __launch_bounds__(32 * kRowsPerPass) transpose_kernel(const float* __restrict__ x, std::int64_t rows,
                                                                      std::int64_t cols, std::int64_t ld_x,
                                                                      float* __restrict__ y) {
  __shared__ float tile[kTileRows][kTileCols + 1];
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kTileCols;  // x's columns
  const int tx = threadIdx.x, ty = threadIdx.y;
  // x's rows by tiles, striding over grid.y (at most 65535 blocks that way).
  for (std::int64_t i0 = static_cast<std::int64_t>(blockIdx.y) * kTileRows; i0 < rows;
       i0 += static_cast<std::int64_t>(gridDim.y) * kTileRows) {
    // Read: tile[r][c] = x[i0 + r, j0 + c].
#pragma unroll
    for (int r = ty; r < kTileRows; r += kRowsPerPass) {
#pragma unroll
      for (int c = tx; c < kTileCols; c += 32) {
        const std::int64_t i = i0 + r, j = j0 + c;
        if (i < rows && j < cols) tile[r][c] = x[i * ld_x + j];
      }
    }
    __syncthreads();
    // Write: y[j0 + r, i0 + c] = tile[c][r].
#pragma unroll
    for (int r = ty; r < kTileCols; r += kRowsPerPass) {
#pragma unroll
      for (int c = tx; c < kTileRows; c += 32) {
        const std::int64_t j = j0 + r, i = i0 + c;
        if (j < cols && i < rows) y[j * rows + i] = tile[c][r];
      }
    }
    __syncthreads();  // the tile is rewritten by the next row tile
  }
}

}  // namespace

void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y,
               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  // Columns of tiles on grid.x (up to 2^31 - 1), rows of tiles on grid.y, which the kernel strides
  // over past 65535.
  const std::int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  const dim3 grid(static_cast<unsigned>((cols + kTileCols - 1) / kTileCols),
                  static_cast<unsigned>(std::min<std::int64_t>(row_tiles, 65535)));
  transpose_kernel<<<grid, dim3(32, kRowsPerPass), 0, stream>>>(x, rows, cols, ld_x, y);
  CUDABLOCKS_CHECK_LAUNCH("transpose_kernel");
}

}  // namespace cudablocks::cuda
