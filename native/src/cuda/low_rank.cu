// The LoRA term of a product joined to the product's fp32 result in one pass:
//   out[t, n] = c[t, n] + bias[n] + sum_j u[t, j] v(n, j)
// (without c, the term alone: a bf16 product then adds itself onto it in cuBLAS's epilogue)
// with u = x A^T [T, R] (or du in the input gradient) and v = B [n, R] (or A^T) in bf16, R a few
// dozen at most. Per element: c read (4 bytes), out written (4 or 2), R FMAs: memory-bound for the
// ranks LoRA uses (a [4096, 19456] gate/up output at R = 32: 480 MB moved in bf16 out, 2.5 GFMA).
// Against a tensor-core GEMM accumulating into c and a conversion pass after it, this moves c once
// instead of three times.
//
// On tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulators): a warp owns 64 columns (8
// n-tiles) and walks 16-row tiles; each tile's accumulators start as c (+ bias) and take the rank
// in steps of 16 (u as A, v as B, zero-padded past the rank), then go out, while the next tile's c
// is already loading. The products cost nothing next to the memory traffic; v's fragments for the
// first 32 ranks stay in registers for all the warp's tiles. c is read and out written in the
// accumulator layout: per row 4 lanes x 8 bytes, 32-byte sectors used whole. The tensor core sums
// a step's exact products in fp32 in an order of its own, so against the CPU's sequential sum the
// result may differ in the last bits (relative 3e-8 at rank 16 on random data).
// H200, 2026-11-28, [4096, n] at rank 16 (32 for gate/up): 2.2-2.3 TB/s against 3.2-4.1 for a
// copy of c; a CUDA-core version (the CPU's order, the same bits) reached 1.6-1.9 TB/s.
#include "cuda/low_rank.cuh"

#include <algorithm>

#include "cuda/bf16_vec.cuh"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/mma_sync.cuh"

namespace cudablocks::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kNTiles = 8;                     // 8-column mma tiles per warp
constexpr int kWarpCols = 8 * kNTiles;         // 64
constexpr int kBlockCols = kWarps * kWarpCols;  // 256
constexpr int kTileRows = 16;
constexpr int kKeptSteps = 2;                  // rank steps of v kept in registers

__device__ __forceinline__ std::uint32_t pack2(std::uint16_t lo, std::uint16_t hi) {
  return static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
}

__device__ __forceinline__ void store2(float* out, std::int64_t i, float a, float b, bool both, bool vec) {
  if (vec && both) {
    *reinterpret_cast<float2*>(out + i) = make_float2(a, b);
    return;
  }
  out[i] = a;
  if (both) out[i + 1] = b;
}
__device__ __forceinline__ void store2(std::uint16_t* out, std::int64_t i, float a, float b, bool both, bool vec) {
  if (vec && both) {
    *reinterpret_cast<std::uint32_t*>(out + i) = pack2(bf16_bits(a), bf16_bits(b));
    return;
  }
  out[i] = bf16_bits(a);
  if (both) out[i + 1] = bf16_bits(b);
}

// vec: cols even and c, out aligned for 8-byte (fp32) / 4-byte (bf16) pairs.
template <typename Out>
__global__ void __launch_bounds__(kThreads) add_low_rank_kernel(const float* c, const float* __restrict__ bias,
                                                                const std::uint16_t* __restrict__ u,
                                                                const std::uint16_t* __restrict__ v,
                                                                std::int64_t v_row, std::int64_t v_col,
                                                                std::int64_t rows, std::int64_t cols, int rank,
                                                                std::int64_t rows_per_block, bool vec, Out* out) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const std::int64_t col_w = static_cast<std::int64_t>(blockIdx.x) * kBlockCols + (threadIdx.x / 32) * kWarpCols;
  if (col_w >= cols) return;  // no barriers below
  const std::int64_t row_begin = static_cast<std::int64_t>(blockIdx.y) * rows_per_block;
  const std::int64_t row_end = rows < row_begin + rows_per_block ? rows : row_begin + rows_per_block;
  const int steps = (rank + 15) / 16;
  auto u_at = [&](std::int64_t r, int k) -> std::uint16_t { return r < rows && k < rank ? u[r * rank + k] : 0; };
  auto v_at = [&](std::int64_t n, int k) -> std::uint16_t {
    return n < cols && k < rank ? v[n * v_row + k * v_col] : 0;
  };
  // B fragment of n-tile i, rank step s: column col_w + 8 i + g, ranks 16 s + 2t (+1), + 8 (+1).
  auto b_frag = [&](int s, int i, std::uint32_t b[2]) {
    const std::int64_t n = col_w + 8 * i + g;
    const int k = 16 * s + 2 * t;
    b[0] = pack2(v_at(n, k), v_at(n, k + 1));
    b[1] = pack2(v_at(n, k + 8), v_at(n, k + 9));
  };
  std::uint32_t kept[kKeptSteps][kNTiles][2];
#pragma unroll
  for (int s = 0; s < kKeptSteps; ++s) {
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) b_frag(s, i, kept[s][i]);
  }
  float bias_f[kNTiles][2];
#pragma unroll
  for (int i = 0; i < kNTiles; ++i) {
    const std::int64_t col = col_w + 8 * i + 2 * t;
    bias_f[i][0] = bias != nullptr && col < cols ? bias[col] : 0.0f;
    bias_f[i][1] = bias != nullptr && col + 1 < cols ? bias[col + 1] : 0.0f;
  }

  // c of the tile at row0 in the accumulator layout (0 past the rows or the columns, or without c).
  auto load_tile = [&](std::int64_t row0, float tile[kNTiles][4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::int64_t r = row0 + g + 8 * h;
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        const std::int64_t col = col_w + 8 * i + 2 * t;
        float a = 0.0f, b = 0.0f;
        if (c != nullptr && r < row_end && col < cols) {
          const float* p = c + r * cols + col;
          if (vec && col + 1 < cols) {
            const float2 pair = *reinterpret_cast<const float2*>(p);
            a = pair.x, b = pair.y;
          } else {
            a = p[0];
            if (col + 1 < cols) b = p[1];
          }
        }
        tile[i][2 * h] = a, tile[i][2 * h + 1] = b;
      }
    }
  };
  // The next tile's c is loaded while this one is multiplied and stored (loads in flight across
  // the whole loop, not only at its start).
  float next[kNTiles][4];
  load_tile(row_begin, next);
  for (std::int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    float acc[kNTiles][4];
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] = next[i][e];
    }
    if (row0 + kTileRows < row_end) load_tile(row0 + kTileRows, next);
    if (bias != nullptr) {
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        acc[i][0] += bias_f[i][0], acc[i][1] += bias_f[i][1];
        acc[i][2] += bias_f[i][0], acc[i][3] += bias_f[i][1];
      }
    }
    for (int s = 0; s < steps; ++s) {
      const int k = 16 * s + 2 * t;
      const std::int64_t r = row0 + g;
      const std::uint32_t a[4] = {pack2(u_at(r, k), u_at(r, k + 1)), pack2(u_at(r + 8, k), u_at(r + 8, k + 1)),
                                  pack2(u_at(r, k + 8), u_at(r, k + 9)), pack2(u_at(r + 8, k + 8), u_at(r + 8, k + 9))};
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        std::uint32_t b[2] = {s == 0 ? kept[0][i][0] : kept[1][i][0], s == 0 ? kept[0][i][1] : kept[1][i][1]};
        if (s >= kKeptSteps) b_frag(s, i, b);
        mma_bf16_16816(acc[i], a, b);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::int64_t r = row0 + g + 8 * h;
      if (r >= row_end) continue;
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        const std::int64_t col = col_w + 8 * i + 2 * t;
        if (col < cols) store2(out, r * cols + col, acc[i][2 * h], acc[i][2 * h + 1], col + 1 < cols, vec);
      }
    }
  }
}

bool aligned(const void* p, unsigned bytes) { return (reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) == 0; }

template <typename Out>
void launch(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v, std::int64_t v_row,
            std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, Out* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  // Row tiles split over enough blocks for ~6 per SM (4 warps each: occupancy hides the loads).
  const std::int64_t col_blocks = (cols + kBlockCols - 1) / kBlockCols;
  const std::int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  const std::int64_t want = 6 * static_cast<std::int64_t>(multiprocessor_count());
  const std::int64_t groups = std::clamp<std::int64_t>(want / col_blocks, 1, row_tiles);
  const std::int64_t rows_per_block = (row_tiles + groups - 1) / groups * kTileRows;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
  const bool vec = cols % 2 == 0 && aligned(c, 8) && aligned(out, 2 * sizeof(Out));
  add_low_rank_kernel<Out><<<grid, kThreads, 0, stream>>>(c, bias, u, v, v_row, v_col, rows, cols, rank,
                                                          rows_per_block, vec, out);
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
