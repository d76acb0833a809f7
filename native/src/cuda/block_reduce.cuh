// Reductions shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace cudablocks::cuda {

template <int VEC> struct VecType;
template <> struct VecType<1> { using type = float; };
template <> struct VecType<4> { using type = float4; };

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the THREADS threads of the block, returned to every thread (float or double).
template <int THREADS, typename T>
__device__ __forceinline__ T block_sum(T v) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
  __shared__ T partial[THREADS / 32];
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < THREADS / 32 ? partial[lane] : T(0);
  v = warp_sum(v);
  __syncthreads();  // partial[] may be reused by a following call
  return v;
}

}  // namespace cudablocks::cuda
