// The LoRA term of a product joined to the product's fp32 result in one pass:
//   out[t, n] = c[t, n] + bias[n] + sum_j u[t, j] v(n, j)
// with u = x A^T [T, R] (or du in the input gradient) and v = B [n, R] (or A^T) in bf16, R a few
// dozen at most. Per element: c read (4 bytes), out written (4 or 2), R FMAs: memory-bound for the
// ranks LoRA uses (a [4096, 19456] gate/up output at R = 32: 480 MB moved in bf16 out, 2.5 GFMA).
// Against a tensor-core GEMM accumulating into c and a conversion pass after it, this moves c once
// instead of three times.
//
// A block takes 256 columns and `tiles` tiles of 32 rows; a thread 4 rows x 8 consecutive columns
// of a tile (32 accumulators, 16-byte accesses when aligned). v for the block's columns is staged
// in shared memory as fp32 [j][256 columns] (a warp reads one row of it: conflict-free) once for
// all its row tiles when rank <= 32 (else 32 ranks at a time, again per tile), so the staging is
// amortised over tiles x 32 rows; u as [j][32 rows] per tile (a broadcast). Sums run in the CPU
// reference's order (bias, then j ascending) and every term is one exact product rounded once,
// so both backends give the same bits.
#include "cuda/low_rank.cuh"

#include <algorithm>

#include "cuda/bf16_vec.cuh"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kCols = 256;       // columns per block: 32 threads x 8
constexpr int kRows = 32;        // rows per tile: 8 threads x 4
constexpr int kRowsPerThread = 4;
constexpr int kColsPerThread = 8;
constexpr int kRankChunk = 32;   // ranks staged at a time

__device__ __forceinline__ void store_out(float* out, std::int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store_out(std::uint16_t* out, std::int64_t i, float v) { out[i] = bf16_bits(v); }

// vs[j][n] = v(col0 + n, j0 + j) for j < chunk, 0 past the chunk or the last column. With 16-byte
// aligned rows of 8 bf16 along j (B [n, R], R % 8 == 0) or along n (A [R, n], n % 8 == 0), one
// 16-byte load fetches 8 values; else one value per load.
__device__ void stage_v(float (*vs)[kCols], const std::uint16_t* __restrict__ v, std::int64_t v_row,
                        std::int64_t v_col, std::int64_t col0, std::int64_t cols, int j0, int chunk, bool vec) {
  if (vec && v_col == 1) {  // 8 consecutive j of one column
    for (int idx = threadIdx.x; idx < kCols * (kRankChunk / 8); idx += kThreads) {
      const int n = idx / (kRankChunk / 8), j = (idx % (kRankChunk / 8)) * 8;
      const std::int64_t col = col0 + n;
      if (j < chunk && col < cols) {
        const float4 a = load_vec<float4>(v + col * v_row + j0 + j, 0), b = load_vec<float4>(v + col * v_row + j0 + j, 1);
        vs[j][n] = a.x, vs[j + 1][n] = a.y, vs[j + 2][n] = a.z, vs[j + 3][n] = a.w;
        vs[j + 4][n] = b.x, vs[j + 5][n] = b.y, vs[j + 6][n] = b.z, vs[j + 7][n] = b.w;
      } else {
        for (int k = 0; k < 8; ++k) vs[j + k][n] = 0.0f;
      }
    }
  } else if (vec) {  // 8 consecutive columns of one j
    for (int idx = threadIdx.x; idx < kRankChunk * (kCols / 8); idx += kThreads) {
      const int j = idx / (kCols / 8), n = (idx % (kCols / 8)) * 8;
      const std::int64_t col = col0 + n;
      float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
      if (j < chunk && col < cols) {
        a = load_vec<float4>(v + (j0 + j) * v_col + col, 0);
        b = load_vec<float4>(v + (j0 + j) * v_col + col, 1);
      }
      *reinterpret_cast<float4*>(&vs[j][n]) = a;
      *reinterpret_cast<float4*>(&vs[j][n + 4]) = b;
    }
  } else {
    for (int idx = threadIdx.x; idx < kRankChunk * kCols; idx += kThreads) {
      const int j = idx / kCols, n = idx % kCols;
      const std::int64_t col = col0 + n;
      vs[j][n] = j < chunk && col < cols ? bf16_to_float(v[col * v_row + (j0 + j) * v_col]) : 0.0f;
    }
  }
}

// kVec: cols % 8 == 0 and c, out 16-byte aligned: each thread's 8 columns are two float4 loads of c
// and two vector stores.
template <typename Out, bool kVec>
__global__ void __launch_bounds__(kThreads) add_low_rank_kernel(const float* c, const float* __restrict__ bias,
                                                                const std::uint16_t* __restrict__ u,
                                                                const std::uint16_t* __restrict__ v,
                                                                std::int64_t v_row, std::int64_t v_col, bool v_vec,
                                                                std::int64_t rows, std::int64_t cols, int rank,
                                                                int tiles, Out* out) {
  __shared__ __align__(16) float vs[kRankChunk][kCols];
  __shared__ __align__(16) float us[kRankChunk][kRows];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) * kCols;
  const std::int64_t my_col = col0 + tx * kColsPerThread;
  const bool v_once = rank <= kRankChunk;  // the whole of v staged once for every tile
  if (v_once && rank > 0) {
    stage_v(vs, v, v_row, v_col, col0, cols, 0, rank, v_vec);
  }

  for (int tile = 0; tile < tiles; ++tile) {
    const std::int64_t row0 = (static_cast<std::int64_t>(blockIdx.y) * tiles + tile) * kRows;
    if (row0 >= rows) break;
    const std::int64_t my_row = row0 + ty * kRowsPerThread;
    float acc[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const std::int64_t t = my_row + i;
#pragma unroll
      for (int k = 0; k < kColsPerThread; ++k) acc[i][k] = 0.0f;
      if (t >= rows) continue;
      if constexpr (kVec) {
        if (my_col < cols) {
          const float4 a = load_vec<float4>(c + t * cols + my_col, 0), b = load_vec<float4>(c + t * cols + my_col, 1);
          acc[i][0] = a.x, acc[i][1] = a.y, acc[i][2] = a.z, acc[i][3] = a.w;
          acc[i][4] = b.x, acc[i][5] = b.y, acc[i][6] = b.z, acc[i][7] = b.w;
        }
      } else {
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
          if (my_col + k < cols) acc[i][k] = c[t * cols + my_col + k];
        }
      }
      if (bias != nullptr) {
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
          if (my_col + k < cols) acc[i][k] += bias[my_col + k];
        }
      }
    }

    for (int j0 = 0; j0 < rank; j0 += kRankChunk) {
      const int chunk = min(kRankChunk, rank - j0);
      if (!v_once) stage_v(vs, v, v_row, v_col, col0, cols, j0, chunk, v_vec);
      for (int idx = threadIdx.x; idx < kRankChunk * kRows; idx += kThreads) {
        const int j = idx % kRankChunk, r = idx / kRankChunk;
        const std::int64_t t = row0 + r;
        us[j][r] = j < chunk && t < rows ? bf16_to_float(u[t * rank + j0 + j]) : 0.0f;
      }
      __syncthreads();
      for (int j = 0; j < chunk; ++j) {
        const float4 uj = *reinterpret_cast<const float4*>(&us[j][ty * kRowsPerThread]);
        const float4 v0 = *reinterpret_cast<const float4*>(&vs[j][tx * kColsPerThread]);
        const float4 v1 = *reinterpret_cast<const float4*>(&vs[j][tx * kColsPerThread + 4]);
        const float ur[kRowsPerThread] = {uj.x, uj.y, uj.z, uj.w};
        const float vc[kColsPerThread] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int k = 0; k < kColsPerThread; ++k) acc[i][k] = fmaf(ur[i], vc[k], acc[i][k]);
        }
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const std::int64_t t = my_row + i;
      if (t >= rows) continue;
      if constexpr (kVec) {
        if (my_col < cols) {
          store_vec(out + t * cols + my_col, 0, make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
          store_vec(out + t * cols + my_col, 1, make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]));
        }
      } else {
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
          if (my_col + k < cols) store_out(out, t * cols + my_col + k, acc[i][k]);
        }
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

template <typename Out>
void launch(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v, std::int64_t v_row,
            std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, Out* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  // Enough row tiles per block to amortise v's staging, few enough to give every SM ~4 blocks.
  const std::int64_t col_blocks = (cols + kCols - 1) / kCols, row_tiles = (rows + kRows - 1) / kRows;
  const std::int64_t want_blocks = 4 * static_cast<std::int64_t>(multiprocessor_count());
  const int tiles = static_cast<int>(std::clamp<std::int64_t>(col_blocks * row_tiles / want_blocks, 1, 16));
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((row_tiles + tiles - 1) / tiles));
  // 16-byte loads of v: rows of 8 bf16 along j (B, rank % 8 == 0) or along the columns (A, cols % 8 == 0).
  const bool v_vec = rank > 0 && aligned16(v) && (v_col == 1 ? rank % 8 == 0 && v_row % 8 == 0 : v_col % 8 == 0);
  if (cols % kColsPerThread == 0 && aligned16(c) && aligned16(out)) {
    add_low_rank_kernel<Out, true><<<grid, kThreads, 0, stream>>>(c, bias, u, v, v_row, v_col, v_vec, rows, cols,
                                                                  rank, tiles, out);
  } else {
    add_low_rank_kernel<Out, false><<<grid, kThreads, 0, stream>>>(c, bias, u, v, v_row, v_col, v_vec, rows, cols,
                                                                   rank, tiles, out);
  }
  CUDABLOCKS_CHECK_LAUNCH("add_low_rank_kernel");
}

}  // namespace

void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, float* out,
                  cudaStream_t stream) {
  launch(c, bias, u, v, v_row, v_col, rows, cols, rank, out, stream);
}

void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                  std::uint16_t* out, cudaStream_t stream) {
  launch(c, bias, u, v, v_row, v_col, rows, cols, rank, out, stream);
}

}  // namespace cudablocks::cuda
