// AdamW and the squared gradient norm for clipping.
//
// adamw_step moves 28 bytes per element (read p, g, m, v; write p, m, v; + 2 when it also writes
// the bf16 copy of the parameters for bf16 GEMMs) for ~15 FLOPs: bound
// by memory bandwidth. float4 accesses, a grid of a few waves over the SMs with a stride loop.
// The clip coefficient is computed by every thread from one device scalar (an L2-resident
// broadcast read), so clipping costs no pass over the gradients beyond the norm itself.
//
// sum_squares reads 4 bytes per element: per-block partial sums in double go to a small
// scratch, and a single block adds them in a fixed order (deterministic, no atomics).
#include "cuda/adamw.cuh"
#include "cuda/bf16_vec.cuh"
#include "cuda/block_reduce.cuh"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamWScalars& k,
                                              float beta2, float eps) {
  m = m + k.one_minus_beta1 * (g - m);
  v = v * beta2 + k.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / k.bias2_sqrt + eps;
  p = p * k.decay + (k.minus_step_size * m) / denom;
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(float* __restrict__ p, const float* __restrict__ g,
                                                    float* __restrict__ m, float* __restrict__ v, std::int64_t n,
                                                    AdamWScalars k, float beta2, float eps, float max_norm,
                                                    const float* __restrict__ grad_sum_squares,
                                                    std::uint16_t* __restrict__ p_bf16) {
  float clip = 1.0f;
  if (grad_sum_squares != nullptr) {
    const float norm = sqrtf(*grad_sum_squares);
    if (!isfinite(norm)) return;  // a non-finite norm skips the step: nothing is written
    clip = fminf(1.0f, max_norm / (norm + 1e-6f));
  }
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  const std::int64_t n4 = n / 4;  // pointers are 16-byte aligned (library allocations)
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(kThreads) + threadIdx.x; i < n4; i += stride) {
    float4 pv = reinterpret_cast<float4*>(p)[i];
    float4 gv = reinterpret_cast<const float4*>(g)[i];
    float4 mv = reinterpret_cast<float4*>(m)[i];
    float4 vv = reinterpret_cast<float4*>(v)[i];
    adamw_element(pv.x, gv.x * clip, mv.x, vv.x, k, beta2, eps);
    adamw_element(pv.y, gv.y * clip, mv.y, vv.y, k, beta2, eps);
    adamw_element(pv.z, gv.z * clip, mv.z, vv.z, k, beta2, eps);
    adamw_element(pv.w, gv.w * clip, mv.w, vv.w, k, beta2, eps);
    reinterpret_cast<float4*>(p)[i] = pv;
    if (p_bf16 != nullptr) {  // 8-byte aligned (documented): one uint2 store of 4 bf16
      reinterpret_cast<uint2*>(p_bf16)[i] = pack_bf16x4(pv);
    }
    reinterpret_cast<float4*>(m)[i] = mv;
    reinterpret_cast<float4*>(v)[i] = vv;
  }
  // The tail of n % 4 elements.
  for (std::int64_t i = n4 * 4 + blockIdx.x * static_cast<std::int64_t>(kThreads) + threadIdx.x; i < n; i += stride) {
    adamw_element(p[i], g[i] * clip, m[i], v[i], k, beta2, eps);
    if (p_bf16 != nullptr) p_bf16[i] = bf16_bits(p[i]);
  }
}

constexpr int kPartials = 1024;  // blocks of the first sum_squares stage

__global__ void __launch_bounds__(kThreads) sum_squares_partial_kernel(const float* __restrict__ x, std::int64_t n,
                                                                  double* __restrict__ partial) {
  // float4 loads (library buffers are 16-byte aligned), then the n % 4 tail.
  double sum = 0.0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  const std::int64_t first = blockIdx.x * static_cast<std::int64_t>(kThreads) + threadIdx.x;
  for (std::int64_t i = first; i < n / 4; i += stride) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    sum += static_cast<double>(v.x) * v.x + static_cast<double>(v.y) * v.y + static_cast<double>(v.z) * v.z +
           static_cast<double>(v.w) * v.w;
  }
  for (std::int64_t i = n / 4 * 4 + first; i < n; i += stride) sum += static_cast<double>(x[i]) * x[i];
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kThreads) sum_squares_final_kernel(const double* __restrict__ partial, int count,
                                                                float* __restrict__ out, bool accumulate) {
  double sum = 0.0;
  for (int i = threadIdx.x; i < count; i += kThreads) sum += partial[i];
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) *out = static_cast<float>(accumulate ? *out + sum : sum);
}

int grid_for(std::int64_t work) {
  const std::int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, 8LL * multiprocessor_count())));
}

}  // namespace

void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                const AdamWHyper& h, const float* grad_sum_squares, std::uint16_t* param_bf16,
                cudaStream_t stream) {
  if (n == 0) return;
  adamw_kernel<<<grid_for(n / 4 + 1), kThreads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, n, adamw_scalars(h),
                                                             h.beta2, h.eps, h.max_grad_norm, grad_sum_squares,
                                                             param_bf16);
  CUDABLOCKS_CHECK_LAUNCH("adamw_kernel");
}

void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate, cudaStream_t stream) {
  ScratchLease scratch(kPartials * sizeof(double), stream);
  double* partial = scratch.get<double>();
  const int blocks = std::min(kPartials, grid_for(n / 4 + 1));
  sum_squares_partial_kernel<<<blocks, kThreads, 0, stream>>>(x, n, partial);
  CUDABLOCKS_CHECK_LAUNCH("sum_squares_partial_kernel");
  sum_squares_final_kernel<<<1, kThreads, 0, stream>>>(partial, blocks, out, accumulate);
  CUDABLOCKS_CHECK_LAUNCH("sum_squares_final_kernel");
}

}  // namespace cudablocks::cuda
