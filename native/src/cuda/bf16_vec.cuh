// Device helpers for kernels that read or write bf16 (bit patterns in std::uint16_t) as well as
// fp32: stores round to nearest even (__float2bfloat16_rn, as the CPU's float_to_bf16_bits apart
// from NaN payloads), loads widen exactly; one value or a float4 (four packed bf16: one 8-byte
// access). A kernel templated on its input or output type reads or writes either.
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

__device__ __forceinline__ float bf16_to_float(unsigned bits16) { return __uint_as_float(bits16 << 16); }

// base[i] as floats, i counting elements of the result's type from base (as store_vec).
template <typename V>
__device__ __forceinline__ V load_vec(const float* base, std::int64_t i) {
  return reinterpret_cast<const V*>(base)[i];
}
template <typename V>
__device__ __forceinline__ V load_vec(const std::uint16_t* base, std::int64_t i) {
  if constexpr (sizeof(V) == sizeof(float4)) {
    const uint2 b = reinterpret_cast<const uint2*>(base)[i];
    return make_float4(bf16_to_float(b.x & 0xffffu), bf16_to_float(b.x >> 16), bf16_to_float(b.y & 0xffffu),
                       bf16_to_float(b.y >> 16));
  } else {
    return bf16_to_float(base[i]);
  }
}

}  // namespace cudablocks::cuda
