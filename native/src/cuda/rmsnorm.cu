// RMSNorm forward. Bytes: read x and w, write y: 8 bytes per element, ~0 FLOP per byte, so the
// kernel is bound by memory bandwidth. One block per row; the row is read twice (sum of squares,
// then scale), the second time from L1/L2, which holds a row of a few KB easily.
#include "cuda/check.hpp"
#include "cuda/rmsnorm.cuh"
#include "cuda/block_reduce.cuh"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

// VEC = 4: float4 loads (cols divisible by 4, 16-byte aligned rows); VEC = 1: any shape.
template <int VEC>
__global__ void __launch_bounds__(kThreads) rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                              float* __restrict__ y, float* __restrict__ rstd,
                                                              std::int64_t cols, float eps) {
  using Vec = typename VecType<VEC>::type;
  const std::int64_t row = blockIdx.x;
  const Vec* xr = reinterpret_cast<const Vec*>(x + row * cols);
  const Vec* wv = reinterpret_cast<const Vec*>(w);
  Vec* yr = reinterpret_cast<Vec*>(y + row * cols);
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
    yr[i] = v;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace

void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                     std::int64_t cols, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  const bool vec4 = cols % 4 == 0 && aligned16(x) && aligned16(w) && aligned16(y);
  const dim3 grid(static_cast<unsigned>(rows));
  if (vec4) {
    rmsnorm_forward_kernel<4><<<grid, kThreads, 0, stream>>>(x, w, y, rstd, cols, eps);
  } else {
    rmsnorm_forward_kernel<1><<<grid, kThreads, 0, stream>>>(x, w, y, rstd, cols, eps);
  }
  CUDABLOCKS_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

}  // namespace cudablocks::cuda
