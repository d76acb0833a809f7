// QK-norm + RoPE, fused: per (token, head) vector of head_dim d, optional RMSNorm over the head
// then the rotate-half rotation. Bytes: read x, write y (8 bytes per element with fp32 x, 6 with
// bf16 x, + rstd): memory-bound; ~10 FLOPs per element. Backward: read dy, x, write dx (12 bytes
// per element, 10 with bf16 x, 8 with bf16 x and dx) + a small dw partial.
//
// Layout: one block (8 warps) per token (the backward: blocks stride over tokens); the block first
// puts cos/sin of its token's d/2 angles in shared memory (d/2 sincosf per token, shared by all
// heads), then each warp takes one head at a time. A lane holds the pairs i = (k*32 + lane)*V + j
// (k < K, j < V) and their partners i + d/2 in registers, so the norm's warp reduction, the
// scaling and the rotation all happen on registers: x is read once, y written once. V = 2 (pair
// accesses: 8 bytes of fp32, 4 of bf16 x) when d/2 is even and the pointers aligned to a pair;
// d = 128 is V = 2, K = 1 (all lanes busy, coalesced row segments).
//
// Backward, with (c, s) = cos, sin of the pair's angle and r = rstd:
//   dh_lo = dy_lo c + dy_hi s,  dh_hi = dy_hi c - dy_lo s          (the inverse rotation)
//   no norm: dx = dh;  norm: g = dh w,  dx = r (g - x r^2 mean(g x)),  dw += dh x r
// dw: each warp keeps its partial in registers over all its (token, head) pairs, the block adds
// its warps' partials in shared memory in a fixed order and writes one row of scratch; then
// add_column_partials (bias.cu) adds the blocks' rows into dw. Deterministic, no atomics.
// x is fp32 or bf16 (bf16-mode blocks keep q and k before the norm in bf16, as their products
// write them): a bf16 x is widened exactly as it is read. y and the backward's dx are fp32 or bf16
// (rounded once from the fp32 result: attention's operands, and dq, dk for bf16 products); dy,
// w, rstd and the arithmetic are fp32.
#include "cuda/qk_norm_rope.cuh"

#include <algorithm>
#include <string>

#include "cuda/bf16_vec.cuh"
#include "cuda/bias.cuh"
#include "cuda/block_reduce.cuh"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxHalf = 256;  // head_dim <= 512

template <int V> struct Pack;
template <> struct Pack<1> { using type = float; };
template <> struct Pack<2> { using type = float2; };

// p[0 .. V) as floats: fp32, or bf16 widened (exact). V = 2 needs p aligned to two elements.
template <int V>
__device__ __forceinline__ void load_x(const float* p, float (&v)[V]) {
  if constexpr (V == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x;
    v[1] = a.y;
  } else {
    v[0] = *p;
  }
}
template <int V>
__device__ __forceinline__ void load_x(const std::uint16_t* p, float (&v)[V]) {
  if constexpr (V == 2) {
    const unsigned a = *reinterpret_cast<const unsigned*>(p);
    v[0] = bf16_to_float(a & 0xffffu);
    v[1] = bf16_to_float(a >> 16);
  } else {
    v[0] = bf16_to_float(*p);
  }
}

// cos/sin of token t's angles into shared memory: angle = fp32(pos * inv_freq[i]) as transformers
// (the CPU reference rounds it the same way). Callers put a barrier after it (and before it when
// the arrays were in use).
__device__ __forceinline__ void rope_table(float* cos_s, float* sin_s, int pos, int half, const float* inv_freq) {
  for (int i = threadIdx.x; i < half; i += kThreads) {
    const float angle = __fmul_rn(static_cast<float>(pos), inv_freq[i]);
    sincosf(angle, &sin_s[i], &cos_s[i]);
  }
}

// y's V consecutive elements at p: fp32, or bf16 rounded to nearest even (a pair in one 4-byte store).
template <int V>
__device__ __forceinline__ void store_y(float* p, const float* v) {
  if constexpr (V == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else {
    p[0] = v[0];
  }
}
template <int V>
__device__ __forceinline__ void store_y(std::uint16_t* p, const float* v) {
  if constexpr (V == 2) {
    *reinterpret_cast<unsigned*>(p) = static_cast<unsigned>(bf16_bits(v[0])) | (static_cast<unsigned>(bf16_bits(v[1])) << 16);
  } else {
    p[0] = bf16_bits(v[0]);
  }
}

template <int V, int K, typename In, typename Out>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_forward_kernel(const In* __restrict__ x, const float* __restrict__ w,
                                                                   Out* __restrict__ y, float* __restrict__ rstd,
                                                                   const std::int32_t* __restrict__ positions, int n_heads,
                                                                   int head_dim, float eps,
                                                                   const float* __restrict__ inv_freq) {
  __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
  const std::int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  rope_table(cos_s, sin_s, positions[t], half, inv_freq);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < n_heads; h += kWarps) {
    const std::int64_t base = (t * n_heads + h) * head_dim;
    float lo[K][V], hi[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = (k * 32 + lane) * V;
      if (i < half) {
        load_x<V>(x + base + i, lo[k]);
        load_x<V>(x + base + half + i, hi[k]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) lo[k][j] = hi[k][j] = 0.0f;
      }
    }
    if (w != nullptr) {
      float ss = 0.0f;
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) ss += lo[k][j] * lo[k][j] + hi[k][j] * hi[k][j];
      ss = warp_sum(ss);
      const float r = rsqrtf(ss / static_cast<float>(head_dim) + eps);
      if (lane == 0 && rstd != nullptr) rstd[t * n_heads + h] = r;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = (k * 32 + lane) * V;
        if (i < half) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            lo[k][j] = w[i + j] * (lo[k][j] * r);
            hi[k][j] = w[half + i + j] * (hi[k][j] * r);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = (k * 32 + lane) * V;
      if (i < half) {
        float a[V], b[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float c = cos_s[i + j], s = sin_s[i + j];
          a[j] = lo[k][j] * c - hi[k][j] * s;
          b[j] = hi[k][j] * c + lo[k][j] * s;
        }
        store_y<V>(y + base + i, a);
        store_y<V>(y + base + half + i, b);
      }
    }
  }
}

template <int V, int K, typename In, typename Out>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_backward_kernel(
    const float* __restrict__ dy, const In* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd,
    Out* __restrict__ dx, float* __restrict__ dw_partial, const std::int32_t* __restrict__ positions, std::int64_t tokens,
    int n_heads, int head_dim, const float* __restrict__ inv_freq) {
  using P = typename Pack<V>::type;
  __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
  __shared__ float dw_s[kWarps][2 * kMaxHalf];
  const int half = head_dim / 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool norm = w != nullptr;
  float dw_lo[K][V], dw_hi[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) dw_lo[k][j] = dw_hi[k][j] = 0.0f;

  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();  // the previous token's table is no longer read
    rope_table(cos_s, sin_s, positions[t], half, inv_freq);
    __syncthreads();
    for (int h = warp; h < n_heads; h += kWarps) {
      const std::int64_t base = (t * n_heads + h) * head_dim;
      float dlo[K][V], dhi[K][V], xlo[K][V], xhi[K][V];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = (k * 32 + lane) * V;
        P a{}, b{};
#pragma unroll
        for (int j = 0; j < V; ++j) xlo[k][j] = xhi[k][j] = 0.0f;
        if (i < half) {
          a = *reinterpret_cast<const P*>(dy + base + i);
          b = *reinterpret_cast<const P*>(dy + base + half + i);
          if (norm) {
            load_x<V>(x + base + i, xlo[k]);
            load_x<V>(x + base + half + i, xhi[k]);
          }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float ylo = reinterpret_cast<const float*>(&a)[j], yhi = reinterpret_cast<const float*>(&b)[j];
          const float cs = i < half ? cos_s[i + j] : 0.0f, sn = i < half ? sin_s[i + j] : 0.0f;
          dlo[k][j] = ylo * cs + yhi * sn;  // inverse rotation: dh
          dhi[k][j] = yhi * cs - ylo * sn;
        }
      }
      if (norm) {
        const float r = rstd[t * n_heads + h];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int i = (k * 32 + lane) * V;
          if (i < half) {
#pragma unroll
            for (int j = 0; j < V; ++j) dot += dlo[k][j] * w[i + j] * xlo[k][j] + dhi[k][j] * w[half + i + j] * xhi[k][j];
          }
        }
        dot = warp_sum(dot);
        const float coef = dot * r * r / static_cast<float>(head_dim);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int i = (k * 32 + lane) * V;
          if (i < half) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              dw_lo[k][j] += dlo[k][j] * (xlo[k][j] * r);
              dw_hi[k][j] += dhi[k][j] * (xhi[k][j] * r);
              dlo[k][j] = r * (dlo[k][j] * w[i + j] - xlo[k][j] * coef);
              dhi[k][j] = r * (dhi[k][j] * w[half + i + j] - xhi[k][j] * coef);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = (k * 32 + lane) * V;
        if (i < half) {
          store_y<V>(dx + base + i, dlo[k]);
          store_y<V>(dx + base + half + i, dhi[k]);
        }
      }
    }
  }
  if (!norm || dw_partial == nullptr) return;  // uniform over the block
  // The block's dw partial: the warps' registers, added in warp order.
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int i = (k * 32 + lane) * V;
    if (i < half) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        dw_s[warp][i + j] = dw_lo[k][j];
        dw_s[warp][half + i + j] = dw_hi[k][j];
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < head_dim; c += kThreads) {
    float sum = dw_s[0][c];
#pragma unroll
    for (int v = 1; v < kWarps; ++v) sum += dw_s[v][c];
    dw_partial[static_cast<std::int64_t>(blockIdx.x) * head_dim + c] = sum;
  }
}

bool aligned8(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 7u) == 0; }
// x's pair loads (V = 2) need two of its elements' alignment.
template <typename In>
bool pair_aligned(const In* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & (2 * sizeof(In) - 1)) == 0;
}

// Picks V (pair-vector width) and K (pair chunks per lane) for head_dim and calls
// f(std::integral_constant V, K) style via a template functor.
template <typename F>
void dispatch(int head_dim, bool vec2_ok, F&& f) {
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 2 * kMaxHalf) {
    throw InvalidArgumentError("qk_norm_rope (cuda): head_dim must be even and at most " + std::to_string(2 * kMaxHalf) +
                               ", got " + std::to_string(head_dim));
  }
  const int half = head_dim / 2;
  if (vec2_ok && half % 2 == 0) {
    const int chunks = (half / 2 + 31) / 32;  // float2 chunks per lane
    if (chunks <= 1) return f(Pack<2>{}, std::integral_constant<int, 1>{});
    if (chunks <= 2) return f(Pack<2>{}, std::integral_constant<int, 2>{});
    return f(Pack<2>{}, std::integral_constant<int, 4>{});
  }
  const int chunks = (half + 31) / 32;
  if (chunks <= 1) return f(Pack<1>{}, std::integral_constant<int, 1>{});
  if (chunks <= 2) return f(Pack<1>{}, std::integral_constant<int, 2>{});
  if (chunks <= 4) return f(Pack<1>{}, std::integral_constant<int, 4>{});
  return f(Pack<1>{}, std::integral_constant<int, 8>{});
}

template <typename P> constexpr int width = 1;
template <> constexpr int width<Pack<2>> = 2;


template <typename In, typename Out>
void forward(const In* x, const float* w, Out* y, float* rstd, const std::int32_t* positions, std::int64_t tokens,
             int n_heads, int head_dim, float eps, const float* inv_freq, cudaStream_t stream) {
  const bool vec2 = pair_aligned(x) && pair_aligned(y) && (w == nullptr || aligned8(w));
  dispatch(head_dim, vec2, [&](auto pack, auto k) {
    constexpr int V = width<decltype(pack)>;
    constexpr int K = decltype(k)::value;
    if (tokens == 0 || n_heads == 0) return;
    qk_norm_rope_forward_kernel<V, K, In, Out><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
        x, w, y, rstd, positions, n_heads, head_dim, eps, inv_freq);
    CUDABLOCKS_CHECK_LAUNCH("qk_norm_rope_forward_kernel");
  });
}

template <typename In, typename Out>
void backward(const float* dy, const In* x, const float* w, const float* rstd, Out* dx, float* dw,
              const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, const float* inv_freq,
              cudaStream_t stream) {
  const bool vec2 = aligned8(dy) && pair_aligned(dx) && (w == nullptr || (pair_aligned(x) && aligned8(w)));
  dispatch(head_dim, vec2, [&](auto pack, auto k) {
    constexpr int V = width<decltype(pack)>;
    constexpr int K = decltype(k)::value;
    if (tokens == 0 || n_heads == 0) return;
    // Blocks stride over tokens: at most 4 per SM (all resident at once), so the dw partials stay few.
    const std::int64_t blocks = std::min<std::int64_t>(tokens, 4 * static_cast<std::int64_t>(multiprocessor_count()));
    if (w == nullptr || dw == nullptr) {  // no weight gradient to take
      qk_norm_rope_backward_kernel<V, K, In, Out><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          dy, x, w, rstd, dx, nullptr, positions, tokens, n_heads, head_dim, inv_freq);
      CUDABLOCKS_CHECK_LAUNCH("qk_norm_rope_backward_kernel");
      return;
    }
    ScratchLease scratch(sizeof(float) * static_cast<std::size_t>(blocks * head_dim), stream);
    qk_norm_rope_backward_kernel<V, K, In, Out><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        dy, x, w, rstd, dx, scratch.get<float>(), positions, tokens, n_heads, head_dim, inv_freq);
    CUDABLOCKS_CHECK_LAUNCH("qk_norm_rope_backward_kernel");
    add_column_partials(scratch.get<float>(), static_cast<int>(blocks), head_dim, dw, stream);
  });
}

}  // namespace

void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                          std::int64_t tokens, int n_heads, int head_dim, float eps, const float* inv_freq,
                          cudaStream_t stream) {
  forward(x, w, y, rstd, positions, tokens, n_heads, head_dim, eps, inv_freq, stream);
}
void qk_norm_rope_forward(const std::uint16_t* x, const float* w, std::uint16_t* y, float* rstd,
                          const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, float eps,
                          const float* inv_freq, cudaStream_t stream) {
  forward(x, w, y, rstd, positions, tokens, n_heads, head_dim, eps, inv_freq, stream);
}

void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                           const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim,
                           const float* inv_freq, cudaStream_t stream) {
  backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq, stream);
}
void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd, float* dx,
                           float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim,
                           const float* inv_freq, cudaStream_t stream) {
  backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq, stream);
}
void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd,
                           std::uint16_t* dx, float* dw, const std::int32_t* positions, std::int64_t tokens,
                           int n_heads, int head_dim, const float* inv_freq, cudaStream_t stream) {
  backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq, stream);
}

}  // namespace cudablocks::cuda
