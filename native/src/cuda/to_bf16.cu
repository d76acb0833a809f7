// fp32 -> bf16 conversion of GEMM operands. Bytes: read 4, write 2 per element, no FLOPs:
// memory-bound (a [4096, 2560] activation: 63 MB, ~15 us at 4 TB/s). float4 loads and 8-byte
// stores over the bulk when x is 16-byte and y 8-byte aligned, the < 4 leftover elements by the
// first threads; scalar otherwise. __float2bfloat16_rn rounds to nearest even like the CPU's
// float_to_bf16_bits (they differ only in the payload of a NaN).
#include "cuda/to_bf16.cuh"

#include <algorithm>

#include "cuda/bf16_vec.cuh"
#include "cuda/check.hpp"
#include "cuda/scratch.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) to_bf16_vec4_kernel(const float* __restrict__ x, std::uint16_t* __restrict__ y,
                                                           std::int64_t n) {
  const std::int64_t n4 = n / 4;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  uint2* y4 = reinterpret_cast<uint2*>(y);
  for (std::int64_t i = first; i < n4; i += stride) {
    const float4 v = x4[i];
    y4[i] = pack_bf16x4(v);
  }
  const std::int64_t tail = 4 * n4 + first;
  if (tail < n) y[tail] = bf16_bits(x[tail]);
}

__global__ void __launch_bounds__(kThreads) to_bf16_scalar_kernel(const float* __restrict__ x,
                                                             std::uint16_t* __restrict__ y, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    y[i] = bf16_bits(x[i]);
  }
}

// y[i] = float(x[i]): exact; the fallback of the bf16-input attention where no tensor-core kernel
// serves (rare head dims), so one element per thread is enough.
__global__ void __launch_bounds__(kThreads) from_bf16_kernel(const std::uint16_t* __restrict__ x,
                                                             float* __restrict__ y, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    y[i] = bf16_to_float(x[i]);
  }
}

unsigned grid_for(std::int64_t work) {
  const std::int64_t cap = 16 * static_cast<std::int64_t>(multiprocessor_count());
  return static_cast<unsigned>(std::clamp<std::int64_t>((work + kThreads - 1) / kThreads, 1, cap));
}

bool aligned(const void* p, unsigned bytes) { return (reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) == 0; }

}  // namespace

void to_bf16(const float* x, std::uint16_t* y, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (aligned(x, 16) && aligned(y, 8)) {
    to_bf16_vec4_kernel<<<grid_for(std::max<std::int64_t>(n / 4, 1)), kThreads, 0, stream>>>(x, y, n);
    CUDABLOCKS_CHECK_LAUNCH("to_bf16_vec4_kernel");
  } else {
    to_bf16_scalar_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, y, n);
    CUDABLOCKS_CHECK_LAUNCH("to_bf16_scalar_kernel");
  }
}

void from_bf16(const std::uint16_t* x, float* y, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  from_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, y, n);
  CUDABLOCKS_CHECK_LAUNCH("from_bf16_kernel");
}

}  // namespace cudablocks::cuda
