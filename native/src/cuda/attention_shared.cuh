// Pieces shared by the fp32 (attention.cu) and tensor-core (attention_mma.cu, attention_wgmma*.cu)
// attention kernels: the exp2-domain constants, the forward's online-softmax step and its final
// row sums, the split dK/dV slab layout (so all use the same workspace size), the backward's
// row-dot and split-reduce kernels, and a float4 element accessor. Internal to those files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bf16_vec.cuh"

namespace cudablocks::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;

// Two values as a bf16 pair (lo in the low half), each rounded to nearest even.
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
    return static_cast<std::uint32_t>(bf16_bits(lo)) | (static_cast<std::uint32_t>(bf16_bits(hi)) << 16);
}
// Two adjacent outputs at p: fp32, or bf16 (bit patterns, each rounded once).
__device__ __forceinline__ void store_pair(float* p, float lo, float hi) {
    *reinterpret_cast<float2*>(p) = make_float2(lo, hi);
}
__device__ __forceinline__ void store_pair(std::uint16_t* p, float lo, float hi) {
    *reinterpret_cast<std::uint32_t*>(p) = pack_bf16(lo, hi);
}

__device__ __forceinline__ float f4_get(const float4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One key tile of the forward's online softmax (exp2 domain), for a thread's rows row0 + g and
// row0 + g + 8 of its warp's tile (g = lane / 4, t = lane % 4). s_at(j, c) is the score of key
// 8j + 2t + (c & 1) in row half c / 2 (j < 8, the mma accumulator order), replaced by P =
// exp2(s * scale_log2 - m); keys right of the row are masked on the diagonal tile (keys and rows
// then start together). m and l (this thread's partial row sums) are updated, and the output
// accumulator o_at(nb, c) (nb < NB, the same order) rescaled. Shared by the mma.sync and wgmma
// forwards.
template <int NB, class S, class O>
__device__ __forceinline__ void online_softmax_tile(S s_at, O o_at, float (&m)[2], float (&l)[2], int row0, bool diag,
                                                    float scale_log2) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int row = row0 + g + 8 * hh;
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float x = s_at(j, 2 * hh + e) * scale_log2;
                if (diag && j * 8 + 2 * t + e > row) x = -INFINITY;
                s_at(j, 2 * hh + e) = x;
                mx = fmaxf(mx, x);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Every row sees key 0 of tile 0 (and its own key on the diagonal): mx is finite.
        const float m_new = fmaxf(m[hh], mx);
        const float alpha = exp2f(m[hh] - m_new);  // 0 on the first tile
        m[hh] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = exp2f(s_at(j, 2 * hh + e) - m_new);
                s_at(j, 2 * hh + e) = p;
                rs += p;
            }
        l[hh] = l[hh] * alpha + rs;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            o_at(nb, 2 * hh) *= alpha;
            o_at(nb, 2 * hh + 1) *= alpha;
        }
    }
}

// The forward's end for a thread's rows row0 + g and row0 + g + 8 of its sequence (g = lane / 4):
// the partial row sums l reduced over the row's four lanes, lse = (m + log2(sum)) ln 2 written by
// lane t == 0 at lse_head[row * lse_stride] for rows before `len`, and inv = 1 / sum for the
// output. Shared by the mma.sync and wgmma forwards.
__device__ __forceinline__ void finish_rows(const float (&m)[2], const float (&l)[2], int row0, int len,
                                            float* lse_head, int lse_stride, float (&inv)[2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float sum = l[hh];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[hh] = 1.f / sum;
        const int r = row0 + g + 8 * hh;
        if (t == 0 && r < len) lse_head[(int64_t)r * lse_stride] = (m[hh] + log2f(sum)) * kLn2;
    }
}

// What a block of a dK/dV pass works on: kv head blockIdx.x / splits, split blockIdx.x % splits
// (the query heads [h_begin, h_end) of the kv head's GQA group), sequence blockIdx.y.
struct DkvBlock {
    int kvh, split, start, len, group, h_begin, h_end;
    __device__ __forceinline__ DkvBlock(const int32_t* cu_seqlens, int n_q_heads, int n_kv_heads, int splits)
        : kvh(blockIdx.x / splits),
          split(blockIdx.x % splits),
          start(cu_seqlens[blockIdx.y]),
          len(cu_seqlens[blockIdx.y + 1] - start),
          group(n_q_heads / n_kv_heads),
          h_begin(kvh * group + split * group / splits),
          h_end(kvh * group + (split + 1) * group / splits) {}
};

// Partial dK/dV slabs of the split dK/dV pass, each [T][n_kv*head_dim]: slab i lives in dq
// (which is group slabs long and written only by the last kernel) for i < n_first, in the
// workspace after that. Split s > 0 owns slabs 2(s-1) (dK) and 2(s-1)+1 (dV).
struct Slabs {
    float* first;
    float* rest;
    int n_first;
    int64_t size;  // floats per slab
    __device__ __forceinline__ float* operator()(int i) const {
        return i < n_first ? first + (int64_t)i * size : rest + (int64_t)(i - n_first) * size;
    }
};

// The first step of both backwards: D[t, h] = sum_c dout[t, h, c] * out[t, h, c] (= rowsum(P * dP),
// the softmax backward's correction term). One warp per (token, head) row; the row is contiguous.
// In: float, or std::uint16_t (bf16 out and dout; the same sums in the same order on their values).
template <class In>
__global__ void attention_rowdot_kernel(const In* __restrict__ out, const In* __restrict__ dout,
                                        float* __restrict__ dsum, int64_t rows, int head_dim) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
        const In* o = out + r * head_dim;
        const In* d = dout + r * head_dim;
        float acc = 0.f;
        for (int c = lane; c < head_dim / 4; c += 32) {
            const float4 a = load_vec<float4>(o, c), b = load_vec<float4>(d, c);
            acc = fmaf(a.x, b.x, acc);
            acc = fmaf(a.y, b.y, acc);
            acc = fmaf(a.z, b.z, acc);
            acc = fmaf(a.w, b.w, acc);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) dsum[r] = acc;
    }
}

// The reduce of a split dK/dV pass (splits > 1): dk += slab dK's, dv += slab dV's, in slab order
// (deterministic). Rows of tokens that no sequence covers do not exist (cu_seqlens ends at T).
__global__ void attention_reduce_kernel(float* __restrict__ dk, float* __restrict__ dv, Slabs slabs,
                                        int n_splits) {
    const int64_t n = slabs.size;
    const int64_t n4 = n / 4;  // n = T * n_kv * head_dim, a multiple of 4
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4;
         i += (int64_t)gridDim.x * blockDim.x) {
        float4 a = reinterpret_cast<const float4*>(dk)[i];
        float4 b = reinterpret_cast<const float4*>(dv)[i];
        for (int s = 1; s < n_splits; ++s) {
            const float4 x = reinterpret_cast<const float4*>(slabs(2 * (s - 1)))[i];
            const float4 y = reinterpret_cast<const float4*>(slabs(2 * (s - 1) + 1))[i];
            a.x += x.x; a.y += x.y; a.z += x.z; a.w += x.w;
            b.x += y.x; b.y += y.y; b.z += y.z; b.w += y.w;
        }
        reinterpret_cast<float4*>(dk)[i] = a;
        reinterpret_cast<float4*>(dv)[i] = b;
    }
}

}  // namespace
}  // namespace cudablocks::cuda
