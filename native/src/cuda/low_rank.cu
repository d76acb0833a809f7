// The LoRA term of a product joined to the product's fp32 result in one pass:
//   out[t, n] = c[t, n] + bias[n] + sum_j u[t, j] v(n, j)
// with u = x A^T [T, R] (or du in the input gradient) and v = B [n, R] (or A^T) in bf16, R a few
// dozen at most. Per element: c read (4 bytes), out written (4 or 2), R FMAs: memory-bound for the
// ranks LoRA uses (a [4096, 19456] gate/up output at R = 32: 480 MB moved in bf16 out, 2.5 GFMA).
// Against a tensor-core GEMM accumulating into c and a conversion pass after it, this moves c once
// instead of three times.
//
// A block takes 32 rows x 256 columns; a thread 4 rows x 8 consecutive columns (32 accumulators,
// 16-byte accesses when aligned). u and v are staged 32 ranks at a time in shared memory as fp32,
// v as [j][256 columns] so a warp reads one row of it (conflict-free) and u as [j][32 rows]
// (a broadcast). Sums run in the CPU reference's order (bias, then j ascending), and every term is
// one exact product rounded once, so both backends give the same bits.
#include "cuda/low_rank.cuh"

#include <algorithm>

#include "cuda/bf16_vec.cuh"
#include "cuda/check.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kCols = 256;       // columns per block: 32 threads x 8
constexpr int kRows = 32;        // rows per block: 8 threads x 4
constexpr int kRowsPerThread = 4;
constexpr int kColsPerThread = 8;
constexpr int kRankChunk = 32;   // ranks staged at a time

__device__ __forceinline__ void store_out(float* out, std::int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store_out(std::uint16_t* out, std::int64_t i, float v) { out[i] = bf16_bits(v); }

// kVec: cols % 8 == 0 and c, out 16-byte aligned: each thread's 8 columns are two float4 loads of c
// and one 16- (bf16) or two 16-byte (fp32) stores.
template <typename Out, bool kVec>
__global__ void __launch_bounds__(kThreads) add_low_rank_kernel(const float* c, const float* __restrict__ bias,
                                                                const std::uint16_t* __restrict__ u,
                                                                const std::uint16_t* __restrict__ v,
                                                                std::int64_t v_row, std::int64_t v_col,
                                                                std::int64_t rows, std::int64_t cols, int rank,
                                                                Out* out) {
  __shared__ float vs[kRankChunk][kCols];
  __shared__ float us[kRankChunk][kRows];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) * kCols;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kRows;
  const std::int64_t my_col = col0 + tx * kColsPerThread;
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
    // v(n, j) for the block's columns; consecutive threads take consecutive addresses of v
    // (j fastest when v is [n, R], n fastest when it is A [R, n]).
    for (int idx = threadIdx.x; idx < kRankChunk * kCols; idx += kThreads) {
      const bool j_fast = v_col == 1;
      const int j = j_fast ? idx % kRankChunk : idx / kCols;
      const int n = j_fast ? idx / kRankChunk : idx % kCols;
      const std::int64_t col = col0 + n;
      vs[j][n] = j < chunk && col < cols ? bf16_to_float(v[col * v_row + (j0 + j) * v_col]) : 0.0f;
    }
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

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

template <typename Out>
void launch(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v, std::int64_t v_row,
            std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, Out* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const dim3 grid(static_cast<unsigned>((cols + kCols - 1) / kCols), static_cast<unsigned>((rows + kRows - 1) / kRows));
  if (cols % kColsPerThread == 0 && aligned16(c) && aligned16(out)) {
    add_low_rank_kernel<Out, true><<<grid, kThreads, 0, stream>>>(c, bias, u, v, v_row, v_col, rows, cols, rank, out);
  } else {
    add_low_rank_kernel<Out, false><<<grid, kThreads, 0, stream>>>(c, bias, u, v, v_row, v_col, rows, cols, rank, out);
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
