// NF4 quantize / dequantize and the double quantization of absmax, bit for bit bitsandbytes'.
//
// Dequantize is the hot op (a whole weight to bf16 before a GEMM): memory-bound at 2.5 bytes per
// element (0.5 read, 2 written for bf16). A thread decodes 4 units of packed bytes, each unit the
// bytes of one 16-byte output store (4 bytes -> 8 bf16/fp16, 2 bytes -> 4 fp32); consecutive
// threads take consecutive units, so a warp's loads and 16-byte stores are contiguous. A unit lies
// in one absmax block (blocks hold >= 32 elements); the 16 codes are looked up in shared memory
// (16 words in 16 banks: no conflicts), multiplied by absmax in fp32 and rounded once. A scalar
// kernel takes the tail and unaligned buffers. Quantize (once per weight) gives a warp to each block: max |x| by shuffles, then one
// byte per lane per step; its reciprocal is rcp.approx.ftz like bitsandbytes' fast-math build.
#include "cuda/nf4.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "core/nf4_format.hpp"
#include "cuda/check.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float rcp_approx_ftz(float a) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const T* __restrict__ x, std::int64_t n, int blocksize,
                                                            std::uint8_t* __restrict__ packed,
                                                            float* __restrict__ absmax) {
  const int lane = threadIdx.x & 31;
  const std::int64_t blocks = (n + blocksize - 1) / blocksize;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (kThreads / 32);
  for (std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; b < blocks;
       b += warps) {
    const std::int64_t first = b * blocksize;
    const int valid = n - first < blocksize ? static_cast<int>(n - first) : blocksize;
    float m = nf4::absmax_start(valid, blocksize);
    for (int i = lane; i < valid; i += 32) m = fmaxf(m, nf4::ftz(fabsf(to_float(x[first + i]))));
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, s));
    if (lane == 0) absmax[b] = m;
    const float inv = rcp_approx_ftz(m);
    const int bytes = (valid + 1) / 2;
    for (int j = lane; j < bytes; j += 32) {
      const float hi = nf4::ftz(nf4::ftz(to_float(x[first + 2 * j])) * inv);
      const float lo = 2 * j + 1 < valid ? nf4::ftz(nf4::ftz(to_float(x[first + 2 * j + 1])) * inv) : 0.0f * inv;
      packed[first / 2 + j] = static_cast<std::uint8_t>(nf4::nf4_encode(hi) << 4 | nf4::nf4_encode(lo));
    }
  }
}

// The codebook into shared memory (the whole block calls this before any early return).
__device__ __forceinline__ void load_code(float* code) {
  constexpr float values[16] = CUDABLOCKS_NF4_CODE;
  if (threadIdx.x < 16) code[threadIdx.x] = values[threadIdx.x];
  __syncthreads();
}

// Output element types and packing of two results into one 32-bit word (element 2j first).
template <typename Out>
struct Store;
template <>
struct Store<float> {
  static constexpr int kBytes = 4;
  __device__ static float one(float v) { return v; }
};
template <>
struct Store<__nv_bfloat16> {
  static constexpr int kBytes = 2;
  __device__ static __nv_bfloat16 one(float v) { return __float2bfloat16_rn(v); }
  __device__ static std::uint32_t two(float a, float b) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&p);
  }
};
template <>
struct Store<__half> {
  static constexpr int kBytes = 2;
  __device__ static __half one(float v) { return __float2half_rn(v); }
  __device__ static std::uint32_t two(float a, float b) {
    const __half2 p = __floats2half2_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&p);
  }
};

// The unit of the vectorised dequantization: the packed bytes that decode into 16 bytes of output
// (4 bytes -> 8 bf16/fp16, 2 bytes -> 4 fp32). Consecutive threads take consecutive units, so both
// the loads and the 16-byte stores of a warp are contiguous.
template <typename Out>
using Unit = std::conditional_t<Store<Out>::kBytes == 4, std::uint16_t, std::uint32_t>;
constexpr int kUnitsPerThread = 4;

template <typename Out, bool kFlush>
__device__ __forceinline__ uint4 decode_unit(std::uint32_t bits, float a, const float* code) {
  auto value = [&](unsigned q) {
    const float v = code[q] * a;
    return kFlush ? nf4::ftz(v) : v;
  };
  if constexpr (Store<Out>::kBytes == 4) {
    const std::uint32_t b0 = bits & 0xffu, b1 = (bits >> 8) & 0xffu;
    return make_uint4(__float_as_uint(value(b0 >> 4)), __float_as_uint(value(b0 & 15u)),
                      __float_as_uint(value(b1 >> 4)), __float_as_uint(value(b1 & 15u)));
  } else {
    std::uint32_t r[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const std::uint32_t byte = (bits >> (8 * k)) & 0xffu;
      r[k] = Store<Out>::two(value(byte >> 4), value(byte & 15u));
    }
    return make_uint4(r[0], r[1], r[2], r[3]);
  }
}

// Each block takes kThreads * kUnitsPerThread consecutive units; thread t the units t, t + 256, ...
template <typename Out>
__global__ void __launch_bounds__(kThreads) dequantize_vec_kernel(const Unit<Out>* __restrict__ packed,
                                                                  const float* __restrict__ absmax,
                                                                  std::int64_t units, int log2_blocksize,
                                                                  uint4* __restrict__ out) {
  constexpr int kElems = 2 * static_cast<int>(sizeof(Unit<Out>));
  __shared__ float code[16];
  load_code(code);
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads * kUnitsPerThread + threadIdx.x;
  std::uint32_t bits[kUnitsPerThread];
  float a[kUnitsPerThread];
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const std::int64_t u = first + k * kThreads;
    bits[k] = u < units ? static_cast<std::uint32_t>(__ldcs(packed + u)) : 0u;
    a[k] = u < units ? nf4::ftz(__ldg(absmax + ((u * kElems) >> log2_blocksize))) : 1.0f;
  }
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const std::int64_t u = first + k * kThreads;
    if (u >= units) break;
    // A product can be subnormal (bitsandbytes flushes it) only when |absmax| < FLT_MIN / 0.0796.
    out[u] = fabsf(a[k]) < 16.0f * FLT_MIN ? decode_unit<Out, true>(bits[k], a[k], code)
                                          : decode_unit<Out, false>(bits[k], a[k], code);
  }
}

template <typename Out>
__global__ void __launch_bounds__(kThreads) dequantize_scalar_kernel(const std::uint8_t* __restrict__ packed,
                                                                     const float* __restrict__ absmax,
                                                                     std::int64_t first, std::int64_t n,
                                                                     int blocksize, Out* __restrict__ out) {
  __shared__ float code[16];
  load_code(code);
  const std::int64_t i = first + static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const unsigned byte = packed[i / 2];
  const unsigned q = (i & 1) ? (byte & 15u) : (byte >> 4);
  out[i] = Store<Out>::one(nf4::ftz(code[q] * nf4::ftz(absmax[i / blocksize])));
}

constexpr int kMeanThreads = 1024;

// One block: 1024 strided partial sums in double, then a halving tree (the CPU's order).
__global__ void __launch_bounds__(kMeanThreads) absmax_mean_kernel(const float* __restrict__ absmax, std::int64_t n,
                                                                   float* __restrict__ offset) {
  __shared__ double partial[kMeanThreads];
  double s = 0.0;
  for (std::int64_t i = threadIdx.x; i < n; i += kMeanThreads) s += static_cast<double>(absmax[i]);
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int width = kMeanThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) *offset = n > 0 ? static_cast<float>(partial[0] / static_cast<double>(n)) : 0.0f;
}

// One block of 256 threads per nested block of 256 absmax values.
__global__ void __launch_bounds__(nf4::kNestedBlocksize) double_quantize_kernel(
    const float* __restrict__ absmax, std::int64_t n, const float* __restrict__ offset,
    const float* __restrict__ code_in, std::uint8_t* __restrict__ qabsmax, float* __restrict__ absmax2) {
  constexpr int bs = nf4::kNestedBlocksize;
  __shared__ float code[256];
  __shared__ float warp_max[bs / 32];
  code[threadIdx.x] = code_in[threadIdx.x];
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * bs;
  const int valid = n - first < bs ? static_cast<int>(n - first) : bs;
  const bool mine = static_cast<int>(threadIdx.x) < valid;
  const float centred = mine ? __fsub_rn(absmax[first + threadIdx.x], *offset) : 0.0f;
  float m = nf4::absmax_start(valid, bs);
  if (mine) m = fmaxf(m, nf4::ftz(fabsf(centred)));
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, s));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  m = warp_max[0];
#pragma unroll
  for (int w = 1; w < bs / 32; ++w) m = fmaxf(m, warp_max[w]);
  if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
  const float inv = rcp_approx_ftz(m);
  if (mine) {
    qabsmax[first + threadIdx.x] =
        static_cast<std::uint8_t>(nf4::dynamic_encode(code, nf4::ftz(__fmul_rn(nf4::ftz(centred), inv))));
  }
}

__global__ void __launch_bounds__(kThreads) double_dequantize_kernel(const std::uint8_t* __restrict__ qabsmax,
                                                                     const float* __restrict__ absmax2,
                                                                     const float* __restrict__ offset,
                                                                     const float* __restrict__ code,
                                                                     std::int64_t n, float* __restrict__ absmax) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const float product = nf4::ftz(__fmul_rn(code[qabsmax[i]], nf4::ftz(absmax2[i / nf4::kNestedBlocksize])));
  absmax[i] = __fadd_rn(product, *offset);
}

unsigned blocks_for(std::int64_t work, int per_block) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, (work + per_block - 1) / per_block));
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

template <typename Out>
void dequantize_as(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize, Out* out,
                   cudaStream_t stream) {
  int log2_blocksize = 0;
  while ((1 << log2_blocksize) < blocksize) ++log2_blocksize;
  constexpr std::int64_t kElems = 2 * sizeof(Unit<Out>);
  const bool aligned = reinterpret_cast<std::uintptr_t>(packed) % sizeof(Unit<Out>) == 0 && aligned16(out);
  const std::int64_t units = aligned ? n / kElems : 0;
  if (units > 0) {
    dequantize_vec_kernel<Out><<<blocks_for(units, kThreads * kUnitsPerThread), kThreads, 0, stream>>>(
        reinterpret_cast<const Unit<Out>*>(packed), absmax, units, log2_blocksize, reinterpret_cast<uint4*>(out));
    CUDABLOCKS_CHECK_LAUNCH("nf4 dequantize_vec_kernel");
  }
  const std::int64_t first = units * kElems;
  if (first < n) {
    dequantize_scalar_kernel<Out><<<blocks_for(n - first, kThreads), kThreads, 0, stream>>>(packed, absmax, first, n,
                                                                                           blocksize, out);
    CUDABLOCKS_CHECK_LAUNCH("nf4 dequantize_scalar_kernel");
  }
}

template <typename T>
void quantize_as(const T* x, std::int64_t n, int blocksize, std::uint8_t* packed, float* absmax, cudaStream_t stream) {
  const std::int64_t blocks = (n + blocksize - 1) / blocksize;
  quantize_kernel<T><<<blocks_for(blocks, kThreads / 32), kThreads, 0, stream>>>(x, n, blocksize, packed, absmax);
  CUDABLOCKS_CHECK_LAUNCH("nf4 quantize_kernel");
}

}  // namespace

void nf4_quantize(const void* x, DType dtype, std::int64_t n, int blocksize, std::uint8_t* packed, float* absmax,
                  cudaStream_t stream) {
  if (n == 0) return;
  switch (dtype) {
    case DType::BFloat16:
      quantize_as(static_cast<const __nv_bfloat16*>(x), n, blocksize, packed, absmax, stream);
      break;
    case DType::Float16: quantize_as(static_cast<const __half*>(x), n, blocksize, packed, absmax, stream); break;
    default: quantize_as(static_cast<const float*>(x), n, blocksize, packed, absmax, stream); break;
  }
}

void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize, void* out,
                    DType out_dtype, cudaStream_t stream) {
  if (n == 0) return;
  switch (out_dtype) {
    case DType::BFloat16:
      dequantize_as(packed, absmax, n, blocksize, static_cast<__nv_bfloat16*>(out), stream);
      break;
    case DType::Float16: dequantize_as(packed, absmax, n, blocksize, static_cast<__half*>(out), stream); break;
    default: dequantize_as(packed, absmax, n, blocksize, static_cast<float*>(out), stream); break;
  }
}

void nf4_absmax_mean(const float* absmax, std::int64_t n, float* offset, cudaStream_t stream) {
  absmax_mean_kernel<<<1, kMeanThreads, 0, stream>>>(absmax, n, offset);
  CUDABLOCKS_CHECK_LAUNCH("nf4 absmax_mean_kernel");
}

void nf4_double_quantize(const float* absmax, std::int64_t n, const float* offset, const float* code,
                         std::uint8_t* qabsmax, float* absmax2, cudaStream_t stream) {
  if (n == 0) return;
  double_quantize_kernel<<<blocks_for(n, nf4::kNestedBlocksize), nf4::kNestedBlocksize, 0, stream>>>(
      absmax, n, offset, code, qabsmax, absmax2);
  CUDABLOCKS_CHECK_LAUNCH("nf4 double_quantize_kernel");
}

void nf4_double_dequantize(const std::uint8_t* qabsmax, const float* absmax2, const float* offset, const float* code,
                           std::int64_t n, float* absmax, cudaStream_t stream) {
  if (n == 0) return;
  double_dequantize_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(qabsmax, absmax2, offset, code, n,
                                                                             absmax);
  CUDABLOCKS_CHECK_LAUNCH("nf4 double_dequantize_kernel");
}

}  // namespace cudablocks::cuda
