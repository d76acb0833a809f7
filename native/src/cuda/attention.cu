// Causal GQA attention over packed variable-length sequences, fp32, CUDA. Contract: attention.cuh.
//
// FlashAttention-2 structure on SIMT fp32 FFMA (IEEE fp32: no tensor cores, no fast-math):
//
//   forward   one block = one 64-query tile of one query head of one sequence. Q tile in shared
//             memory; loop over the 64-key tiles at or left of the diagonal (causal: the rest are
//             skipped), K/V tiles streamed through shared memory with cp.async, online softmax in
//             registers (exp2 domain). Writes out and lse. Scores never reach global memory.
//   backward  1) rowdot:  D = rowsum(dout * out) per (token, q head)  -> workspace
//             2) dkdv:    one block = one 64-key tile of one kv head (of one sequence); it loops over
//                         the query heads of its GQA group and the query tiles at or below the
//                         diagonal, recomputes P^T from lse, and keeps dK, dV in registers. The sum
//                         over the group's query heads happens inside the block: no atomics.
//                         When there are too few kv tiles to fill the GPU (short batches), the group's
//                         heads are split over `splits` blocks that write partial dK/dV slabs ...
//             3) reduce:  ... which one small kernel adds up in a fixed order (only when splits > 1).
//             4) dq:      one block = one 64-query tile of one query head; loops over key tiles,
//                         recomputes P and dP, dQ += dS K in registers.
//             dQ choice: a separate pass that recomputes P per query tile (2 extra 64x64xd products
//             per tile pair) instead of fp32 atomics from the dK/dV pass. Costs ~40% more backward
//             FLOPs; buys bitwise-deterministic gradients and no dq zeroing.
//
// Launches: forward 1; backward 3 (4 with splits). The grid is (heads [x splits], sequences, tiles):
// no host loop over sequences or heads; blocks whose tile lies beyond their sequence's end exit.
// Tile indices are ordered so that the longest-running blocks (long causal rows) start first.
//
// Threads: 256 per block as a 16x16 grid, thread (ty, tx). In every 64x64 score-like tile
// (S, P, dP, dS) a thread owns rows ty*4+a (a<4) and columns tx+16b (b<4): 16 values, and the 16
// threads that share a row sit in one half-warp, so row max/sum are 4 shuffles. In every 64 x d
// accumulator (O, dQ, dK, dV) a thread owns the same 4 rows and d/16 columns (float4 chunks
// tx*4 + 64g for d >= 64). Shared memory tiles are laid out so that all float4 reads are
// conflict-free: tiles read by row-broadcast are unpadded, tiles read by 16 distinct rows per warp
// have rows padded to d+4 floats (backward) or float4 chunks XOR-swizzled (forward K, to save the
// padding), and 64x64 P/dS tiles are XOR-swizzled (see swz()).
//
// Cost (causal, per query head, sequence length n, head dim d, pairs = n(n+1)/2; one 64x64xd
// product = 2*64*64*d FLOPs; diagonal tiles are computed in full and masked):
//   forward : S = QK^T, O += PV                               2 products  ->  4*pairs*d FLOPs
//   backward: dkdv: S^T, dP^T, dV += P^T dO, dK += dS^T Q     4 products
//             dq:   S, dP, dQ += dS K                          3 products  -> 14*pairs*d FLOPs
//             (the usual "useful" count is 10*pairs*d = 2.5x forward)
//   At n = 2048, d = 128, 32 q heads: forward 34 GFLOP, backward 120 GFLOP executed.
//   Global memory: forward reads Q and writes O once, reads each K/V tile once per query tile of the
//   group's 4 heads (mostly from L2: a 64x128 tile is 32 KB, K+V of one kv head at n = 2048 is 2 MB).
//   Intensity per K/V tile read: 2*64*64*128 FLOP*2 / 64 KB = 32 FLOP/byte (from L2).
//   backward dkdv reads each Q/dO tile once per key tile (32 FLOP/byte of L2 traffic as well).
//   Scratch for the split dK/dV pass: 2*(splits-1) slabs of T*n_kv*d floats. dq (group slabs in
//   size, not yet written when the dK/dV pass runs) holds the first ones and the workspace the rest,
//   so the workspace is T*n_q floats (D) + max(0, group-2)*T*n_kv*d floats (Qwen3-4B, T = 4096:
//   0.5 MB + 33.5 MB).
#include "cuda/attention.cuh"
#include "cuda/attention_shared.cuh"
#include "cuda/device_limits.hpp"
#include "cudablocks/errors.hpp"

#include <cmath>
#include <cstdint>
#include <string>

namespace cudablocks::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Error handling: the one place that turns CUDA errors into exceptions.

[[noreturn]] void throw_cuda_error(const char* what, cudaError_t err) {
    throw CudaError(std::string("cudablocks attention: ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

void cuda_check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw_cuda_error(what, err);
}

void check_launch(const char* kernel) { cuda_check(cudaGetLastError(), kernel); }

// ---------------------------------------------------------------------------------------------
// Constants and small device helpers.

constexpr int kTile = 64;        // query rows and key rows per tile
constexpr int kThreads = 256;    // 16 x 16 threads
constexpr int kMaxHeadDim = 128;
// Unroll factors of the inner loops of tile_abT / tile_pB. The forward runs two blocks per SM and
// must stay within 128 registers (it does at D=128 without spills); the backward kernels run one
// block per SM (shared memory) and may use more.
constexpr int kFwdAbtUnroll = 4, kFwdPbUnroll = 4;
constexpr int kBwdAbtUnroll = 4, kBwdPbUnroll = 4;

// Index of element (r, c) of a 64x64 tile stored XOR-swizzled: rows with odd r/4 keep column c at
// c ^ 16. The two half-warps of a warp write rows r and r+4 at the same columns; unswizzled, both
// would land in the same banks (2-way conflict). Float4 reads of 4 aligned columns stay contiguous.
__device__ __forceinline__ int swz(int r, int c) { return r * kTile + (c ^ (((r >> 2) & 1) << 4)); }

// cp.async (sm_80+): 16-byte (or 4-byte) global->shared copy that bypasses registers; when !valid
// the destination is zero-filled and nothing is read. `src` must still be a mapped address.
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
#else
    *reinterpret_cast<float4*>(dst) =
        valid ? *reinterpret_cast<const float4*>(src) : make_float4(0.f, 0.f, 0.f, 0.f);
#endif
}

__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(n));
#else
    *dst = valid ? *src : 0.f;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Column layout of the 64 x D accumulators: thread tx owns CPT = D/16 columns, as NV chunks of VEC
// consecutive floats: chunk g covers columns (g*16 + tx)*VEC .. +VEC-1.
template <int D>
struct Cols {
    static constexpr int CPT = D / 16;
    static constexpr int VEC = CPT >= 4 ? 4 : CPT;
    static constexpr int NV = CPT / VEC;
    static __device__ __forceinline__ int col(int g, int tx) { return (g * 16 + tx) * VEC; }
};

template <int VEC>
__device__ __forceinline__ void load_vec(const float* p, float* dst) {
    if constexpr (VEC == 4) {
        const float4 t = *reinterpret_cast<const float4*>(p);
        dst[0] = t.x; dst[1] = t.y; dst[2] = t.z; dst[3] = t.w;
    } else if constexpr (VEC == 2) {
        const float2 t = *reinterpret_cast<const float2*>(p);
        dst[0] = t.x; dst[1] = t.y;
    } else {
        dst[0] = *p;
    }
}

template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const float* src) {
    if constexpr (VEC == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(src[0], src[1], src[2], src[3]);
    } else if constexpr (VEC == 2) {
        *reinterpret_cast<float2*>(p) = make_float2(src[0], src[1]);
    } else {
        *p = src[0];
    }
}



// Copy a 64 x D tile from global memory (row stride gstride floats) into shared memory (row stride
// sstride floats) with cp.async. Rows >= rows_valid and columns >= head_dim are zero-filled, so
// tiles that run past a sequence's end (or head_dim < D) contribute exact zeros.
// Consecutive threads take consecutive 16-byte chunks of a row: coalesced reads, conflict-free writes.
// With swizzle = true the tile is unpadded (sstride must be D) and float4 chunk c of row r is stored
// at chunk c ^ (r & kChunkXor<D>) (see tile_abT).
template <int D>
constexpr int kChunkXor = (D / 4 < 8 ? D / 4 : 8) - 1;

template <int D, bool swizzle = false>
__device__ __forceinline__ void load_tile_async(float* s, int sstride, const float* g, int64_t gstride,
                                                int rows_valid, int head_dim) {
    constexpr int C4 = D / 4;
    static_assert((kTile * C4) % kThreads == 0, "tile chunks must divide evenly over the threads");
#pragma unroll 1  // unrolled, the compiler keeps every chunk's address live across the kt loop: spills
    for (int it = 0; it < kTile * C4 / kThreads; ++it) {
        const int idx = threadIdx.x + it * kThreads;
        const int r = idx / C4;
        const int c = (idx % C4) * 4;
        const bool valid = r < rows_valid && c < head_dim;
        const int sc = swizzle ? (((c / 4) ^ (r & kChunkXor<D>)) * 4) : c;
        cp_async16(s + r * sstride + sc, valid ? g + r * gstride + c : g, valid);
    }
}

// Copy 64 per-row scalars (lse or D of one head) with stride `gstride` into shared memory.
__device__ __forceinline__ void load_rows_async(float* s, const float* g, int64_t gstride,
                                                int rows_valid) {
    if (threadIdx.x < kTile) {
        const int r = threadIdx.x;
        const bool valid = r < rows_valid;
        cp_async4(s + r, valid ? g + r * gstride : g, valid);
    }
}

// acc[a][b] += sum_{c<D} A[(ty*4+a)*lda + c] * B[(tx+16b)*ldb + c]
// A 64x64 tile of A B^T from two 64 x D shared-memory tiles. A rows are read by row-broadcast
// (A may be unpadded); B rows are read by 16 distinct lanes, so B is either padded (ldb = D+4) or
// chunk-swizzled (B_SWIZZLED, ldb = D; see load_tile_async): both keep the float4 reads
// conflict-free. Row tx+16b of B has (row & kChunkXor) = tx & kChunkXor for every b.
// Per 4 columns: 8 LDS.128, 64 FFMA.
template <int D, int UNROLL, bool B_SWIZZLED = false>
__device__ __forceinline__ void tile_abT(const float* A, int lda, const float* B, int ldb, int ty, int tx,
                                         float acc[4][4]) {
    const float* a_ptr = A + ty * 4 * lda;
    const float* b_ptr = B + tx * ldb;
    const int bxor = B_SWIZZLED ? (tx & kChunkXor<D>) : 0;
#pragma unroll UNROLL
    for (int c = 0; c < D; c += 4) {
        float4 av[4], bv[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) av[a] = *reinterpret_cast<const float4*>(a_ptr + a * lda + c);
#pragma unroll
        for (int b = 0; b < 4; ++b)
            bv[b] = *reinterpret_cast<const float4*>(b_ptr + 16 * b * ldb + (((c / 4) ^ bxor) * 4));
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                acc[a][b] = fmaf(av[a].x, bv[b].x, acc[a][b]);
                acc[a][b] = fmaf(av[a].y, bv[b].y, acc[a][b]);
                acc[a][b] = fmaf(av[a].z, bv[b].z, acc[a][b]);
                acc[a][b] = fmaf(av[a].w, bv[b].w, acc[a][b]);
            }
        }
    }
}

// acc[a][.] += sum_{j<64} P[ty*4+a][j] * B[j][cols of tx]
// A 64 x D product of a swizzled 64x64 shared tile P with a 64 x D shared tile B (row stride ldb).
// P is read by row-broadcast; B rows by all lanes at consecutive chunks. Per 4 j: 4 + 4*NV loads,
// 16*CPT FFMA (D=128: 12 LDS.128, 128 FFMA).
template <int D, int UNROLL>
__device__ __forceinline__ void tile_pB(const float* P, const float* B, int ldb, int ty, int tx,
                                        float acc[4][D / 16]) {
    using C = Cols<D>;
#pragma unroll UNROLL
    for (int j = 0; j < kTile; j += 4) {
        float4 pv[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) pv[a] = *reinterpret_cast<const float4*>(P + swz(ty * 4 + a, j));
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
            float bv[C::CPT];
#pragma unroll
            for (int g = 0; g < C::NV; ++g)
                load_vec<C::VEC>(B + (j + jj) * ldb + C::col(g, tx), bv + g * C::VEC);
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const float p = f4_get(pv[a], jj);
#pragma unroll
                for (int h = 0; h < C::CPT; ++h) acc[a][h] = fmaf(p, bv[h], acc[a][h]);
            }
        }
    }
}

// Write rows [0, rows_valid) x columns [0, head_dim) of a thread's 64 x D accumulator, times `mul`
// (per row), to global memory at g (row stride gstride).
template <int D>
__device__ __forceinline__ void store_acc(float* g, int64_t gstride, const float acc[4][D / 16],
                                         const float mul[4], int rows_valid, int head_dim, int ty,
                                         int tx) {
    using C = Cols<D>;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int r = ty * 4 + a;
        if (r >= rows_valid) continue;
#pragma unroll
        for (int g2 = 0; g2 < C::NV; ++g2) {
            const int c = C::col(g2, tx);
            if (c >= head_dim) continue;
            float t[C::VEC];
#pragma unroll
            for (int e = 0; e < C::VEC; ++e) t[e] = acc[a][g2 * C::VEC + e] * mul[a];
            store_vec<C::VEC>(g + r * gstride + c, t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward.
//
// Grid (n_q_heads, n_seqs, n_qtiles); block 256; dynamic smem (3*64*D + 64*64) floats
// (D=128: 114,688 B -> two blocks per SM on H100). Computes out and lse of query tile qt of head h:
//   for each key tile kt <= qt:  S = Q K^T * scale*log2(e) (masked on the diagonal tile)
//                                m' = max(m, rowmax S); P = exp2(S - m'); l = l*exp2(m-m') + rowsum P
//                                O = O*exp2(m-m') + P V
//   out = O / l, lse = (m + log2 l) * ln 2.
// The first key tile always holds key 0, visible to every row, so m is finite after it and no
// -inf - -inf NaN can arise. Rows past the sequence end see zero-filled Q and are not stored.
// P goes through shared memory (it is the A operand of P V).
// Pipeline (cp.async): K(kt+1) loads during P V of tile kt, V(kt+1) during S of tile kt+1.
// K is stored unpadded and chunk-swizzled (not padded) so that Q, K, V, P fit twice per SM.
template <int D>
__global__ void __launch_bounds__(kThreads, 2)
attention_forward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                         const float* __restrict__ v, float* __restrict__ out,
                         float* __restrict__ lse, const int32_t* __restrict__ cu_seqlens,
                         int n_q_heads, int n_kv_heads, int head_dim, float scale_log2) {
    using C = Cols<D>;
    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);  // [64][D]   read by row-broadcast
    float* Ks = Qs + kTile * D;                   // [64][D]   chunk-swizzled, read by 16 distinct rows
    float* Vs = Ks + kTile * D;                   // [64][D]   read by row-broadcast
    float* Ps = Vs + kTile * D;                   // [64][64]  swizzled

    const int h = blockIdx.x;
    const int seq = blockIdx.y;
    const int start = cu_seqlens[seq];
    const int len = cu_seqlens[seq + 1] - start;
    const int n_tiles = (len + kTile - 1) / kTile;
    const int kvh = h / (n_q_heads / n_kv_heads);
    const int64_t q_stride = (int64_t)n_q_heads * head_dim;
    const int64_t kv_stride = (int64_t)n_kv_heads * head_dim;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    const float* q_head = q + (int64_t)start * q_stride + (int64_t)h * head_dim;
    const float* k_head = k + (int64_t)start * kv_stride + (int64_t)kvh * head_dim;
    const float* v_head = v + (int64_t)start * kv_stride + (int64_t)kvh * head_dim;

    // Heaviest tiles (largest qt) first; loop in case the grid is shorter than the sequence.
    for (int qt = (int)gridDim.z - 1 - (int)blockIdx.z; qt < n_tiles; qt += gridDim.z) {
        const int q0 = qt * kTile;
        __syncthreads();  // a previous iteration's readers of shared memory are done
        load_tile_async<D>(Qs, D, q_head + (int64_t)q0 * q_stride, q_stride, len - q0, head_dim);
        load_tile_async<D, true>(Ks, D, k_head, kv_stride, len, head_dim);
        cp_async_commit();  // group: Q, K(0)
        load_tile_async<D>(Vs, D, v_head, kv_stride, len, head_dim);
        cp_async_commit();  // group: V(0)

        float o[4][C::CPT];
        float m[4], l[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            m[a] = -INFINITY;
            l[a] = 0.f;  // per-thread partial row sum; reduced over the 16 row threads at the end
#pragma unroll
            for (int c = 0; c < C::CPT; ++c) o[a][c] = 0.f;
        }

        for (int kt = 0; kt <= qt; ++kt) {
            const int k0 = kt * kTile;
            cp_async_wait<1>();
            __syncthreads();  // K(kt) (and Q) have landed; V(kt) may still be in flight

            float s[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) s[a][b] = 0.f;
            tile_abT<D, kFwdAbtUnroll, true>(Qs, D, Ks, D, ty, tx, s);

            cp_async_wait<0>();
            __syncthreads();  // V(kt) has landed and every thread is done reading K(kt)

            const bool diag = kt == qt;
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                float mx = -INFINITY;
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    float x = s[a][b] * scale_log2;
                    if (diag && tx + 16 * b > ty * 4 + a) x = -INFINITY;  // key after query
                    s[a][b] = x;
                    mx = fmaxf(mx, x);
                }
#pragma unroll
                for (int off = 8; off > 0; off >>= 1)
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                const float m_new = fmaxf(m[a], mx);
                const float alpha = exp2f(m[a] - m_new);  // 0 on the first tile (m = -inf)
                m[a] = m_new;
                float rs = 0.f;
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    s[a][b] = exp2f(s[a][b] - m_new);
                    rs += s[a][b];
                    Ps[swz(ty * 4 + a, tx + 16 * b)] = s[a][b];
                }
                l[a] = l[a] * alpha + rs;
#pragma unroll
                for (int c = 0; c < C::CPT; ++c) o[a][c] *= alpha;
            }
            // Issued here rather than right after the barrier above: S is dead now, which keeps the
            // forward within 128 registers (the copy still overlaps the whole of P V).
            if (kt < qt)
                load_tile_async<D, true>(Ks, D, k_head + (int64_t)(k0 + kTile) * kv_stride, kv_stride,
                                         len - k0 - kTile, head_dim);
            cp_async_commit();  // group: K(kt+1) (empty on the last tile)
            __syncwarp();       // the P rows a thread reads were written by its own warp
            tile_pB<D, kFwdPbUnroll>(Ps, Vs, D, ty, tx, o);

            __syncthreads();  // everyone is done reading V(kt) (and its own P rows)
            if (kt < qt)
                load_tile_async<D>(Vs, D, v_head + (int64_t)(k0 + kTile) * kv_stride, kv_stride,
                                   len - k0 - kTile, head_dim);
            cp_async_commit();  // group: V(kt+1) (empty on the last tile)
        }

        float inv[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            float sum = l[a];
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            inv[a] = 1.f / sum;
            const int r = ty * 4 + a;
            if (tx == 0 && q0 + r < len)
                lse[(int64_t)(start + q0 + r) * n_q_heads + h] = (m[a] + log2f(sum)) * kLn2;
        }
        store_acc<D>(out + (int64_t)start * q_stride + (int64_t)h * head_dim + (int64_t)q0 * q_stride,
                     q_stride, o, inv, len - q0, head_dim, ty, tx);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 1 is attention_rowdot_kernel (cuda/attention_shared.cuh).

// Backward 2: dK, dV of one 64-key tile of kv head kvh, summed over query heads
// [h_begin, h_end) of its group (all of them when splits == 1).
//
// Grid (n_kv_heads*splits, n_seqs, n_ktiles); block 256; dynamic smem
// (2*64*D + 2*64*(D+4) + 2*64*64 + 2*64) floats (D=128: 166,400 B; one block per SM).
// For each (query head, query tile qt >= kt), with the K, V tile resident in shared memory:
//   S^T  = K Q^T                       P^T = exp2(S^T*scale*log2e - lse*log2e), causal-masked
//   dP^T = V dO^T                      dS^T = P^T * (dP^T - D)
//   dK  += dS^T Q                      dV  += P^T dO          (dK scaled by `scale` at the end)
// Pipelined with cp.async: the next Q tile loads during dV += P^T dO, the next dO tile during the
// next S^T. Keys past the sequence end get zero K/V and are not stored.
// splits == 1: results go to dk/dv. Otherwise split 0 writes dk/dv and split s > 0 writes its
// slabs (see Slabs), which the reduce kernel adds.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
attention_backward_dkdv_kernel(const float* __restrict__ q, const float* __restrict__ k,
                               const float* __restrict__ v, const float* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ dsum,
                               float* __restrict__ dk, float* __restrict__ dv,
                               Slabs slabs, const int32_t* __restrict__ cu_seqlens, int n_q_heads, int n_kv_heads, int head_dim,
                               int splits, float scale, float scale_log2) {
    using C = Cols<D>;
    constexpr int LD = D + 4;
    extern __shared__ float4 smem4[];
    float* Ks = reinterpret_cast<float*>(smem4);  // [64][D]    read by row-broadcast
    float* Vs = Ks + kTile * D;                   // [64][D]
    float* Qs = Vs + kTile * D;                   // [64][D+4]  read by 16 distinct rows
    float* dOs = Qs + kTile * LD;                 // [64][D+4]
    float* Ps = dOs + kTile * LD;                 // [64][64] swizzled, P^T
    float* dSs = Ps + kTile * kTile;              // [64][64] swizzled, dS^T
    float* lse_s = dSs + kTile * kTile;           // [64]
    float* dsum_s = lse_s + kTile;                // [64]

    const DkvBlock blk(cu_seqlens, n_q_heads, n_kv_heads, splits);
    const int kvh = blk.kvh, split = blk.split, start = blk.start, len = blk.len;
    const int h_begin = blk.h_begin, h_end = blk.h_end;
    const int n_tiles = (len + kTile - 1) / kTile;
    const int64_t q_stride = (int64_t)n_q_heads * head_dim;
    const int64_t kv_stride = (int64_t)n_kv_heads * head_dim;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;

    // Heaviest tiles (smallest kt: the most query tiles below them) have the smallest blockIdx.z.
    for (int kt = blockIdx.z; kt < n_tiles; kt += gridDim.z) {
        const int k0 = kt * kTile;
        const int64_t kv_off = (int64_t)(start + k0) * kv_stride + (int64_t)kvh * head_dim;
        __syncthreads();  // a previous iteration's readers of shared memory are done
        load_tile_async<D>(Ks, D, k + kv_off, kv_stride, len - k0, head_dim);
        load_tile_async<D>(Vs, D, v + kv_off, kv_stride, len - k0, head_dim);
        cp_async_commit();

        const int n_qt = n_tiles - kt;                 // query tiles kt .. n_tiles-1
        const int n_items = (h_end - h_begin) * n_qt;  // (query head, query tile) pairs
        auto issue_q = [&](int item) {
            const int hq = h_begin + item / n_qt;
            const int q0 = (kt + item % n_qt) * kTile;
            const int64_t off = (int64_t)(start + q0) * q_stride + (int64_t)hq * head_dim;
            load_tile_async<D>(Qs, LD, q + off, q_stride, len - q0, head_dim);
            load_rows_async(lse_s, lse + (int64_t)(start + q0) * n_q_heads + hq, n_q_heads, len - q0);
        };
        auto issue_do = [&](int item) {
            const int hq = h_begin + item / n_qt;
            const int q0 = (kt + item % n_qt) * kTile;
            const int64_t off = (int64_t)(start + q0) * q_stride + (int64_t)hq * head_dim;
            load_tile_async<D>(dOs, LD, dout + off, q_stride, len - q0, head_dim);
            load_rows_async(dsum_s, dsum + (int64_t)(start + q0) * n_q_heads + hq, n_q_heads, len - q0);
        };
        issue_q(0);
        cp_async_commit();
        issue_do(0);
        cp_async_commit();

        float dk_acc[4][C::CPT], dv_acc[4][C::CPT];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int c = 0; c < C::CPT; ++c) dk_acc[a][c] = dv_acc[a][c] = 0.f;

        for (int item = 0; item < n_items; ++item) {
            const int q0 = (kt + item % n_qt) * kTile;
            cp_async_wait<1>();
            __syncthreads();  // K, V, Q, lse have landed

            // P^T: rows = keys (ty*4+a), columns = queries (tx+16b)
            float p[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) p[a][b] = 0.f;
            tile_abT<D, kBwdAbtUnroll>(Ks, D, Qs, LD, ty, tx, p);
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const int i = tx + 16 * b;
                const float lse2 = lse_s[i] * kLog2e;
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    const int j = ty * 4 + a;
                    const bool valid = q0 + i < len && k0 + j <= q0 + i;
                    p[a][b] = valid ? exp2f(p[a][b] * scale_log2 - lse2) : 0.f;
                }
            }

            cp_async_wait<0>();
            __syncthreads();  // dO, D have landed

            float dp[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) dp[a][b] = 0.f;
            tile_abT<D, kBwdAbtUnroll>(Vs, D, dOs, LD, ty, tx, dp);
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const float dsv = dsum_s[tx + 16 * b];
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    Ps[swz(ty * 4 + a, tx + 16 * b)] = p[a][b];
                    dSs[swz(ty * 4 + a, tx + 16 * b)] = p[a][b] * (dp[a][b] - dsv);
                }
            }
            __syncwarp();  // the P^T/dS^T rows a thread reads were written by its own warp

            tile_pB<D, kBwdPbUnroll>(dSs, Qs, LD, ty, tx, dk_acc);
            __syncthreads();  // everyone is done with Qs
            if (item + 1 < n_items) issue_q(item + 1);
            cp_async_commit();

            tile_pB<D, kBwdPbUnroll>(Ps, dOs, LD, ty, tx, dv_acc);
            __syncthreads();  // everyone is done with dOs, P^T, dS^T
            if (item + 1 < n_items) issue_do(item + 1);
            cp_async_commit();
        }

        // Store (keys past the sequence end are dropped).
        float* dk_dst = dk;
        float* dv_dst = dv;
        if (split > 0) {
            dk_dst = slabs(2 * (split - 1));
            dv_dst = slabs(2 * (split - 1) + 1);
        }
        float one[4] = {1.f, 1.f, 1.f, 1.f}, sc[4] = {scale, scale, scale, scale};
        store_acc<D>(dk_dst + kv_off, kv_stride, dk_acc, sc, len - k0, head_dim, ty, tx);
        store_acc<D>(dv_dst + kv_off, kv_stride, dv_acc, one, len - k0, head_dim, ty, tx);
    }
}

// Backward 3 (only when splits > 1) is attention_reduce_kernel (cuda/attention_shared.cuh).

// Backward 4: dQ of one 64-query tile of query head h.
//
// Grid (n_q_heads, n_seqs, n_qtiles); block 256; dynamic smem
// (2*64*D + 2*64*(D+4) + 64*64) floats (D=128: 149,504 B; one block per SM).
// With Q, dO, lse, D of the tile resident, for each key tile kt <= qt:
//   dP = dO V^T;  S = Q K^T;  P = exp2(S*scale*log2e - lse*log2e) (causal);  dS = P * (dP - D)
//   dQ += dS K                                               (scaled by `scale` at the end)
// Pipeline: V(kt) is prefetched during the previous tile's dS K; K(kt) loads while dP is computed.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
attention_backward_dq_kernel(const float* __restrict__ q, const float* __restrict__ k,
                             const float* __restrict__ v, const float* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ dsum,
                             float* __restrict__ dq, const int32_t* __restrict__ cu_seqlens,
                             int n_q_heads, int n_kv_heads, int head_dim, float scale,
                             float scale_log2) {
    using C = Cols<D>;
    constexpr int LD = D + 4;
    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);  // [64][D]    read by row-broadcast
    float* dOs = Qs + kTile * D;                  // [64][D]
    float* Ks = dOs + kTile * D;                  // [64][D+4]  read by 16 distinct rows
    float* Vs = Ks + kTile * LD;                  // [64][D+4]
    float* dSs = Vs + kTile * LD;                 // [64][64] swizzled

    const int h = blockIdx.x;
    const int seq = blockIdx.y;
    const int start = cu_seqlens[seq];
    const int len = cu_seqlens[seq + 1] - start;
    const int n_tiles = (len + kTile - 1) / kTile;
    const int kvh = h / (n_q_heads / n_kv_heads);
    const int64_t q_stride = (int64_t)n_q_heads * head_dim;
    const int64_t kv_stride = (int64_t)n_kv_heads * head_dim;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    const float* k_head = k + (int64_t)start * kv_stride + (int64_t)kvh * head_dim;
    const float* v_head = v + (int64_t)start * kv_stride + (int64_t)kvh * head_dim;

    for (int qt = (int)gridDim.z - 1 - (int)blockIdx.z; qt < n_tiles; qt += gridDim.z) {
        const int q0 = qt * kTile;
        const int64_t q_off = (int64_t)(start + q0) * q_stride + (int64_t)h * head_dim;
        __syncthreads();  // a previous iteration's readers of shared memory are done
        load_tile_async<D>(Qs, D, q + q_off, q_stride, len - q0, head_dim);
        load_tile_async<D>(dOs, D, dout + q_off, q_stride, len - q0, head_dim);
        cp_async_commit();
        load_tile_async<D>(Vs, LD, v_head, kv_stride, len, head_dim);
        cp_async_commit();

        // Per-row lse (log2 domain) and D for this thread's 4 rows.
        float lse2[4], dsv[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int r = q0 + ty * 4 + a;
            const int64_t idx = (int64_t)(start + r) * n_q_heads + h;
            lse2[a] = r < len ? lse[idx] * kLog2e : 0.f;
            dsv[a] = r < len ? dsum[idx] : 0.f;
        }

        float dq_acc[4][C::CPT];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int c = 0; c < C::CPT; ++c) dq_acc[a][c] = 0.f;

        for (int kt = 0; kt <= qt; ++kt) {
            const int k0 = kt * kTile;
            load_tile_async<D>(Ks, LD, k_head + (int64_t)k0 * kv_stride, kv_stride, len - k0, head_dim);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();  // Q, dO, V(kt) have landed

            float dp[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) dp[a][b] = 0.f;
            tile_abT<D, kBwdAbtUnroll>(dOs, D, Vs, LD, ty, tx, dp);

            cp_async_wait<0>();
            __syncthreads();  // K(kt) has landed and every thread is done reading V(kt)
            if (kt < qt)
                load_tile_async<D>(Vs, LD, v_head + (int64_t)(k0 + kTile) * kv_stride, kv_stride,
                                   len - k0 - kTile, head_dim);
            cp_async_commit();

            float s[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) s[a][b] = 0.f;
            tile_abT<D, kBwdAbtUnroll>(Qs, D, Ks, LD, ty, tx, s);

            const bool diag = kt == qt;
#pragma unroll
            for (int a = 0; a < 4; ++a) {
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const bool valid = !diag || tx + 16 * b <= ty * 4 + a;
                    const float pv = valid ? exp2f(s[a][b] * scale_log2 - lse2[a]) : 0.f;
                    dSs[swz(ty * 4 + a, tx + 16 * b)] = pv * (dp[a][b] - dsv[a]);
                }
            }
            __syncwarp();  // the dS rows a thread reads were written by its own warp
            tile_pB<D, kBwdPbUnroll>(dSs, Ks, LD, ty, tx, dq_acc);
            __syncthreads();  // everyone is done with K(kt) and dS before they are overwritten
        }

        const float sc[4] = {scale, scale, scale, scale};
        store_acc<D>(dq + q_off, q_stride, dq_acc, sc, len - q0, head_dim, ty, tx);
    }
}

// ---------------------------------------------------------------------------------------------
// Host side.

size_t forward_smem_bytes(int D) { return sizeof(float) * (size_t)(3 * kTile * D + kTile * kTile); }
size_t dkdv_smem_bytes(int D) {
    return sizeof(float) * (size_t)(2 * kTile * D + 2 * kTile * (D + 4) + 2 * kTile * kTile + 2 * kTile);
}
size_t dq_smem_bytes(int D) {
    return sizeof(float) * (size_t)(2 * kTile * D + 2 * kTile * (D + 4) + kTile * kTile);
}

// The compiled tile width D for a head_dim: the smallest of 16/32/64/128 that holds it.
int tile_dim_for(int head_dim) {
    if (head_dim <= 16) return 16;
    if (head_dim <= 32) return 32;
    if (head_dim <= 64) return 64;
    return 128;
}

struct Shape {
    int n_seqs, max_seqlen;
    int64_t total_tokens;
    int n_q_heads, n_kv_heads, head_dim;
};

void check_aligned(const void* p, const char* name) {
    if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 != 0)
        throw InvalidArgumentError(std::string("attention (cuda): ") + name +
                                    " must be a non-null, 16-byte aligned device pointer");
}

// Validates the host-visible arguments. Returns false when there is nothing to compute.
bool check_shape(const Shape& s, const int32_t* cu_seqlens) {
    auto fail = [](const std::string& msg) { throw InvalidArgumentError("attention (cuda): " + msg); };
    if (s.n_seqs < 0) fail("n_seqs must be >= 0, got " + std::to_string(s.n_seqs));
    if (s.total_tokens < 0) fail("total_tokens must be >= 0");
    if (s.n_q_heads <= 0 || s.n_kv_heads <= 0 || s.n_q_heads % s.n_kv_heads != 0)
        fail("n_q_heads (" + std::to_string(s.n_q_heads) + ") must be a positive multiple of n_kv_heads (" +
             std::to_string(s.n_kv_heads) + ")");
    if (s.head_dim <= 0 || s.head_dim > kMaxHeadDim || s.head_dim % 4 != 0)
        fail("head_dim must be a multiple of 4 in [4, " + std::to_string(kMaxHeadDim) + "], got " +
             std::to_string(s.head_dim));
    if (s.n_seqs > 65535) fail("at most 65535 sequences per call, got " + std::to_string(s.n_seqs));
    if (s.total_tokens > INT32_MAX) fail("total_tokens must fit in int32 (cu_seqlens is int32)");
    if (s.n_seqs == 0 || s.total_tokens == 0) return false;
    if (cu_seqlens == nullptr) fail("cu_seqlens is null");
    return true;
}

// Grid extent for the tile dimension: enough tiles for max_seqlen (clamped to [1, T]); kernels loop
// over any tiles beyond it, so a too-small max_seqlen is slow, never wrong.
unsigned tiles_for(const Shape& s) {
    int64_t m = s.max_seqlen < 1 ? 1 : s.max_seqlen;
    if (m > s.total_tokens) m = s.total_tokens;
    int64_t t = (m + kTile - 1) / kTile;
    return (unsigned)(t > 65535 ? 65535 : t);
}

// All kernels live on shared memory (loads use cp.async.cg, which bypasses L1): the largest
// carveout, so that the forward's two blocks per SM fit.
template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes, const char* name) {
    require_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes, std::string("attention (cuda): ") + name);
}

template <int D>
void launch_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                    const int32_t* cu_seqlens, const Shape& s, float scale, cudaStream_t stream) {
    const size_t smem = forward_smem_bytes(D);
    prepare_smem(attention_forward_kernel<D>, smem, "attention_forward_kernel");
    const dim3 grid((unsigned)s.n_q_heads, (unsigned)s.n_seqs, tiles_for(s));
    attention_forward_kernel<D><<<grid, kThreads, smem, stream>>>(
        q, k, v, out, lse, cu_seqlens, s.n_q_heads, s.n_kv_heads, s.head_dim, scale * kLog2e);
    check_launch("attention_forward_kernel launch");
}

// Number of blocks the query heads of a GQA group are split over in the dK/dV pass. One block per
// (kv head, key tile) sums the whole group, but its run time grows with group * n_tiles, and when
// the batch is short (few key tiles) the busiest block outlasts the average work per SM by far
// (T = 512, 8 kv heads: 64 blocks on 132 SMs, each walking 4 heads x up to 8 query tiles).
// Pick the smallest divisor of the group for which the busiest block carries no more than ~1.25x
// the average per-SM work, estimated as if every sequence were max_seqlen long.
int choose_splits(const Shape& s) {
    const int group = s.n_q_heads / s.n_kv_heads;
    if (group == 1) return 1;
    const int sms = multiprocessor_count();
    const double nt = (double)tiles_for(s);
    const double seqs = (double)s.total_tokens / (nt * kTile) > 1.0 ? (double)s.total_tokens / (nt * kTile) : 1.0;
    const double items_per_sm = s.n_q_heads * seqs * nt * (nt + 1) / 2 / (sms > 0 ? sms : 1);
    for (int sp = 1; sp < group; ++sp)
        if (group % sp == 0 && (double)(group / sp) * nt <= 1.25 * items_per_sm) return sp;
    return group;
}

template <int D>
void launch_backward(const float* q, const float* k, const float* v, const float* out,
                     const float* dout, const float* lse, float* dq, float* dk, float* dv,
                     float* workspace, const int32_t* cu_seqlens, const Shape& s, float scale,
                     int splits, cudaStream_t stream) {
    const int64_t rows = s.total_tokens * s.n_q_heads;
    float* dsum = workspace;
    const int group = s.n_q_heads / s.n_kv_heads;
    const Slabs slabs{dq, workspace + ((rows + 63) / 64) * 64,  // keep the slabs 256-byte aligned
                      group, s.total_tokens * s.n_kv_heads * s.head_dim};
    const float scale_log2 = scale * kLog2e;
    const unsigned tiles = tiles_for(s);

    {
        const int warps_per_block = kThreads / 32;
        int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
        if (blocks > 65535 * 8) blocks = 65535 * 8;
        attention_rowdot_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(out, dout, dsum, rows,
                                                                                 s.head_dim);
        check_launch("attention_rowdot_kernel launch");
    }
    {
        const size_t smem = dkdv_smem_bytes(D);
        prepare_smem(attention_backward_dkdv_kernel<D>, smem, "attention_backward_dkdv_kernel");
        const dim3 grid((unsigned)(s.n_kv_heads * splits), (unsigned)s.n_seqs, tiles);
        attention_backward_dkdv_kernel<D><<<grid, kThreads, smem, stream>>>(
            q, k, v, dout, lse, dsum, dk, dv, slabs, cu_seqlens, s.n_q_heads,
            s.n_kv_heads, s.head_dim, splits, scale, scale_log2);
        check_launch("attention_backward_dkdv_kernel launch");
    }
    if (splits > 1) {
        int64_t blocks = (slabs.size / 4 + kThreads - 1) / kThreads;
        if (blocks > 65535 * 8) blocks = 65535 * 8;
        attention_reduce_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(dk, dv, slabs, splits);
        check_launch("attention_reduce_kernel launch");
    }
    {
        const size_t smem = dq_smem_bytes(D);
        prepare_smem(attention_backward_dq_kernel<D>, smem, "attention_backward_dq_kernel");
        const dim3 grid((unsigned)s.n_q_heads, (unsigned)s.n_seqs, tiles);
        attention_backward_dq_kernel<D><<<grid, kThreads, smem, stream>>>(
            q, k, v, dout, lse, dsum, dq, cu_seqlens, s.n_q_heads, s.n_kv_heads, s.head_dim, scale,
            scale_log2);
        check_launch("attention_backward_dq_kernel launch");
    }
}

}  // namespace

int64_t attention_backward_workspace_floats(int64_t total_tokens, int n_q_heads, int n_kv_heads,
                                            int head_dim) {
    if (total_tokens <= 0 || n_q_heads <= 0 || n_kv_heads <= 0) return 0;
    const int64_t rows = total_tokens * n_q_heads;
    const int64_t group = n_q_heads / n_kv_heads;
    const int64_t slab = total_tokens * n_kv_heads * (int64_t)head_dim;
    // 2*(group-1) slabs at most, of which dq holds `group`.
    const int64_t extra = 2 * (group - 1) - group;
    return ((rows + 63) / 64) * 64 + (extra > 0 ? extra * slab : 0);
}

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                       const int32_t* cu_seqlens, int n_seqs, int max_seqlen, int64_t total_tokens,
                       int n_q_heads, int n_kv_heads, int head_dim, float scale, cudaStream_t stream) {
    const Shape s{n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim};
    if (!check_shape(s, cu_seqlens)) return;
    check_aligned(q, "q");
    check_aligned(k, "k");
    check_aligned(v, "v");
    check_aligned(out, "out");
    if (lse == nullptr) throw InvalidArgumentError("attention (cuda): lse is null");
    switch (tile_dim_for(head_dim)) {
        case 16: launch_forward<16>(q, k, v, out, lse, cu_seqlens, s, scale, stream); break;
        case 32: launch_forward<32>(q, k, v, out, lse, cu_seqlens, s, scale, stream); break;
        case 64: launch_forward<64>(q, k, v, out, lse, cu_seqlens, s, scale, stream); break;
        default: launch_forward<128>(q, k, v, out, lse, cu_seqlens, s, scale, stream); break;
    }
}

namespace detail {
void attention_backward_with_splits(const float* q, const float* k, const float* v,
                                    const float* out, const float* dout, const float* lse, float* dq,
                                    float* dk, float* dv, float* workspace,
                                    const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                                    int64_t total_tokens, int n_q_heads, int n_kv_heads,
                                    int head_dim, float scale, int kv_splits, cudaStream_t stream) {
    const Shape s{n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim};
    if (!check_shape(s, cu_seqlens)) return;
    check_aligned(q, "q");
    check_aligned(k, "k");
    check_aligned(v, "v");
    check_aligned(out, "out");
    check_aligned(dout, "dout");
    check_aligned(dq, "dq");
    check_aligned(dk, "dk");
    check_aligned(dv, "dv");
    check_aligned(workspace, "workspace");
    if (lse == nullptr) throw InvalidArgumentError("attention (cuda): lse is null");
    const int group = n_q_heads / n_kv_heads;
    if (kv_splits < 0 || kv_splits > group)
        throw InvalidArgumentError("attention (cuda): kv_splits must be in [0, " + std::to_string(group) +
                                    "], got " + std::to_string(kv_splits));
    const int splits = kv_splits == 0 ? choose_splits(s) : kv_splits;
    switch (tile_dim_for(head_dim)) {
        case 16: launch_backward<16>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale, splits, stream); break;
        case 32: launch_backward<32>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale, splits, stream); break;
        case 64: launch_backward<64>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale, splits, stream); break;
        default: launch_backward<128>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale, splits, stream); break;
    }
}
}  // namespace detail

void attention_backward(const float* q, const float* k, const float* v, const float* out,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv,
                        float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                        int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim,
                        float scale, cudaStream_t stream) {
    detail::attention_backward_with_splits(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens,
                                           n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads,
                                           head_dim, scale, 0, stream);
}

}  // namespace cudablocks::cuda
