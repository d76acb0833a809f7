// The tile walk of a transposing kernel, shared by the plain transpose and by the producers that
// write their output transposed (tf32 weight gradients' k-major operands: transpose.cu,
// rmsnorm.cu, swiglu.cu). A block moves tiles of kTransposeTileRows x kTransposeTileCols elements
// of a [rows, cols] matrix, element (i, j) = value(i, j), through shared memory into y [cols, rows]:
// it reads rows of the matrix (each warp-wide read covers 32 consecutive columns) and writes rows
// of y the same way. The tile's rows are padded to 129 floats so that reading a column of it hits
// 32 different banks. Grid (column tiles, row tiles up to 65535, strided over beyond), block
// 32 x kTransposeRowsPerPass (transpose_launch).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace cudablocks::cuda {

constexpr int kTransposeTileRows = 64;    // of the matrix
constexpr int kTransposeTileCols = 128;   // of the matrix
constexpr int kTransposeRowsPerPass = 8;  // a block is 32 x 8 threads: each moves 32 elements

template <class Value>
__device__ __forceinline__ void transpose_tiles(std::int64_t rows, std::int64_t cols, float* __restrict__ y,
                                                Value value) {
  __shared__ float tile[kTransposeTileRows][kTransposeTileCols + 1];
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kTransposeTileCols;  // the matrix's columns
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (std::int64_t i0 = static_cast<std::int64_t>(blockIdx.y) * kTransposeTileRows; i0 < rows;
       i0 += static_cast<std::int64_t>(gridDim.y) * kTransposeTileRows) {
    // Read: tile[r][c] = value(i0 + r, j0 + c).
#pragma unroll
    for (int r = ty; r < kTransposeTileRows; r += kTransposeRowsPerPass) {
#pragma unroll
      for (int c = tx; c < kTransposeTileCols; c += 32) {
        const std::int64_t i = i0 + r, j = j0 + c;
        if (i < rows && j < cols) tile[r][c] = value(i, j);
      }
    }
    __syncthreads();
    // Write: y[j0 + r, i0 + c] = tile[c][r].
#pragma unroll
    for (int r = ty; r < kTransposeTileCols; r += kTransposeRowsPerPass) {
#pragma unroll
      for (int c = tx; c < kTransposeTileRows; c += 32) {
        const std::int64_t j = j0 + r, i = i0 + c;
        if (j < cols && i < rows) y[j * rows + i] = tile[c][r];
      }
    }
    __syncthreads();  // the tile is rewritten by the next row tile
  }
}

// The grid and block of a transposing kernel over a [rows, cols] matrix (rows, cols > 0).
struct TransposeLaunch {
  dim3 grid, block;
  TransposeLaunch(std::int64_t rows, std::int64_t cols)
      : grid(static_cast<unsigned>((cols + kTransposeTileCols - 1) / kTransposeTileCols),
             static_cast<unsigned>(
                 std::min<std::int64_t>((rows + kTransposeTileRows - 1) / kTransposeTileRows, 65535))),
        block(32, kTransposeRowsPerPass) {}
};

}  // namespace cudablocks::cuda
