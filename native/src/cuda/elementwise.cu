// Elementwise add: gemm_add's fallback where cuBLASLt has no algorithm (the blocks add their
// residuals in the products' epilogue). Bytes: 12 per element (read a, b; write out),
// 1 FLOP: memory-bound. float4 accesses over the bulk when all three pointers are 16-byte
// aligned, the < 4 leftover elements handled by the first threads; scalar otherwise.
#include "cuda/elementwise.cuh"

#include <algorithm>
#include <cstdint>

#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Grid-stride over float4 groups, then the tail. No __restrict__: out may alias a or b (each
// element is read before it is written by the same thread).
__global__ void __launch_bounds__(kThreads) add_vec4_kernel(const float* a, const float* b, float* out, std::int64_t n) {
  const std::int64_t n4 = n / 4;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const float4* a4 = reinterpret_cast<const float4*>(a);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  float4* o4 = reinterpret_cast<float4*>(out);
  for (std::int64_t i = first; i < n4; i += stride) {
    const float4 x = a4[i], y = b4[i];
    o4[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
  }
  const std::int64_t tail = 4 * n4 + first;
  if (tail < n) out[tail] = a[tail] + b[tail];
}

__global__ void __launch_bounds__(kThreads) add_scalar_kernel(const float* a, const float* b, float* out, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    out[i] = a[i] + b[i];
  }
}

unsigned grid_for(std::int64_t work) {
  // ~16 resident blocks' worth per SM is plenty for a streaming kernel; more only adds tail waves.
  const std::int64_t cap = 16 * static_cast<std::int64_t>(multiprocessor_count());
  return static_cast<unsigned>(std::clamp<std::int64_t>((work + kThreads - 1) / kThreads, 1, cap));
}

}  // namespace

void add(const float* a, const float* b, float* out, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (aligned16(a) && aligned16(b) && aligned16(out)) {
    add_vec4_kernel<<<grid_for(std::max<std::int64_t>(n / 4, 1)), kThreads, 0, stream>>>(a, b, out, n);
    CUDABLOCKS_CHECK_LAUNCH("add_vec4_kernel");
  } else {
    add_scalar_kernel<<<grid_for(n), kThreads, 0, stream>>>(a, b, out, n);
    CUDABLOCKS_CHECK_LAUNCH("add_scalar_kernel");
  }
}

}  // namespace cudablocks::cuda
