// fp32 -> bf16 conversion of GEMM operands, and its exact inverse. Bytes: 4 + 2 per element, no
// FLOPs: memory-bound (a [4096, 2560] activation: 63 MB, ~15 us at 4 TB/s). 16-byte fp32 and
// 8-byte bf16 accesses over the bulk when both buffers are aligned for them, the < 4 leftover
// elements by the first threads; scalar otherwise. __float2bfloat16_rn rounds to nearest even like the CPU's
// float_to_bf16_bits (they differ only in the payload of a NaN).
#include "cuda/to_bf16.cuh"

#include <algorithm>

#include "cuda/bf16_vec.cuh"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

// y = x converted (fp32 -> bf16 or bf16 -> fp32, through bf16_vec.cuh's load_vec / store_vec):
// four elements per step over the bulk, the < 4 leftover elements by the first threads.
template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) convert_vec4_kernel(const In* __restrict__ x, Out* __restrict__ y,
                                                                std::int64_t n) {
  const std::int64_t n4 = n / 4;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (std::int64_t i = first; i < n4; i += stride) store_vec(y, i, load_vec<float4>(x, i));
  const std::int64_t tail = 4 * n4 + first;
  if (tail < n) store_vec(y, tail, load_vec<float>(x, tail));
}

// The same one element per thread, for buffers not aligned for the vector accesses.
template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) convert_scalar_kernel(const In* __restrict__ x, Out* __restrict__ y,
                                                                  std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    store_vec(y, i, load_vec<float>(x, i));
  }
}

unsigned grid_for(std::int64_t work) {
  const std::int64_t cap = 16 * static_cast<std::int64_t>(multiprocessor_count());
  return static_cast<unsigned>(std::clamp<std::int64_t>((work + kThreads - 1) / kThreads, 1, cap));
}

bool aligned(const void* p, unsigned bytes) { return (reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) == 0; }

template <typename In, typename Out>
void convert(const In* x, Out* y, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  // float4 <-> 4 bf16 (8 bytes) per vector access.
  if (aligned(x, 4 * sizeof(In)) && aligned(y, 4 * sizeof(Out))) {
    convert_vec4_kernel<<<grid_for(std::max<std::int64_t>(n / 4, 1)), kThreads, 0, stream>>>(x, y, n);
    CUDABLOCKS_CHECK_LAUNCH("convert_vec4_kernel");
  } else {
    convert_scalar_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, y, n);
    CUDABLOCKS_CHECK_LAUNCH("convert_scalar_kernel");
  }
}

}  // namespace

void to_bf16(const float* x, std::uint16_t* y, std::int64_t n, cudaStream_t stream) { convert(x, y, n, stream); }

// Exact. Used by the bf16-input attention's fallback (rare head dims) and, every step, by an nf4
// block whose o projection has an adapter (the adapter reads att in fp32).
void from_bf16(const std::uint16_t* x, float* y, std::int64_t n, cudaStream_t stream) { convert(x, y, n, stream); }

}  // namespace cudablocks::cuda
