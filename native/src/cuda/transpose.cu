// fp32 matrix transpose: y [cols, rows] = x [rows, cols]^T. No FLOPs, 8 bytes per element (a
// [4096, 9728] activation: 319 MB, ~0.1 ms at 3 TB/s). Why it exists: tf32 tensor-core GEMMs need
// both operands k-major, and a weight gradient dW = dY^T X (k = tokens) has neither; cuBLAS then
// runs at about 60% of its k-major rate, so the fp32 block transposes dY and X first.
//
// The tiles: transpose_tiles.cuh. H200, [4096, 9728] out of rows of 19456 floats: 3.2 TB/s (a
// 64 x 64 tile 2.3, 32 x 32 1.8; a copy 4.1).
#include "cuda/transpose.cuh"

#include "cuda/check.hpp"
#include "cuda/transpose_tiles.cuh"

namespace cudablocks::cuda {

namespace {

__global__ void __launch_bounds__(32 * kTransposeRowsPerPass)
    transpose_kernel(const float* __restrict__ x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x,
                     float* __restrict__ y) {
  transpose_tiles(rows, cols, y, [&](std::int64_t i, std::int64_t j) { return x[i * ld_x + j]; });
}

}  // namespace

void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y,
               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const TransposeLaunch launch(rows, cols);
  transpose_kernel<<<launch.grid, launch.block, 0, stream>>>(x, rows, cols, ld_x, y);
  CUDABLOCKS_CHECK_LAUNCH("transpose_kernel");
}

}  // namespace cudablocks::cuda
