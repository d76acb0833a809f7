// The LoRA term of a product joined to the product's fp32 result in one pass:
//   out[t, n] = c[t, n] + bias[n] + sum_j u[t, j] v(n, j)
// (without c, the term alone: a product then adds itself onto it in cuBLAS's epilogue)
// with u = x A^T [T, R] (or du in the input gradient) and v = B [n, R] (or A^T) in bf16, R a few
// dozen at most. Per element: c read (4 bytes), out written (4 or 2), R FMAs: memory-bound for the
// ranks LoRA uses (a [4096, 19456] gate/up output at R = 32: 480 MB moved in bf16 out, 2.5 GFMA).
// Against a tensor-core GEMM accumulating into c and a conversion pass after it, this moves c once
// instead of three times.
//
// On tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulators): a warp owns 64 columns (8
// n-tiles) and walks 16-row tiles; the term u v^T of a tile takes the rank in steps of 16 (u as A,
// v as B, zero-padded past the rank), v's fragments for the first 32 ranks staying in registers.
// The tile then goes through shared memory into a coalesced layout (a half-warp per row of 64
// columns, 16-byte fp32 / 8-byte bf16 accesses), where bias and c join it and out is written;
// the next tile's c and u are loading meanwhile. The tensor core sums a step's exact products in
// fp32 in an order of its own and c is added last, so against the CPU's sequential sum the result
// may differ in the last bits (relative 2-5e-8 at ranks 16-40 on random data).
// Full tiles and in-range lanes skip the per-row and per-column checks: the index arithmetic was
// most of the kernel's instructions (SASS).
// H200, 2026-11-28, [4096, n], rank 16 (32 for gate/up), against a copy of c at 3.1-4.1 TB/s:
// with c 2.5-3.1 TB/s (gate/up bf16 out 155 us, d_act 84, q 41); the term alone (no c) writes
// 1.3-1.8 TB/s, bound by the mma and staging side. The accumulator layout read and written
// directly (8- or 4-byte accesses, 2.2 TB/s) and a CUDA-core version (1.6-1.9 TB/s) were slower.
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
constexpr int kKeptSteps = 2;                  // rank steps of v kept in registers (and of u prefetched)
constexpr int kStageLd = kWarpCols + 8;        // words per row of a warp's staged tile
constexpr int kLanesPerRow = kWarpCols / 4;    // the coalesced side: 4 columns per lane
constexpr int kRowsPerPass = 32 / kLanesPerRow;
constexpr int kPasses = kTileRows / kRowsPerPass;
constexpr int kMinBlocks = 3;                  // per SM (registers capped to fit: a few bytes spill)

__device__ __forceinline__ std::uint32_t pack2(std::uint16_t lo, std::uint16_t hi) {
  return static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
}

// vec: cols a multiple of 4 and c, out aligned for float4 (out: 4 elements) accesses; bias_vec
// likewise for bias.
template <typename Out>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    add_low_rank_kernel(const float* c, const float* __restrict__ bias, const std::uint16_t* __restrict__ u,
                        const std::uint16_t* __restrict__ v, std::int64_t v_row, std::int64_t v_col, std::int64_t rows,
                        std::int64_t cols, int rank, std::int64_t rows_per_block, bool vec, bool bias_vec, Out* out) {
  __shared__ __align__(16) float stage[kWarps][kTileRows * kStageLd];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const std::int64_t col_w = static_cast<std::int64_t>(blockIdx.x) * kBlockCols + warp * kWarpCols;
  if (col_w >= cols) return;  // no block-wide barriers below
  const std::int64_t row_begin = static_cast<std::int64_t>(blockIdx.y) * rows_per_block;
  const std::int64_t row_end = rows < row_begin + rows_per_block ? rows : row_begin + rows_per_block;
  const int steps = (rank + 15) / 16;
  auto u_at = [&](std::int64_t r, int k) -> std::uint16_t { return r < rows && k < rank ? u[r * rank + k] : 0; };
  // u[r, k], u[r, k + 1] (k even) as one bf16x2 word: one 32-bit load when rank is even.
  const bool u_vec = rank % 2 == 0 && (reinterpret_cast<std::uintptr_t>(u) & 3u) == 0;
  auto u_word = [&](const std::uint16_t* p, int k) -> std::uint32_t {
    return k < rank ? *reinterpret_cast<const std::uint32_t*>(p + k) : 0u;
  };
  // A fragment of rank step s for the tile at row0: rows row0 + g (+ 8), ranks 16 s + 2t (+1), + 8 (+1).
  // A full tile (16 rows before row_end: most of them) with u_vec reads u without row checks.
  auto a_frag = [&](std::int64_t row0, bool full, int s, std::uint32_t a[4]) {
    const int k = 16 * s + 2 * t;
    if (full && u_vec) {
      const std::uint16_t* u0 = u + (row0 + g) * rank;
      const std::uint16_t* u8 = u0 + 8 * rank;
      a[0] = u_word(u0, k), a[1] = u_word(u8, k), a[2] = u_word(u0, k + 8), a[3] = u_word(u8, k + 8);
      return;
    }
    const std::int64_t r = row0 + g;
    a[0] = pack2(u_at(r, k), u_at(r, k + 1)), a[1] = pack2(u_at(r + 8, k), u_at(r + 8, k + 1));
    a[2] = pack2(u_at(r, k + 8), u_at(r, k + 9)), a[3] = pack2(u_at(r + 8, k + 8), u_at(r + 8, k + 9));
  };
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

  // The coalesced side: lane l takes the 4 columns col_w + 4 (l % kLanesPerRow) ... + 3 of the
  // tile's rows l / kLanesPerRow + kRowsPerPass j (j < kPasses): a row's columns in one access.
  const int quad_row = lane / kLanesPerRow;
  const std::int64_t col = col_w + 4 * (lane % kLanesPerRow);
  const bool lane_vec = vec && col + 3 < cols;
  const std::int64_t pass_stride = kRowsPerPass * cols;
  auto valid = [&](int e) { return col + e < cols; };
  // p[0..3], those before cols (zeros past them), as a float4: one 16-byte load when `whole`.
  auto load4 = [&](const float* p, bool whole) {
    if (whole) return *reinterpret_cast<const float4*>(p);
    return make_float4(valid(0) ? p[0] : 0.0f, valid(1) ? p[1] : 0.0f, valid(2) ? p[2] : 0.0f,
                       valid(3) ? p[3] : 0.0f);
  };
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const float4 bias4 = bias != nullptr ? load4(bias + col, bias_vec && valid(3)) : zero;
  // c's part of the tile at row0 for this lane (zeros without c or past the edges).
  auto load_c = [&](std::int64_t row0, bool full, float4 tile[kPasses]) {
#pragma unroll
    for (int j = 0; j < kPasses; ++j) {
      const bool row_in = full || row0 + quad_row + kRowsPerPass * j < row_end;
      tile[j] = c != nullptr && row_in ? load4(c + (row0 + quad_row) * cols + col + j * pass_stride, lane_vec) : zero;
    }
  };

  // The next tile's c and u (its first kKeptSteps rank steps) are loaded while this one is
  // multiplied and stored (loads in flight across the whole loop, not only at its start).
  auto full_at = [&](std::int64_t row0) { return row0 + kTileRows <= row_end; };
  float4 next_c[kPasses];
  std::uint32_t next_a[kKeptSteps][4] = {};
  load_c(row_begin, full_at(row_begin), next_c);
#pragma unroll
  for (int s = 0; s < kKeptSteps; ++s) {
    if (s < steps) a_frag(row_begin, full_at(row_begin), s, next_a[s]);
  }
  float* sw = stage[warp];
  for (std::int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    const bool full = full_at(row0);
    float4 c_tile[kPasses];
    std::uint32_t a_kept[kKeptSteps][4];
#pragma unroll
    for (int j = 0; j < kPasses; ++j) c_tile[j] = next_c[j];
#pragma unroll
    for (int s = 0; s < kKeptSteps; ++s) {
#pragma unroll
      for (int e = 0; e < 4; ++e) a_kept[s][e] = next_a[s][e];
    }
    const std::int64_t next0 = row0 + kTileRows;
    if (next0 < row_end) {
      load_c(next0, full_at(next0), next_c);
#pragma unroll
      for (int s = 0; s < kKeptSteps; ++s) {
        if (s < steps) a_frag(next0, full_at(next0), s, next_a[s]);
      }
    }
    // The term u v^T of the tile, in the accumulator layout.
    float acc[kNTiles][4] = {};
#pragma unroll
    for (int s = 0; s < kKeptSteps; ++s) {
      if (s < steps) {
#pragma unroll
        for (int i = 0; i < kNTiles; ++i) mma_bf16_16816(acc[i], a_kept[s], kept[s][i]);
      }
    }
    for (int s = kKeptSteps; s < steps; ++s) {
      std::uint32_t a[4];
      a_frag(row0, full, s, a);
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        std::uint32_t b[2];
        b_frag(s, i, b);
        mma_bf16_16816(acc[i], a, b);
      }
    }
    // Through shared memory into the coalesced layout (row stride 72 words: the float2 stores of a
    // half-warp hit 32 distinct banks), then out = term + bias + c, one 16- or 8-byte store per row.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        *reinterpret_cast<float2*>(sw + (g + 8 * h) * kStageLd + 8 * i + 2 * t) =
            make_float2(acc[i][2 * h], acc[i][2 * h + 1]);
      }
    }
    __syncwarp();
    Out* o = out + (row0 + quad_row) * cols + col;
#pragma unroll
    for (int j = 0; j < kPasses; ++j) {
      const int rt = quad_row + kRowsPerPass * j;
      const float4 term = *reinterpret_cast<const float4*>(sw + rt * kStageLd + 4 * (lane % kLanesPerRow));
      const float4 x = make_float4(term.x + bias4.x + c_tile[j].x, term.y + bias4.y + c_tile[j].y,
                                   term.z + bias4.z + c_tile[j].z, term.w + bias4.w + c_tile[j].w);
      Out* q = o + j * pass_stride;
      if (!full && row0 + rt >= row_end) continue;
      if (lane_vec) {
        store_vec(q, 0, x);
      } else {
        const float xs[4] = {x.x, x.y, x.z, x.w};
        for (int e = 0; e < 4; ++e) {
          if (valid(e)) store_vec(q, e, xs[e]);
        }
      }
    }
    __syncwarp();  // the stage is rewritten by the next tile
  }
}

bool aligned(const void* p, unsigned bytes) { return (reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) == 0; }

template <typename Out>
void launch(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v, std::int64_t v_row,
            std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, Out* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  // Row tiles split over one wave of blocks (kMinBlocks per SM): each warp's start (v's fragments)
  // is paid once for as many tiles as possible (H200: 10-15% faster than 2 or 4 waves).
  const std::int64_t col_blocks = (cols + kBlockCols - 1) / kBlockCols;
  const std::int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  const std::int64_t want = kMinBlocks * static_cast<std::int64_t>(multiprocessor_count());
  const std::int64_t groups = std::clamp<std::int64_t>(want / col_blocks, 1, row_tiles);
  const std::int64_t rows_per_block = (row_tiles + groups - 1) / groups * kTileRows;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
  const bool vec = cols % 4 == 0 && aligned(c, 16) && aligned(out, 4 * sizeof(Out));
  const bool bias_vec = cols % 4 == 0 && aligned(bias, 16);
  add_low_rank_kernel<Out><<<grid, kThreads, 0, stream>>>(c, bias, u, v, v_row, v_col, rows, cols, rank,
                                                          rows_per_block, vec, bias_vec, out);
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
