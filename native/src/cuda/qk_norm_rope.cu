// QK-norm + RoPE, fused: per (token, head) vector of head_dim d, optional RMSNorm over the head
// then the rotate-half rotation. Bytes: read x, write y (8 bytes per element with fp32 x, 6 with
// bf16 x, + rstd): memory-bound; ~10 FLOPs per element. Backward: read dy, x, write dx (12 bytes
// per element, 10 with bf16 x, 8 with bf16 x and dx) + a small dw partial.
//
// Layout: one block per token (the backward: blocks stride over tokens), up to 8 warps; the block
// first puts cos/sin of its token's d/2 angles in shared memory (d/2 sincosf per token, shared by
// all heads), then each warp takes G heads at a time side by side, 32/G lanes each. A lane holds
// the elements i = (k*(32/G) + sub)*V + j (k < K, j < V) and their partners i + d/2 in registers,
// so the norm's group reduction, the scaling and the rotation all happen on registers: x is read
// once, y written once. V = 4 (quads: 8-byte bf16, 16-byte fp32 accesses) when d/2 is a multiple
// of 4 and the pointers are aligned to it, with d/8 lanes per head: d = 128 is two heads per warp.
// Against pairs (V = 2, one head per warp) that halves the per-element shuffles and address
// arithmetic: H200, Qwen3-4B q and k at 8 x 512 tokens, bf16, per layer step: forward 74 -> 61 us
// (4 calls), backward 71 -> 59 us (2 calls). Other head sizes take pairs or single elements.
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
#include <type_traits>

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
template <> struct Pack<4> { using type = float4; };

// Sum over the L lanes of a lane's group (L a power of two <= 32, groups aligned), to all of them.
template <int L>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = L / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// p[0 .. V) as floats: fp32, or bf16 widened (exact). V > 1 needs p aligned to V elements.
template <int V>
__device__ __forceinline__ void load_x(const float* p, float (&v)[V]) {
  const auto a = *reinterpret_cast<const typename Pack<V>::type*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = reinterpret_cast<const float*>(&a)[j];
}
template <int V>
__device__ __forceinline__ void load_x(const std::uint16_t* p, float (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = bf16_to_float(*p);
  } else {
    using Bits = std::conditional_t<V == 2, unsigned, uint2>;
    const Bits a = *reinterpret_cast<const Bits*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const unsigned word = reinterpret_cast<const unsigned*>(&a)[j / 2];
      v[j] = bf16_to_float(j % 2 == 0 ? word & 0xffffu : word >> 16);
    }
  }
}

// cos/sin of token t's angles into shared memory: angle = fp32(pos * inv_freq[i]) as transformers
// (the CPU reference rounds it the same way). Callers put a barrier after it (and before it when
// the arrays were in use).
__device__ __forceinline__ void rope_table(float* cos_s, float* sin_s, int pos, int half, const float* inv_freq) {
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(static_cast<float>(pos), inv_freq[i]);
    sincosf(angle, &sin_s[i], &cos_s[i]);
  }
}

// y's V consecutive elements at p: fp32, or bf16 rounded to nearest even (packed in one store).
template <int V>
__device__ __forceinline__ void store_y(float* p, const float* v) {
  typename Pack<V>::type a;
#pragma unroll
  for (int j = 0; j < V; ++j) reinterpret_cast<float*>(&a)[j] = v[j];
  *reinterpret_cast<typename Pack<V>::type*>(p) = a;
}
template <int V>
__device__ __forceinline__ void store_y(std::uint16_t* p, const float* v) {
  if constexpr (V == 1) {
    p[0] = bf16_bits(v[0]);
  } else {
    using Bits = std::conditional_t<V == 2, unsigned, uint2>;
    Bits a;
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      reinterpret_cast<unsigned*>(&a)[j / 2] =
          static_cast<unsigned>(bf16_bits(v[j])) | (static_cast<unsigned>(bf16_bits(v[j + 1])) << 16);
    }
    *reinterpret_cast<Bits*>(p) = a;
  }
}

// A lane's place: G heads per warp side by side, L = 32 / G lanes each; the lane holds elements
// i = (k*L + sub)*V + j (k < K, j < V) of its head and their partners i + d/2.
template <int G>
struct LanePlace {
  static constexpr int L = 32 / G;
  int warp, warps, group, sub;
  __device__ LanePlace()
      : warp(threadIdx.x / 32), warps(blockDim.x / 32), group((threadIdx.x % 32) / L), sub(threadIdx.x % L) {}
  // The heads of the warp's passes: h0 + group, h0 = warp * G, stepping by warps * G (uniform
  // over the warp, so that every lane takes part in the group sums).
  __device__ int first() const { return warp * G; }
  __device__ int step() const { return warps * G; }
  // f(k, j, e) for each element e = (k*L + sub)*V + j of the lane's (k < K, j < V) in the first
  // half of the head (its partner: e + d/2).
  template <int K, int V, class F>
  __device__ __forceinline__ void each_element(int half, F f) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = (k * L + sub) * V;
      if (i < half) {
#pragma unroll
        for (int j = 0; j < V; ++j) f(k, j, i + j);
      }
    }
  }
};

template <int V, int K, int G, typename In, typename Out>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_forward_kernel(const In* __restrict__ x, const float* __restrict__ w,
                                                                   Out* __restrict__ y, float* __restrict__ rstd,
                                                                   const std::int32_t* __restrict__ positions, int n_heads,
                                                                   int head_dim, float eps,
                                                                   const float* __restrict__ inv_freq) {
  constexpr int L = LanePlace<G>::L;
  __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
  const std::int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  rope_table(cos_s, sin_s, positions[t], half, inv_freq);
  __syncthreads();
  const LanePlace<G> at;
  for (int h0 = at.first(); h0 < n_heads; h0 += at.step()) {
    const int h = h0 + at.group;
    const bool active = h < n_heads;
    const std::int64_t base = (t * n_heads + h) * head_dim;
    float lo[K][V], hi[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = (k * L + at.sub) * V;
      if (active && i < half) {
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
      ss = group_sum<L>(ss);
      const float r = rsqrtf(ss / static_cast<float>(head_dim) + eps);
      if (active && at.sub == 0 && rstd != nullptr) rstd[t * n_heads + h] = r;
      at.template each_element<K, V>(half, [&](int k, int j, int e) {
        lo[k][j] = w[e] * (lo[k][j] * r);
        hi[k][j] = w[half + e] * (hi[k][j] * r);
      });
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = (k * L + at.sub) * V;
      if (active && i < half) {
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

template <int V, int K, int G, typename In, typename Out>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_backward_kernel(
    const float* __restrict__ dy, const In* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd,
    Out* __restrict__ dx, float* __restrict__ dw_partial, const std::int32_t* __restrict__ positions, std::int64_t tokens,
    int n_heads, int head_dim, const float* __restrict__ inv_freq) {
  constexpr int L = LanePlace<G>::L;
  __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
  __shared__ float dw_s[kWarps][2 * kMaxHalf];
  const int half = head_dim / 2;
  const LanePlace<G> at;
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
    for (int h0 = at.first(); h0 < n_heads; h0 += at.step()) {
      const int h = h0 + at.group;
      const bool active = h < n_heads;
      const std::int64_t base = (t * n_heads + h) * head_dim;
      float dlo[K][V], dhi[K][V], xlo[K][V], xhi[K][V];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = (k * L + at.sub) * V;
        float ylo[V], yhi[V];
#pragma unroll
        for (int j = 0; j < V; ++j) ylo[j] = yhi[j] = xlo[k][j] = xhi[k][j] = 0.0f;
        if (active && i < half) {
          load_x<V>(dy + base + i, ylo);
          load_x<V>(dy + base + half + i, yhi);
          if (norm) {
            load_x<V>(x + base + i, xlo[k]);
            load_x<V>(x + base + half + i, xhi[k]);
          }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float cs = i < half ? cos_s[i + j] : 0.0f, sn = i < half ? sin_s[i + j] : 0.0f;
          dlo[k][j] = ylo[j] * cs + yhi[j] * sn;  // inverse rotation: dh
          dhi[k][j] = yhi[j] * cs - ylo[j] * sn;
        }
      }
      if (norm) {
        const float r = active ? rstd[t * n_heads + h] : 0.0f;
        float dot = 0.0f;
        at.template each_element<K, V>(half, [&](int k, int j, int e) {
          dot += dlo[k][j] * w[e] * xlo[k][j] + dhi[k][j] * w[half + e] * xhi[k][j];
        });
        dot = group_sum<L>(dot);
        const float coef = dot * r * r / static_cast<float>(head_dim);
        at.template each_element<K, V>(half, [&](int k, int j, int e) {
          dw_lo[k][j] += dlo[k][j] * (xlo[k][j] * r);
          dw_hi[k][j] += dhi[k][j] * (xhi[k][j] * r);
          dlo[k][j] = r * (dlo[k][j] * w[e] - xlo[k][j] * coef);
          dhi[k][j] = r * (dhi[k][j] * w[half + e] - xhi[k][j] * coef);
        });
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = (k * L + at.sub) * V;
        if (active && i < half) {
          store_y<V>(dx + base + i, dlo[k]);
          store_y<V>(dx + base + half + i, dhi[k]);
        }
      }
    }
  }
  if (!norm || dw_partial == nullptr) return;  // uniform over the block
  // The block's dw partial: the groups of a warp added by shuffles (group 0 gets the sum, in a
  // fixed order), the warps' sums in shared memory, added in warp order.
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j)
#pragma unroll
      for (int offset = L; offset < 32; offset *= 2) {
        dw_lo[k][j] += __shfl_xor_sync(0xffffffffu, dw_lo[k][j], offset);
        dw_hi[k][j] += __shfl_xor_sync(0xffffffffu, dw_hi[k][j], offset);
      }
  if (at.group == 0) {
    at.template each_element<K, V>(half, [&](int k, int j, int e) {
      dw_s[at.warp][e] = dw_lo[k][j];
      dw_s[at.warp][half + e] = dw_hi[k][j];
    });
  }
  __syncthreads();
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float sum = dw_s[0][c];
    for (int v = 1; v < at.warps; ++v) sum += dw_s[v][c];
    dw_partial[static_cast<std::int64_t>(blockIdx.x) * head_dim + c] = sum;
  }
}

bool aligned8(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 7u) == 0; }
// x's vector loads of n elements need n elements' alignment.
template <typename T>
bool vec_aligned(const T* p, int n) {
  return (reinterpret_cast<std::uintptr_t>(p) & (n * sizeof(T) - 1)) == 0;
}

// Picks V (vector width), K (vector chunks per lane) and G (heads per warp) for head_dim and calls
// f(V, K, G) (integral constants). Quads (V = 4) when d/2 is a multiple of 4 and the pointers are
// aligned to 4 elements: d/8 lanes per head (d = 128: 16, two heads per warp, 8-byte bf16 and
// 16-byte fp32 accesses), which halves the per-element shuffles and address arithmetic of pairs.
template <typename F>
void dispatch(int head_dim, bool vec4_ok, bool vec2_ok, F&& f) {
  using std::integral_constant;
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 2 * kMaxHalf) {
    throw InvalidArgumentError("qk_norm_rope (cuda): head_dim must be even and at most " + std::to_string(2 * kMaxHalf) +
                               ", got " + std::to_string(head_dim));
  }
  const int half = head_dim / 2;
  if (vec4_ok && half % 4 == 0) {
    const int quads = half / 4;  // lanes per head
    const auto one = integral_constant<int, 1>{};
    const auto four = integral_constant<int, 4>{};
    if (quads == 8) return f(four, one, integral_constant<int, 4>{});
    if (quads == 16) return f(four, one, integral_constant<int, 2>{});
    if (quads == 32) return f(four, one, integral_constant<int, 1>{});
    if (quads == 64) return f(four, integral_constant<int, 2>{}, integral_constant<int, 1>{});
  }
  const auto g1 = integral_constant<int, 1>{};
  if (vec2_ok && half % 2 == 0) {
    const int chunks = (half / 2 + 31) / 32;  // pair chunks per lane
    const auto two = integral_constant<int, 2>{};
    if (chunks <= 1) return f(two, integral_constant<int, 1>{}, g1);
    if (chunks <= 2) return f(two, integral_constant<int, 2>{}, g1);
    return f(two, integral_constant<int, 4>{}, g1);
  }
  const int chunks = (half + 31) / 32;
  const auto v1 = integral_constant<int, 1>{};
  if (chunks <= 1) return f(v1, integral_constant<int, 1>{}, g1);
  if (chunks <= 2) return f(v1, integral_constant<int, 2>{}, g1);
  if (chunks <= 4) return f(v1, integral_constant<int, 4>{}, g1);
  return f(v1, integral_constant<int, 8>{}, g1);
}

// Threads per block: enough warps for the heads (G per warp), at most kWarps.
int block_threads(int n_heads, int g) { return 32 * std::min(kWarps, (n_heads + g - 1) / g); }

template <typename In, typename Out>
void forward(const In* x, const float* w, Out* y, float* rstd, const std::int32_t* positions, std::int64_t tokens,
             int n_heads, int head_dim, float eps, const float* inv_freq, cudaStream_t stream) {
  const bool vec4 = vec_aligned(x, 4) && vec_aligned(y, 4) && (w == nullptr || vec_aligned(w, 4));
  const bool vec2 = vec_aligned(x, 2) && vec_aligned(y, 2) && (w == nullptr || aligned8(w));
  dispatch(head_dim, vec4, vec2, [&](auto v, auto k, auto g) {
    constexpr int V = decltype(v)::value, K = decltype(k)::value, G = decltype(g)::value;
    if (tokens == 0 || n_heads == 0) return;
    qk_norm_rope_forward_kernel<V, K, G, In, Out>
        <<<static_cast<unsigned>(tokens), block_threads(n_heads, G), 0, stream>>>(x, w, y, rstd, positions, n_heads,
                                                                                 head_dim, eps, inv_freq);
    CUDABLOCKS_CHECK_LAUNCH("qk_norm_rope_forward_kernel");
  });
}

template <typename In, typename Out>
void backward(const float* dy, const In* x, const float* w, const float* rstd, Out* dx, float* dw,
              const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, const float* inv_freq,
              cudaStream_t stream) {
  const bool vec4 =
      vec_aligned(dy, 4) && vec_aligned(dx, 4) && (w == nullptr || (vec_aligned(x, 4) && vec_aligned(w, 4)));
  const bool vec2 = aligned8(dy) && vec_aligned(dx, 2) && (w == nullptr || (vec_aligned(x, 2) && aligned8(w)));
  dispatch(head_dim, vec4, vec2, [&](auto v, auto k, auto g) {
    constexpr int V = decltype(v)::value, K = decltype(k)::value, G = decltype(g)::value;
    if (tokens == 0 || n_heads == 0) return;
    // Blocks stride over tokens: at most 4 per SM (all resident at once), so the dw partials stay few.
    const std::int64_t blocks = std::min<std::int64_t>(tokens, 4 * static_cast<std::int64_t>(multiprocessor_count()));
    const int threads = block_threads(n_heads, G);
    if (w == nullptr || dw == nullptr) {  // no weight gradient to take
      qk_norm_rope_backward_kernel<V, K, G, In, Out><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          dy, x, w, rstd, dx, nullptr, positions, tokens, n_heads, head_dim, inv_freq);
      CUDABLOCKS_CHECK_LAUNCH("qk_norm_rope_backward_kernel");
      return;
    }
    ScratchLease scratch(sizeof(float) * static_cast<std::size_t>(blocks * head_dim), stream);
    qk_norm_rope_backward_kernel<V, K, G, In, Out><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
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
