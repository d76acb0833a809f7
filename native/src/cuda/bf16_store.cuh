// Device helpers for kernels that write bf16 (bit patterns in std::uint16_t): round to nearest
// even (__float2bfloat16_rn, as the CPU's float_to_bf16_bits apart from NaN payloads), and stores
// of one value or of a float4 as four packed bf16 (one 8-byte store), beside the fp32 stores, so a
// kernel templated on its output type writes either.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

__device__ __forceinline__ std::uint16_t bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

__device__ __forceinline__ uint2 pack_bf16x4(float4 v) {
  uint2 b;
  b.x = static_cast<unsigned>(bf16_bits(v.x)) | (static_cast<unsigned>(bf16_bits(v.y)) << 16);
  b.y = static_cast<unsigned>(bf16_bits(v.z)) | (static_cast<unsigned>(bf16_bits(v.w)) << 16);
  return b;
}

// base[i] = v, i counting elements of v's type from base (float4: 16 bytes fp32, 8 bytes bf16).
__device__ __forceinline__ void store_vec(float* base, std::int64_t i, float v) { base[i] = v; }
__device__ __forceinline__ void store_vec(float* base, std::int64_t i, float4 v) {
  reinterpret_cast<float4*>(base)[i] = v;
}
__device__ __forceinline__ void store_vec(std::uint16_t* base, std::int64_t i, float v) { base[i] = bf16_bits(v); }
__device__ __forceinline__ void store_vec(std::uint16_t* base, std::int64_t i, float4 v) {
  reinterpret_cast<uint2*>(base)[i] = pack_bf16x4(v);
}

}  // namespace cudablocks::cuda
