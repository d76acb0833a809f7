// RMSNorm forward and backward.
//
// Forward. Bytes: read x and w, write y: 8 bytes per element, ~0 FLOP per byte, so the
// kernel is bound by memory bandwidth. One block per row; the row is read twice (sum of squares,
// then scale), the second time from L1/L2, which holds a row of a few KB easily.
//
// Forward written transposed (tf32 backward's recompute of the weight gradients' k-major operand,
// from the forward's rstd): the forward's arithmetic per element, through transpose_tiles.cuh,
// instead of a forward pass and a transpose pass (8 bytes per element instead of 16).
//
// Backward. Bytes: read dy, x (twice, the second time from L1/L2) and w, write dx (+ read the
// residual gradient when given, + write its bf16 copy when asked: 2 bytes against the 6 of a
// conversion pass): 12-18 bytes per element, ~8 FLOPs per element: memory-bound. Two stages:
//   1. rmsnorm_backward_kernel: a block strides over rows (a few per block); per row a block
//      reduction gives dot = sum(dy * w * x), then dx is written and the block's dw partial
//      (cols floats in shared memory, each thread owning the same columns for every row: no
//      conflicts, no atomics) accumulates dy * x * rstd. At the end the partial goes to scratch
//      [blocks, cols].
//   2. add_column_partials (bias.cu) adds the partials into dw in a fixed order: deterministic.
//   Extra traffic: blocks * cols * 8 bytes; with >= 4 rows per block and <= 4 blocks per SM that is
//   at most ~1/6 of the main pass (850 rows), negligible at thousands of rows.
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/rmsnorm.cuh"
#include "cuda/bf16_vec.cuh"
#include "cuda/bias.cuh"
#include "cuda/block_reduce.cuh"
#include "cuda/scratch.hpp"
#include "cuda/transpose_tiles.cuh"

#include <algorithm>
#include <optional>

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

// VEC = 4: float4 loads (cols divisible by 4, 16-byte aligned rows); VEC = 1: any shape.
// Out = float, or std::uint16_t for bf16 output (rounded from the same fp32 value).
template <int VEC, typename Out>
__global__ void __launch_bounds__(kThreads) rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                              Out* __restrict__ y, float* __restrict__ rstd,
                                                              std::int64_t cols, float eps) {
  using Vec = typename VecType<VEC>::type;
  const std::int64_t row = blockIdx.x;
  const Vec* xr = reinterpret_cast<const Vec*>(x + row * cols);
  const Vec* wv = reinterpret_cast<const Vec*>(w);
  Out* yr = y + row * cols;
  const std::int64_t n = cols / VEC;

  float sum = 0.0f;
  for (std::int64_t i = threadIdx.x; i < n; i += kThreads) {
    Vec v = xr[i];
    const float* e = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += e[j] * e[j];
  }
  sum = block_sum<kThreads>(sum);
  const float s = rsqrtf(sum / static_cast<float>(cols) + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = s;

  for (std::int64_t i = threadIdx.x; i < n; i += kThreads) {
    Vec v = xr[i];
    Vec g = wv[i];
    float* e = reinterpret_cast<float*>(&v);
    const float* ge = reinterpret_cast<const float*>(&g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = ge[j] * (e[j] * s);
    store_vec(yr, i, v);
  }
}

// y^T[c, r] = w[c] * (x[r, c] * rstd[r]): the forward kernel's product order, so the same bits.
__global__ void __launch_bounds__(32 * kTransposeRowsPerPass)
    rmsnorm_forward_transposed_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ rstd, float* __restrict__ y_t, std::int64_t rows,
                                      std::int64_t cols) {
  transpose_tiles(rows, cols, y_t, [&](std::int64_t i, std::int64_t j) { return w[j] * (x[i * cols + j] * rstd[i]); });
}

// See the header comment. Dynamic shared memory: cols floats (the block's dw partial).
template <int VEC>
__global__ void __launch_bounds__(kThreads) rmsnorm_backward_kernel(const float* __restrict__ dy, const float* __restrict__ x,
                                                               const float* __restrict__ w, const float* __restrict__ rstd,
                                                               const float* residual, float* dx,  // may alias
                                                               std::uint16_t* __restrict__ dx16,
                                                               float* __restrict__ dw_partial, std::int64_t rows,
                                                               std::int64_t cols) {
  using Vec = typename VecType<VEC>::type;
  extern __shared__ float4 dw_shared_raw[];
  Vec* dw_s = reinterpret_cast<Vec*>(dw_shared_raw);
  const std::int64_t n = cols / VEC;
  const Vec* wv = reinterpret_cast<const Vec*>(w);
  const bool take_dw = dw_partial != nullptr;  // nullptr: a frozen norm (no shared memory given)
  // Each thread zeroes, updates and writes out only its own columns: no barrier needed.
  for (std::int64_t i = threadIdx.x; take_dw && i < n; i += kThreads) {
    float* e = reinterpret_cast<float*>(&dw_s[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = 0.0f;
  }
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const Vec* dyr = reinterpret_cast<const Vec*>(dy + row * cols);
    const Vec* xr = reinterpret_cast<const Vec*>(x + row * cols);
    Vec* dxr = reinterpret_cast<Vec*>(dx + row * cols);
    const Vec* rr = residual != nullptr ? reinterpret_cast<const Vec*>(residual + row * cols) : nullptr;
    const float s = rstd[row];
    float dot = 0.0f;
    for (std::int64_t i = threadIdx.x; i < n; i += kThreads) {
      const Vec a = dyr[i], b = xr[i], g = wv[i];
      const float* ae = reinterpret_cast<const float*>(&a);
      const float* be = reinterpret_cast<const float*>(&b);
      const float* ge = reinterpret_cast<const float*>(&g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) dot += ae[j] * ge[j] * be[j];
    }
    dot = block_sum<kThreads>(dot);
    const float coef = dot * s * s * inv_cols;
    for (std::int64_t i = threadIdx.x; i < n; i += kThreads) {
      const Vec a = dyr[i], b = xr[i], g = wv[i];
      const float* ae = reinterpret_cast<const float*>(&a);
      const float* be = reinterpret_cast<const float*>(&b);
      const float* ge = reinterpret_cast<const float*>(&g);
      Vec out;
      if (rr != nullptr) out = rr[i];
      float* oe = reinterpret_cast<float*>(&out);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float v = s * (ae[j] * ge[j] - be[j] * coef);
        oe[j] = rr != nullptr ? oe[j] + v : v;
      }
      dxr[i] = out;
      if (dx16 != nullptr) store_vec(dx16 + row * cols, i, out);
      if (take_dw) {
        float* de = reinterpret_cast<float*>(&dw_s[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) de[j] += ae[j] * (be[j] * s);
      }
    }
  }
  if (!take_dw) return;
  Vec* part = reinterpret_cast<Vec*>(dw_partial + static_cast<std::int64_t>(blockIdx.x) * cols);
  for (std::int64_t i = threadIdx.x; i < n; i += kThreads) part[i] = dw_s[i];
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace

namespace {

template <typename Out>
void forward(const float* x, const float* w, Out* y, float* rstd, std::int64_t rows, std::int64_t cols, float eps,
             cudaStream_t stream) {
  if (rows == 0) return;
  const bool vec4 = cols % 4 == 0 && aligned16(x) && aligned16(w) &&
                    (reinterpret_cast<std::uintptr_t>(y) & (4 * sizeof(Out) - 1)) == 0;
  const dim3 grid(static_cast<unsigned>(rows));
  if (vec4) {
    rmsnorm_forward_kernel<4, Out><<<grid, kThreads, 0, stream>>>(x, w, y, rstd, cols, eps);
  } else {
    rmsnorm_forward_kernel<1, Out><<<grid, kThreads, 0, stream>>>(x, w, y, rstd, cols, eps);
  }
  CUDABLOCKS_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

}  // namespace

void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                     std::int64_t cols, float eps, cudaStream_t stream) {
  forward(x, w, y, rstd, rows, cols, eps, stream);
}

void rmsnorm_forward_bf16(const float* x, const float* w, std::uint16_t* y, float* rstd, std::int64_t rows,
                          std::int64_t cols, float eps, cudaStream_t stream) {
  forward(x, w, y, rstd, rows, cols, eps, stream);
}

void rmsnorm_forward_transposed(const float* x, const float* w, const float* rstd, float* y_t, std::int64_t rows,
                                std::int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const TransposeLaunch launch(rows, cols);
  rmsnorm_forward_transposed_kernel<<<launch.grid, launch.block, 0, stream>>>(x, w, rstd, y_t, rows, cols);
  CUDABLOCKS_CHECK_LAUNCH("rmsnorm_forward_transposed_kernel");
}

void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, const float* residual,
                      float* dx, std::uint16_t* dx16, float* dw, std::int64_t rows, std::int64_t cols,
                      cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const bool vec4 = cols % 4 == 0 && aligned16(dy) && aligned16(x) && aligned16(w) && aligned16(dx) &&
                    (residual == nullptr || aligned16(residual)) &&
                    (reinterpret_cast<std::uintptr_t>(dx16) & 7u) == 0;
  // At least 4 rows per block (bounds the partials' traffic), at most 4 blocks per SM (what fits
  // at once: 64 registers x 256 threads x 4 = the register file).
  const std::int64_t blocks = std::clamp<std::int64_t>((rows + 3) / 4, 1, 4 * static_cast<std::int64_t>(multiprocessor_count()));
  // The dw partials (shared memory and scratch) only when there is a dw to take.
  const bool take_dw = dw != nullptr;
  const std::size_t smem = take_dw ? sizeof(float) * static_cast<std::size_t>(cols) : 0;
  std::optional<ScratchLease> scratch;
  if (take_dw) scratch.emplace(sizeof(float) * static_cast<std::size_t>(blocks * cols), stream);
  float* partials = take_dw ? scratch->get<float>() : nullptr;
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, false);
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(dy, x, w, rstd, residual, dx, dx16, partials,
                                                                      rows, cols);
    CUDABLOCKS_CHECK_LAUNCH("rmsnorm_backward_kernel");
  };
  if (vec4) {
    launch(rmsnorm_backward_kernel<4>);
  } else {
    launch(rmsnorm_backward_kernel<1>);
  }
  if (take_dw) add_column_partials(partials, static_cast<int>(blocks), cols, dw, stream);
}

}  // namespace cudablocks::cuda
