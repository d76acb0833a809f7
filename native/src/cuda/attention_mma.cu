// Causal GQA attention over packed sequences on tensor cores (mma.sync bf16 / tf32), fp32 in and
// out. Contract: attention_mma.cuh. FlashAttention-2 structure, like the fp32 kernels of
// attention.cu, with warp-level mma.sync instead of FFMA:
//
//   forward   one block = one 64-query tile of HPB query heads of one GQA group (HPB = 2 when the
//             group size is even, else 1; 4 warps per head). Each warp owns 16 query rows of one
//             head: S (16x64) = Q K^T and O (16 x D) += P V in mma accumulators, online softmax
//             (exp2 domain) in registers; P never leaves registers (the m16n8 accumulator layout of
//             S is the A-operand layout of the P V product, see "Fragments"). The HPB heads share
//             every staged K/V tile.
//   backward  1) rowdot: D = rowsum(dout * out) -> workspace[0 .. T*n_q)
//             2) dkdv:   one block = one 64-key tile of one kv head; loops over the query heads of
//                        its GQA group (or a part of them, below) and the query tiles at or below the
//                        diagonal. Each warp owns 16 keys: S^T = K Q^T, P^T = exp2(S^T*scale*log2e -
//                        lse*log2e), dP^T = V dO^T, dV += P^T dO, dS^T = P^T (dP^T - D),
//                        dK += dS^T Q; dK, dV stay in registers. No atomics. When there are too few
//                        key tiles to fill the GPU (one long sequence), the group's heads are split
//                        over `splits` blocks that write partial dK/dV slabs (dq, not yet written,
//                        and the workspace hold them, as in attention.cu) ...
//             2b) reduce: ... which one small kernel adds in a fixed order (only when splits > 1).
//             3) dq:     one block = one 64-query tile of one query head: S, P, dP = dO V^T,
//                        dS = P (dP - D), dQ += dS K. A separate pass instead of fp32 atomics:
//                        deterministic results, no dq zeroing, at the price of recomputing S and dP.
//
// Staging: global fp32 tiles are read with 16-byte loads (__ldg), rounded to the operand type in
// registers (bf16: round to nearest even; tf32: cvt.rna) and stored to shared memory as "pairs"
// (two consecutive k-elements: a bf16x2 word, or two tf32 words), in one of two layouts:
//   rows  tile [64 rows][D/2 + 4 pairs]   (pairs along the head dim)        Q, K, V, dO
//   cols  tile [D][32 + 4 pairs]          (transposed: pairs along the rows) tf32 only: V (fwd),
//                                                                            K^T, Q^T, dO^T
// Operands that are k-major in memory (V in P V, K in dS K, dO in P^T dO, Q in dS^T Q) are read
// from the rows tile by ldmatrix.x4.trans for bf16; tf32 (no 32-bit ldmatrix transpose) stages a
// cols tile instead. The +4 pairs of padding make every fragment read conflict-free (word stride =
// 4 mod 32 for bf16 and ldmatrix rows; 8-byte stride = 4 mod 16 for tf32), and the transposed
// stores as well (lanes 0..15 take 16 consecutive row pairs, see stage_cols). With fp32 inputs the forward
// stages synchronously (load, convert, store, barrier): only the other resident block overlaps the
// latency. The backward stages with cp.async by default ("Staging modes" below, async_rows).
//
// Fragments (lane = 4*g + t). mma m16n8k16 bf16: A regs (row g | g+8) x (pair t | t+4) of a 16-wide
// k step, B regs (col g) x (pair t | t+4), C (row g | g+8) x (cols 2t, 2t+1). mma m16n8k8 tf32 uses
// the k order {2t -> k t, 2t+1 -> k t+4} inside each 8-wide k step (A and B agree, so the product is
// unchanged): every operand register pair is again one smem pair (row g, pair t), and the C layout
// of an 8-column block is the A layout of an 8-wide k step. So for both types a 16x64 accumulator
// becomes the A operand of the next product with conversions only (Op::a_from_c).
//
// Cost (causal, per query head, n tokens, pairs = n(n+1)/2; diagonal tiles computed in full):
//   forward 4*pairs*d FLOPs (2 tile products), backward 14*pairs*d (dkdv 4 products, dq 3).
//   Qwen3-4B heads (32 q / 8 kv, d 128) at 8 x 512 tokens, executed: forward 19.3 GFLOP, backward
//   67.6 GFLOP (the usual "useful" counts 2*n_q*d*sum(L^2) = 17.2 and 2.5x that = 42.9).
//
// Shared memory per block, D = 128 (bf16 / tf32 bytes): forward HPB=2 69,632 / 141,312 (HPB=1
// 52,224 / 106,496), dkdv 70,144 / 213,504 (bf16 with async staging 102,912), dq 69,632 / 176,128.
// Registers (sm_90a, ptxas): forward <= 128 (capped: 2 blocks of 8 warps per SM), dkdv ~252 / 255
// (2 blocks per SM for bf16, also with async staging; 1 for tf32 by shared memory), dq <= 168
// (capped: 3 bf16 blocks per SM, 1 tf32). Spills (ptxas, d 128): dkdv tf32 28 / 40 B (sync / async
// staging), dkdv bf16 0 / 8 B, dq bf16 16 / 0 B (sync, 168 registers / mode 2, 194).
//
// Staging modes of the backward (detail::set_attention_mma_async_staging; the same results bit for
// bit in every mode):
//   0  synchronous: four 16-byte loads in flight per thread, rounded in registers, stored.
//   1  (default) cp.async: every 16-byte chunk of a tile in flight at once, converted in shared
//      memory by the thread that copied it (no barrier between its wait and its conversion). tf32:
//      straight into the rows tiles, rounded in place; the transposed "cols" tiles are built from
//      them in shared memory (conflict-free 8x8 word-block transpose), and the next step's tiles are
//      prefetched once the products that read the rows tiles are done. bf16 dK/dV: through an fp32
//      landing tile [64][D] (+32 KB, still 2 blocks per SM), the next Q tile prefetched into it.
//   2  as 1, and the bf16 dQ pass through a landing tile too (2 blocks per SM instead of 3).
// On an H200 (2026-11-27) mode 1 took the tf32 backward from 1.75 to 1.23 ms at 8x512 (2.67 to 2.00
// ms at 1x2048) and the bf16 one from 0.571 to 0.542 ms; mode 2 was no better than 1.
//
// Measured with fp32 inputs (H200, 2026-11-28, CudaAttentionTiming.DISABLED_Qwen3Heads: Qwen3-4B
// heads 32/8, d 128, TFLOP/s counted on the useful 2*n_q*d*sum(L^2) forward and 2.5x that backward):
//   8 x 512   bf16 forward 0.136 ms (126 TFLOP/s), backward 0.536 ms (80); tf32 0.313 / 1.225 ms
//   1 x 2048  bf16 forward 0.185 ms (186 TFLOP/s), backward 0.826 ms (104); tf32 0.433 / 1.996 ms
// What limits them (Nsight Compute, same day, bf16 8x512): no unit is saturated. SM throughput
// 30-42%, L1/shared 57-65%, L2 34-41%, DRAM 19-25%: the kernels are latency-bound at low occupancy
// (registers allow 4 warps per scheduler in the forward, 3 in dq, 2 in dkdv, which also spills a
// little), and a block waits for its own tiles (no double buffering then; the bf16 I/O path below
// double-buffers and runs 1.3-1.6x faster). Fetching fragments with
// ldmatrix.x4 instead of 32-bit loads (a quarter of the load instructions) changed nothing
// measurable, so instruction issue is not the limit either.
// bf16 I/O (In = std::uint16_t; bf16 mode's blocks keep q, k, v, out and dout so): a tile is staged
// by copying 16-byte chunks (half the bytes, no conversion, no landing tiles), which makes double
// buffering affordable: the forward's K, V and the dK/dV pass's Q, dO (with the query rows' lse
// and D, 4-byte copies) are cp.async'ed into a second buffer while the current tile's products run; the dQ pass stages Q, dO once and double-buffers
// K, V. (H200, Qwen3-4B heads: bf16 I/O backward 0.367 ms at 8 x 512 with a synchronous dQ pass,
// 0.329 double-buffered; 1 x 2048 0.578 / 0.512; forward 0.102 and 0.147 ms.) Shared memory per
// block at D = 128: six bf16 tiles each (forward HPB=2 104,448 bytes, dK/dV 105,472, dQ 104,448):
// 2 blocks per SM. Prefetching lse and D also took the dK/dV pass's ptxas spills from 136 / 172
// bytes (stores / loads) to 36 / 72 at 255 registers. The forward writes out rounded once to bf16; the row dots read bf16 out
// and dout. The results are bit for bit those of the fp32-input kernels on the same values (the host
// emulation and CudaAttentionMmaBf16Inputs check it).
// At head_dim 128 on sm_90a, tf32 runs attention_wgmma.cu's kernels instead, and bf16 I/O those of
// attention_wgmma_bf16.cu (attention_forward_mma and launch_backward ask attention_wgmma_supported).
#include "cuda/attention_mma.cuh"
#include "cuda/attention_wgmma.cuh"
#include "cuda/attention_shared.cuh"
#include "cudablocks/errors.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/check.hpp"
#include "cuda/cp_async.cuh"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"
#include "cuda/to_bf16.cuh"
#ifndef CUDABLOCKS_ATTN_MMA_EMULATION  // the host emulation supplies its own
#include "cuda/mma_sync.cuh"
#endif

namespace cudablocks::cuda {
namespace {

constexpr int kTile = 64;     // query rows and key rows per tile
constexpr int kThreads = 128;  // 4 warps, 16 rows each
constexpr int kLdT = kTile / 2 + 4;  // pairs per row of a transposed ("cols") tile

template <int D>
constexpr int ld_rows() { return D / 2 + 4; }  // pairs per row of a "rows" tile

// The PTX primitives (ldmatrix.x4 with and without .trans; mma.sync and cvt.rna.tf32 in
// cuda/mma_sync.cuh, cp.async in cuda/cp_async.cuh). A host-side test harness that runs these kernels on emulated threads
// defines CUDABLOCKS_ATTN_MMA_EMULATION and supplies its own versions (with the host code left out).
#ifndef CUDABLOCKS_ATTN_MMA_EMULATION
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16; p: this lane's row address (shared memory).
__device__ __forceinline__ void ldsm_x4(const void* p, uint32_t r[4]) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(const void* p, uint32_t r[4]) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

#endif



// ---------------------------------------------------------------------------------------------
// Operand types. Pair = two consecutive k-elements in shared memory; KP = pairs per mma k step.

struct Bf16Op {
    using Pair = uint32_t;
    static constexpr int KP = 8;
    // B operands that are row-major in k (P V, dS K, P^T dO, dS^T Q) come from "rows" tiles through
    // ldmatrix.trans; no transposed tile is staged.
    static constexpr bool kTransFromRows = true;
    static __device__ __forceinline__ void store2(Pair* dst, const float4& x) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
    }
    // The fragments below come from ldmatrix.x4 (one instruction for four 8x8 blocks, a quarter of
    // the shared-memory load instructions of word loads). Lanes 8m..8m+7 give the row addresses of
    // block m, and lane 4g+t receives word (row g, pair t) of block m in register m, which is the
    // mma fragment layout. Rows are 16-byte aligned and ld = 4 mod 32 words: conflict-free.
    //
    // A fragment of rows row0..row0+15, k step ks, from a pair array with row stride ld: blocks
    // (rows 0-7, pairs 0-3), (rows 8-15, pairs 0-3), (rows 0-7, pairs 4-7), (rows 8-15, pairs 4-7).
    static __device__ __forceinline__ void load_a(const Pair* s, int ld, int row0, int ks, uint32_t a[4]) {
        const int lane = threadIdx.x & 31, m = lane >> 3;
        ldsm_x4(s + (row0 + (lane & 7) + 8 * (m & 1)) * ld + ks * KP + 4 * (m >> 1), a);
    }
    // B fragments of the n-blocks n0 and n0+8 (rows n0.. of the array), k step ks: blocks (rows
    // n0..+7, pairs 0-3), (n0..+7, pairs 4-7), (n0+8..+15, pairs 0-3), (n0+8..+15, pairs 4-7).
    static __device__ __forceinline__ void load_b2(const Pair* s, int ld, int n0, int ks, uint32_t b0[2],
                                                   uint32_t b1[2]) {
        const int lane = threadIdx.x & 31, m = lane >> 3;
        uint32_t r[4];
        ldsm_x4(s + (n0 + (lane & 7) + 8 * (m >> 1)) * ld + ks * KP + 4 * (m & 1), r);
        b0[0] = r[0];
        b0[1] = r[1];
        b1[0] = r[2];
        b1[1] = r[3];
    }
    // B fragments of the n-blocks n0 and n0+8 at k step ks, for B = R (k x n) held as a "rows"
    // tile R[k][n pairs] (row stride ld): ldmatrix.x4.trans of the 8x8 blocks (k 0-7, n0), (k 8-15,
    // n0), (k 0-7, n0+8), (k 8-15, n0+8); lanes 8m..8m+7 give the row addresses of block m.
    // Rows are 16-byte aligned and ld = 4 mod 32 words: conflict-free.
    static __device__ __forceinline__ void load_b_trans2(const Pair* R, int ld, int n0, int ks, uint32_t b0[2],
                                                         uint32_t b1[2]) {
        const int lane = threadIdx.x & 31;
        uint32_t r[4];
        ldsm_x4_trans(R + (ks * 16 + (lane & 15)) * ld + (n0 + 8 * (lane >> 4)) / 2, r);
        b0[0] = r[0];
        b0[1] = r[1];
        b1[0] = r[2];
        b1[1] = r[3];
    }
    // A fragment (k step ks over the 64 columns) from a 16x64 accumulator c[8][4].
    static __device__ __forceinline__ void a_from_c(const float (&c)[8][4], int ks, uint32_t a[4]) {
        a[0] = pack_bf16(c[2 * ks][0], c[2 * ks][1]);
        a[1] = pack_bf16(c[2 * ks][2], c[2 * ks][3]);
        a[2] = pack_bf16(c[2 * ks + 1][0], c[2 * ks + 1][1]);
        a[3] = pack_bf16(c[2 * ks + 1][2], c[2 * ks + 1][3]);
    }
    static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
        mma_bf16_16816(d, a, b);
    }
};

struct Tf32Op {
    using Pair = uint2;
    static constexpr int KP = 4;
    // ldmatrix has no 32-bit transpose: B operands that are row-major in k come from "cols" tiles.
    static constexpr bool kTransFromRows = false;
    static __device__ __forceinline__ Pair pack(float lo, float hi) { return make_uint2(to_tf32(lo), to_tf32(hi)); }
    static __device__ __forceinline__ void store2(Pair* dst, const float4& x) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(to_tf32(x.x), to_tf32(x.y), to_tf32(x.z), to_tf32(x.w));
    }
    static __device__ __forceinline__ void load_a(const Pair* s, int ld, int row0, int ks, uint32_t a[4]) {
        const int lane = threadIdx.x & 31;
        const Pair* p = s + (row0 + (lane >> 2)) * ld + ks * KP + (lane & 3);
        const uint2 lo = p[0], hi = p[8 * ld];
        a[0] = lo.x;  // (row g,   k t)   = element 2t
        a[1] = hi.x;  // (row g+8, k t)
        a[2] = lo.y;  // (row g,   k t+4) = element 2t+1
        a[3] = hi.y;
    }
    static __device__ __forceinline__ void load_b(const Pair* s, int ld, int n0, int ks, uint32_t b[2]) {
        const int lane = threadIdx.x & 31;
        const uint2 p = s[(n0 + (lane >> 2)) * ld + ks * KP + (lane & 3)];
        b[0] = p.x;
        b[1] = p.y;
    }
    static __device__ __forceinline__ void load_b2(const Pair* s, int ld, int n0, int ks, uint32_t b0[2],
                                                   uint32_t b1[2]) {
        load_b(s, ld, n0, ks, b0);
        load_b(s, ld, n0 + 8, ks, b1);
    }
    static __device__ __forceinline__ void a_from_c(const float (&c)[8][4], int ks, uint32_t a[4]) {
        a[0] = to_tf32(c[ks][0]);
        a[1] = to_tf32(c[ks][2]);
        a[2] = to_tf32(c[ks][1]);
        a[3] = to_tf32(c[ks][3]);
    }
    static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
        mma_tf32_1688(d, a, b);
    }
};

// ---------------------------------------------------------------------------------------------
// Staging (all 128 threads of the block). Rows >= rows_valid are zero-filled.

__device__ __forceinline__ float4 load_row4(const float* g, int64_t gstride, int r, int c, int rows_valid) {
    return r < rows_valid ? __ldg(reinterpret_cast<const float4*>(g + r * gstride + c))
                          : make_float4(0.f, 0.f, 0.f, 0.f);
}

// 64 x D fp32 rows at g (row stride gstride) -> "rows" tile s[64][ld_rows<D>()].
// Consecutive threads take consecutive 16-byte chunks of a row (coalesced; contiguous stores).
template <class Op, int D, int NT = kThreads>
__device__ __forceinline__ void stage_rows(typename Op::Pair* s, const float* g, int64_t gstride, int rows_valid) {
    constexpr int C4 = D / 4;
    constexpr int N = kTile * C4 / NT;  // 128 threads: 8 (D=64) or 16 (D=128)
    constexpr int LD = ld_rows<D>();
    static_assert(N % 4 == 0, "");
#pragma unroll 1
    for (int it0 = 0; it0 < N; it0 += 4) {
        float4 x[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int u = (it0 + j) * NT + threadIdx.x;
            x[j] = load_row4(g, gstride, u / C4, (u % C4) * 4, rows_valid);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int u = (it0 + j) * NT + threadIdx.x;
            Op::store2(s + (u / C4) * LD + (u % C4) * 2, x[j]);
        }
    }
}

// 64 x D bf16 rows at g (bit patterns, as bf16-mode blocks keep q, k, v) -> "rows" tile: a bf16
// rows tile holds a row's elements in order (pair p = elements 2p, 2p+1), so staging is a copy of
// 16-byte chunks (8 elements): half the bytes of the fp32 staging and no conversion. Bf16Op only.
template <class Op, int D, int NT = kThreads>
__device__ __forceinline__ void stage_rows(typename Op::Pair* s, const std::uint16_t* g, int64_t gstride,
                                           int rows_valid) {
    static_assert(Op::kTransFromRows, "bf16 inputs feed bf16 operands only");
    constexpr int C8 = D / 8;
    constexpr int N = kTile * C8 / NT;  // 128 threads: 4 (D=64) or 8 (D=128)
    constexpr int LD = ld_rows<D>();
    constexpr int B = N < 4 ? N : 4;    // loads in flight per thread
    static_assert(N % B == 0, "");
#pragma unroll 1
    for (int it0 = 0; it0 < N; it0 += B) {
        uint4 x[B];
#pragma unroll
        for (int j = 0; j < B; ++j) {
            const int u = (it0 + j) * NT + threadIdx.x;
            const int r = u / C8, c = u % C8;
            x[j] = r < rows_valid ? __ldg(reinterpret_cast<const uint4*>(g + r * gstride + c * 8))
                                  : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int j = 0; j < B; ++j) {
            const int u = (it0 + j) * NT + threadIdx.x;
            *reinterpret_cast<uint4*>(s + (u / C8) * LD + (u % C8) * 4) = x[j];
        }
    }
}

// The same copy with cp.async (every 16-byte chunk in flight at once; zero-filled past rows_valid),
// for double buffering: the caller commits the group and waits for it before a barrier.
template <int D, int NT>
__device__ __forceinline__ void async_rows_bf16(uint32_t* s, const std::uint16_t* g, int64_t gstride, int rows_valid) {
    constexpr int C8 = D / 8;
    constexpr int N = kTile * C8 / NT;
    constexpr int LD = ld_rows<D>();
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const int u = j * NT + threadIdx.x;
        const int r = u / C8, c = u % C8;
        const bool valid = r < rows_valid;
        cp_async16(s + r * LD + c * 4, valid ? g + r * gstride + c * 8 : g, valid);
    }
}

// Double-buffered K, V tiles of bf16 inputs (the forward, the dQ pass): buffer i holds K at kv + 2i
// tiles and V right after. Before key tile kt's products (after the barrier that ends tile kt-1's):
// issues tile kt+1 into the buffer tile kt-1 used when kt < last, waits for this thread's copies of
// tile kt, and returns its K (V follows one tile later). The caller's barrier publishes them.
template <int D, int NT>
__device__ __forceinline__ const uint32_t* kv_tile_bf16(uint32_t* kv, const std::uint16_t* k_head,
                                                        const std::uint16_t* v_head, int64_t kv_stride, int len,
                                                        int kt, int last) {
    constexpr int LD = ld_rows<D>();
    if (kt < last) {
        uint32_t* next = kv + ((kt + 1) & 1) * 2 * kTile * LD;
        const int k1 = (kt + 1) * kTile;
        async_rows_bf16<D, NT>(next, k_head + (int64_t)k1 * kv_stride, kv_stride, len - k1);
        async_rows_bf16<D, NT>(next + kTile * LD, v_head + (int64_t)k1 * kv_stride, kv_stride, len - k1);
        cp_async_commit();
        cp_async_wait_group<1>();
    } else {
        cp_async_wait_group<0>();
    }
    return kv + (kt & 1) * 2 * kTile * LD;
}

// 64 x D fp32 rows at g -> transposed "cols" tile s[D][kLdT]: pair p of row c holds elements
// (rows 2p, 2p+1; column c). A thread takes row pair rp and column chunk c4 (two float4 loads, four
// pair stores). Lanes 0..15 take 16 consecutive row pairs of one chunk, lanes 16..31 the next chunk:
// stores conflict-free (bf16 word address 16*c4 + 4*i + rp mod 32; tf32 per half-warp rp mod 16),
// global reads use whole 32-byte sectors.
template <class Op, int D, int NT = kThreads>
__device__ __forceinline__ void stage_cols(typename Op::Pair* s, const float* g, int64_t gstride, int rows_valid) {
    constexpr int C4 = D / 4;
    constexpr int N = (kTile / 2) * C4 / NT;  // 128 threads: 4 (D=64) or 8 (D=128)
    static_assert(N % 2 == 0, "");
#pragma unroll 1
    for (int it0 = 0; it0 < N; it0 += 2) {
        float4 x[2][2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int u = (it0 + j) * NT + threadIdx.x;
            const int rp = (u & 15) + 16 * ((u >> 5) & 1);
            const int c = (((u >> 4) & 1) + 2 * (u >> 6)) * 4;
            x[j][0] = load_row4(g, gstride, 2 * rp, c, rows_valid);
            x[j][1] = load_row4(g, gstride, 2 * rp + 1, c, rows_valid);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int u = (it0 + j) * NT + threadIdx.x;
            const int rp = (u & 15) + 16 * ((u >> 5) & 1);
            const int c = (((u >> 4) & 1) + 2 * (u >> 6)) * 4;
#pragma unroll
            for (int i = 0; i < 4; ++i)
                s[(c + i) * kLdT + rp] = Op::pack(f4_get(x[j][0], i), f4_get(x[j][1], i));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Asynchronous staging (backward, modes 1 and 2; see "Staging modes" at the top). A 64 x D fp32 tile is copied
// with cp.async into fp32 words (row stride ldw words): for tf32 straight into its "rows" tile (a
// tf32 rows tile is a padded fp32 copy: pair p = elements 2p, 2p+1), for bf16 into an fp32 landing
// buffer [64][D]. Every thread then converts exactly the chunks it copied itself (same u mapping in
// async_rows and convert_rows), so no barrier is needed between its cp_async_wait_all and the
// conversion, and the landing buffer is thread-private chunk by chunk.
template <int D>
__device__ __forceinline__ void async_rows(float* dst, int ldw, const float* g, int64_t gstride, int rows_valid) {
    constexpr int C4 = D / 4;
    constexpr int N = kTile * C4 / kThreads;
#pragma unroll 2  // no data registers; few live addresses next to the dK/dV accumulators
    for (int j = 0; j < N; ++j) {
        const int u = j * kThreads + threadIdx.x;
        const int r = u / C4, c = (u % C4) * 4;
        const bool valid = r < rows_valid;
        cp_async16(dst + r * ldw + c, valid ? g + r * gstride + c : g, valid);
    }
}

// This thread's chunks of an fp32 tile src (row stride ldw words) -> rows tile s, rounded to the
// operand type. In place (src == s as words, ldw = 2 * ld_rows) for tf32.
template <class Op, int D>
__device__ __forceinline__ void convert_rows(typename Op::Pair* s, const float* src, int ldw) {
    constexpr int C4 = D / 4;
    constexpr int N = kTile * C4 / kThreads;
    constexpr int LD = ld_rows<D>();
#pragma unroll 2
    for (int j = 0; j < N; ++j) {
        const int u = j * kThreads + threadIdx.x;
        const int r = u / C4, c4 = u % C4;
        const float4 x = *reinterpret_cast<const float4*>(src + r * ldw + c4 * 4);
        Op::store2(s + r * LD + c4 * 2, x);
    }
}

// tf32: "cols" tile (words Wc[c * 2kLdT + r]) from a rounded "rows" tile (words Wr[r * 2LD + c]),
// shared memory to shared memory (all 128 threads; barrier before and after is the caller's).
// A warp moves 8 x 8 word blocks in two rounds; lane (cc = l & 7, j = l >> 3) moves row
// j + 4 * ((cc >= 4) ^ round) of column cc. Both strides are 8 mod 32 words: reads hit banks
// 8 * row + cc, writes 8 * cc + row, distinct over the warp in each round (conflict-free).
template <int D>
__device__ __forceinline__ void transpose_rows_to_cols(uint2* cols, const uint2* rows) {
    constexpr int LDW_R = 2 * ld_rows<D>(), LDW_C = 2 * kLdT;
    const uint32_t* wr = reinterpret_cast<const uint32_t*>(rows);
    uint32_t* wc = reinterpret_cast<uint32_t*>(cols);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int cc = lane & 7, j = lane >> 3, hi = cc >= 4 ? 1 : 0;
    constexpr int NB = (kTile / 8) * (D / 8);  // 8 x 8 blocks
#pragma unroll 4
    for (int b = warp; b < NB; b += kThreads / 32) {
        const int r0 = (b % (kTile / 8)) * 8, c = (b / (kTile / 8)) * 8 + cc;
        const int ra = r0 + j + 4 * hi, rb = r0 + j + 4 * (1 - hi);
        const uint32_t xa = wr[ra * LDW_R + c], xb = wr[rb * LDW_R + c];
        wc[c * LDW_C + ra] = xa;
        wc[c * LDW_C + rb] = xb;
    }
}

// ---------------------------------------------------------------------------------------------
// Warp-level products.

// acc (16 x 64, C layout, acc[n-block][4]) += A[row0 .. row0+15][0..D) * B[0..64)[0..D)^T, both
// "rows" tiles.
template <class Op, int D>
__device__ __forceinline__ void warp_abT(const typename Op::Pair* A, int row0, const typename Op::Pair* B,
                                         float (&acc)[8][4]) {
    constexpr int LD = ld_rows<D>();
#pragma unroll
    for (int ks = 0; ks < D / 2 / Op::KP; ++ks) {
        uint32_t a[4];
        Op::load_a(A, LD, row0, ks, a);
#pragma unroll
        for (int nb = 0; nb < 8; nb += 2) {
            uint32_t b0[2], b1[2];
            Op::load_b2(B, LD, nb * 8, ks, b0, b1);
            Op::mma(acc[nb], a, b0);
            Op::mma(acc[nb + 1], a, b1);
        }
    }
}

// acc (16 x D) += P (16 x 64, accumulator registers) * B (64 x D). B is given as a "rows" tile
// B[64][ld_rows<D>()] when Op::kTransFromRows (bf16: ldmatrix.trans), else as a "cols" tile
// Bt[D][kLdT] (B transposed; tf32).
template <class Op, int D>
__device__ __forceinline__ void warp_pB(const float (&p)[8][4], const typename Op::Pair* B,
                                        float (&acc)[D / 8][4]) {
#pragma unroll
    for (int ks = 0; ks < kTile / 2 / Op::KP; ++ks) {
        uint32_t a[4];
        Op::a_from_c(p, ks, a);
        if constexpr (Op::kTransFromRows) {
#pragma unroll
            for (int nb = 0; nb < D / 8; nb += 2) {
                uint32_t b0[2], b1[2];
                Op::load_b_trans2(B, ld_rows<D>(), nb * 8, ks, b0, b1);
                Op::mma(acc[nb], a, b0);
                Op::mma(acc[nb + 1], a, b1);
            }
        } else {
#pragma unroll
            for (int nb = 0; nb < D / 8; ++nb) {
                uint32_t b[2];
                Op::load_b(B, kLdT, nb * 8, ks, b);
                Op::mma(acc[nb], a, b);
            }
        }
    }
}

// Stages a tile that is used only as the B operand of warp_pB: "rows" (bf16) or "cols" (tf32).
template <class Op, int D, int NT = kThreads>
__device__ __forceinline__ void stage_pb(typename Op::Pair* s, const float* g, int64_t gstride, int rows_valid) {
    if constexpr (Op::kTransFromRows) stage_rows<Op, D, NT>(s, g, gstride, rows_valid);
    else stage_cols<Op, D, NT>(s, g, gstride, rows_valid);
}

// Pairs of the extra transposed ("cols") tile that tf32 needs next to a "rows" tile also used
// as the B operand of warp_pB; bf16 reads that rows tile with ldmatrix.trans instead.
template <class Op, int D>
constexpr int cols_pairs() { return Op::kTransFromRows ? 0 : D * kLdT; }
// Pairs of a tile used only as the B operand of warp_pB.
template <class Op, int D>
constexpr int pb_pairs() { return Op::kTransFromRows ? kTile * ld_rows<D>() : D * kLdT; }


template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Store rows [row0, row0+16) of a 16 x D accumulator (times mul[h] for row half h) to global rows
// (dst + row*gstride), rows >= rows_valid dropped: fp32, or bf16 (bit patterns, rounded once).
template <int D, class Out>
__device__ __forceinline__ void store_acc(Out* dst, int64_t gstride, const float (&acc)[D / 8][4], int row0,
                                          int rows_valid, const float mul[2]) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = row0 + g + 8 * h;
        if (r >= rows_valid) continue;
        Out* p = dst + r * gstride + 2 * t;
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) store_pair(p + nb * 8, acc[nb][2 * h] * mul[h], acc[nb][2 * h + 1] * mul[h]);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid (n_q_heads / HPB, n_seqs, n_qtiles), 128 * HPB threads: HPB query heads of one GQA
// group share each staged K/V tile (half the K/V traffic per FLOP with HPB = 2); warp w computes
// rows (w%4)*16 .. +15 of head blockIdx.x*HPB + w/4. Shared: HPB Q tiles, K "rows", V (stage_pb).
// In: float, or std::uint16_t for bf16 q, k, v and out (Bf16Op; staged by copy, out rounded once).
template <class Op, int D, int HPB, class In = float>
__global__ void __launch_bounds__(kThreads * HPB, 4 / HPB)  // <= 128 registers: 16 warps per SM
attention_mma_forward_kernel(const In* __restrict__ q, const In* __restrict__ k,
                             const In* __restrict__ v, In* __restrict__ out, float* __restrict__ lse,
                             const int32_t* __restrict__ cu_seqlens, int n_q_heads, int n_kv_heads,
                             float scale_log2) {
    using Pair = typename Op::Pair;
    constexpr int LD = ld_rows<D>();
    constexpr int NT = kThreads * HPB;
    extern __shared__ uint4 smem_u4[];
    Pair* Qs = reinterpret_cast<Pair*>(smem_u4);  // [HPB][64][LD]
    Pair* Ks = Qs + HPB * kTile * LD;
    Pair* Vt = Ks + kTile * LD;  // V as the B operand of P V (stage_pb)
    // bf16 inputs: K, V double-buffered (buffer i: K at Ks + 2i tiles, V right after), the next
    // tile's copies in flight while this tile's products run.
    constexpr bool kPipe = std::is_same_v<In, std::uint16_t>;

    const int seq = blockIdx.y;
    const int start = cu_seqlens[seq];
    const int len = cu_seqlens[seq + 1] - start;
    const int n_tiles = (len + kTile - 1) / kTile;
    const int warp = threadIdx.x >> 5;
    const int h0 = blockIdx.x * HPB;
    const int h = h0 + warp / 4;     // this warp's query head
    const int wrow = (warp % 4) * 16;  // this warp's first row within the tile
    const int kvh = h0 / (n_q_heads / n_kv_heads);
    const int64_t q_stride = (int64_t)n_q_heads * D;
    const int64_t kv_stride = (int64_t)n_kv_heads * D;
    const Pair* Qw = Qs + (warp / 4) * kTile * LD;
    const In* k_head = k + (int64_t)start * kv_stride + (int64_t)kvh * D;
    const In* v_head = v + (int64_t)start * kv_stride + (int64_t)kvh * D;

    for (int qt = (int)gridDim.z - 1 - (int)blockIdx.z; qt < n_tiles; qt += gridDim.z) {
        const int q0 = qt * kTile;
        __syncthreads();  // a previous iteration's readers of shared memory are done
#pragma unroll
        for (int hh = 0; hh < HPB; ++hh)
            stage_rows<Op, D, NT>(Qs + hh * kTile * LD,
                                  q + (int64_t)(start + q0) * q_stride + (int64_t)(h0 + hh) * D, q_stride,
                                  len - q0);

        if constexpr (kPipe) {  // K, V of tile 0 into buffer 0
            async_rows_bf16<D, NT>(Ks, k_head, kv_stride, len);
            async_rows_bf16<D, NT>(Ks + kTile * LD, v_head, kv_stride, len);
            cp_async_commit();
        }

        float o[D / 8][4];
        zero(o);
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this thread's partial row sums

        for (int kt = 0; kt <= qt; ++kt) {
            const int k0 = kt * kTile;
            if (kt > 0) __syncthreads();  // everyone is done with K, V of the previous tile
            const Pair* Kc = Ks;
            const Pair* Vc = Vt;
            if constexpr (kPipe) {
                Kc = kv_tile_bf16<D, NT>(Ks, k_head, v_head, kv_stride, len, kt, qt);
                Vc = Kc + kTile * LD;
            } else {
                stage_rows<Op, D, NT>(Ks, k_head + (int64_t)k0 * kv_stride, kv_stride, len - k0);
                stage_pb<Op, D, NT>(Vt, v_head + (int64_t)k0 * kv_stride, kv_stride, len - k0);
            }
            __syncthreads();

            float s[8][4];
            zero(s);
            warp_abT<Op, D>(Qw, wrow, Kc, s);

            online_softmax_tile<D / 8>([&](int j, int c) -> float& { return s[j][c]; },
                                       [&](int nb, int c) -> float& { return o[nb][c]; }, m, l, wrow, kt == qt,
                                       scale_log2);
            warp_pB<Op, D>(s, Vc, o);
        }

        float inv[2];
        finish_rows(m, l, q0 + wrow, len, lse + (int64_t)start * n_q_heads + h, n_q_heads, inv);
        store_acc<D>(out + (int64_t)(start + q0) * q_stride + (int64_t)h * D, q_stride, o, wrow, len - q0, inv);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 1 is attention_rowdot_kernel (cuda/attention_shared.cuh).

// Backward 2: dK, dV of one 64-key tile of kv head blockIdx.x / splits, summed over query heads
// [h_begin, h_end) of its group (all of them when splits == 1; otherwise split 0 writes dk/dv and
// split s > 0 its slabs, which attention_reduce_kernel adds in split order: deterministic).
// Grid (n_kv_heads * splits, n_seqs, n_ktiles), 128 threads. Shared: K, V, Q, dO "rows"; (tf32) Q^T, dO^T
// "cols"; lse (log2 domain) and D of the current query tile.
// In as in the forward (bf16 q, k, v and dO: K, V staged once by copy, Q and dO double-buffered
// with cp.async; ASYNC false).
template <class Op, int D, bool ASYNC = false, class In = float>
__global__ void __launch_bounds__(kThreads)
attention_mma_dkdv_kernel(const In* __restrict__ q, const In* __restrict__ k, const In* __restrict__ v,
                          const In* __restrict__ dout, const float* __restrict__ lse,
                          const float* __restrict__ dsum, float* __restrict__ dk, float* __restrict__ dv,
                          Slabs slabs, const int32_t* __restrict__ cu_seqlens, int n_q_heads, int n_kv_heads,
                          int splits, float scale, float scale_log2) {
    using Pair = typename Op::Pair;
    static_assert(std::is_same_v<In, float> || (!ASYNC && Op::kTransFromRows), "bf16 inputs: Bf16Op, no landing tiles");
    constexpr int LD = ld_rows<D>();
    extern __shared__ uint4 smem_u4[];
    Pair* Ks = reinterpret_cast<Pair*>(smem_u4);
    Pair* Vs = Ks + kTile * LD;
    Pair* Qs = Vs + kTile * LD;
    Pair* dOs = Qs + kTile * LD;
    Pair* Qt = dOs + kTile * LD;             // tf32 only (cols); bf16 reads Qs with ldmatrix.trans
    Pair* dOt = Qt + cols_pairs<Op, D>();    // tf32 only
    float* lse_s = reinterpret_cast<float*>(dOt + cols_pairs<Op, D>());
    float* dsum_s = lse_s + kTile;
    // ASYNC, bf16: fp32 landing buffer [64][D] for cp.async (tf32 copies straight into its rows tiles).
    constexpr bool kLand = ASYNC && Op::kTransFromRows;
    float* land = dsum_s + kTile;
    // bf16 inputs: Q, dO and the query rows' lse and D double-buffered (the second set after
    // dsum_s), the next item's copies in flight during this item's products.
    constexpr bool kPipe = std::is_same_v<In, std::uint16_t>;
    Pair* Q2 = reinterpret_cast<Pair*>(dsum_s + kTile);
    Pair* dO2 = Q2 + kTile * LD;
    float* lse2 = reinterpret_cast<float*>(dO2 + kTile * LD);
    float* dsum2 = lse2 + kTile;

    const DkvBlock blk(cu_seqlens, n_q_heads, n_kv_heads, splits);
    const int kvh = blk.kvh, split = blk.split, start = blk.start, len = blk.len;
    const int h_begin = blk.h_begin, h_end = blk.h_end;
    const int n_tiles = (len + kTile - 1) / kTile;
    const int64_t q_stride = (int64_t)n_q_heads * D;
    const int64_t kv_stride = (int64_t)n_kv_heads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    // Copies lse and D of query rows q0 .. q0+63 of head hq into l, ds (threads < 64; rows past the
    // end zero-filled: their P is masked to 0 where it is formed).
    auto async_stats = [&](float* l, float* ds, int q0, int hq) {
        if (threadIdx.x < kTile) {
            const int i = threadIdx.x;
            const bool valid = q0 + i < len;
            const int64_t idx = valid ? (int64_t)(start + q0 + i) * n_q_heads + hq : 0;
            cp_async4(l + i, lse + idx, valid);
            cp_async4(ds + i, dsum + idx, valid);
        }
    };

    for (int kt = blockIdx.z; kt < n_tiles; kt += gridDim.z) {
        const int k0 = kt * kTile;
        const int64_t kv_off = (int64_t)(start + k0) * kv_stride + (int64_t)kvh * D;
        __syncthreads();  // a previous iteration's readers of shared memory are done
        if constexpr (kLand) {
            async_rows<D>(land, D, k + kv_off, kv_stride, len - k0);
            cp_async_wait_all();
            convert_rows<Op, D>(Ks, land, D);
            async_rows<D>(land, D, v + kv_off, kv_stride, len - k0);
            cp_async_wait_all();
            convert_rows<Op, D>(Vs, land, D);
        } else if constexpr (ASYNC) {  // tf32: waited for (and rounded) with item 0's Q, dO
            async_rows<D>(reinterpret_cast<float*>(Ks), 2 * LD, k + kv_off, kv_stride, len - k0);
            async_rows<D>(reinterpret_cast<float*>(Vs), 2 * LD, v + kv_off, kv_stride, len - k0);
        } else {
            stage_rows<Op, D>(Ks, k + kv_off, kv_stride, len - k0);
            stage_rows<Op, D>(Vs, v + kv_off, kv_stride, len - k0);
        }

        float dk_acc[D / 8][4], dv_acc[D / 8][4];
        zero(dk_acc);
        zero(dv_acc);

        const int n_qt = n_tiles - kt;  // query tiles kt .. n_tiles-1
        const int n_items = (h_end - h_begin) * n_qt;
        if constexpr (kPipe) {  // Q, dO, lse, D of item 0 into buffer 0
            const int64_t off0 = (int64_t)(start + k0) * q_stride + (int64_t)h_begin * D;
            async_rows_bf16<D, kThreads>(Qs, q + off0, q_stride, len - k0);
            async_rows_bf16<D, kThreads>(dOs, dout + off0, q_stride, len - k0);
            async_stats(lse_s, dsum_s, k0, h_begin);
            cp_async_commit();
        }
        if constexpr (kLand) {  // prefetch the first Q tile
            const int64_t off = (int64_t)(start + k0) * q_stride + (int64_t)h_begin * D;
            async_rows<D>(land, D, q + off, q_stride, len - k0);
        }
        for (int item = 0; item < n_items; ++item) {
            const int hq = h_begin + item / n_qt;
            const int q0 = (kt + item % n_qt) * kTile;
            const int64_t off = (int64_t)(start + q0) * q_stride + (int64_t)hq * D;
            if (item > 0) __syncthreads();  // everyone is done with the previous Q / dO tiles
            const Pair* Qc = Qs;    // this item's Q, dO, lse (log2 domain) and D
            const Pair* dOc = dOs;
            float* lse_c = lse_s;
            float* dsum_c = dsum_s;
            if constexpr (kPipe) {
                if (item + 1 < n_items) {  // the next item's set into the buffers the previous item used
                    const int hq1 = h_begin + (item + 1) / n_qt;
                    const int q1 = (kt + (item + 1) % n_qt) * kTile;
                    const int64_t off1 = (int64_t)(start + q1) * q_stride + (int64_t)hq1 * D;
                    async_rows_bf16<D, kThreads>((item & 1) ? Qs : Q2, q + off1, q_stride, len - q1);
                    async_rows_bf16<D, kThreads>((item & 1) ? dOs : dO2, dout + off1, q_stride, len - q1);
                    async_stats((item & 1) ? lse_s : lse2, (item & 1) ? dsum_s : dsum2, q1, hq1);
                    cp_async_commit();
                    cp_async_wait_group<1>();  // this item's set has landed (this thread's copies)
                } else {
                    cp_async_wait_group<0>();
                }
                Qc = (item & 1) ? Q2 : Qs;
                dOc = (item & 1) ? dO2 : dOs;
                lse_c = (item & 1) ? lse2 : lse_s;
                dsum_c = (item & 1) ? dsum2 : dsum_s;
            } else if constexpr (kLand) {
                cp_async_wait_all();  // Q of this item (prefetched during the previous item)
                convert_rows<Op, D>(Qs, land, D);
                async_rows<D>(land, D, dout + off, q_stride, len - q0);
                cp_async_wait_all();
                convert_rows<Op, D>(dOs, land, D);
                if (item + 1 < n_items) {  // prefetch the next item's Q, overlapping this item's products
                    const int hq1 = h_begin + (item + 1) / n_qt;
                    const int q1 = (kt + (item + 1) % n_qt) * kTile;
                    async_rows<D>(land, D, q + (int64_t)(start + q1) * q_stride + (int64_t)hq1 * D, q_stride,
                                  len - q1);
                }
            } else if constexpr (ASYNC) {
                // tf32. Item 0's Q, dO are issued here (with K, V in flight); later items' were issued
                // by the previous item once its Q, dO rows tiles were no longer read (below).
                if (item == 0) {
                    async_rows<D>(reinterpret_cast<float*>(Qs), 2 * LD, q + off, q_stride, len - q0);
                    async_rows<D>(reinterpret_cast<float*>(dOs), 2 * LD, dout + off, q_stride, len - q0);
                }
                cp_async_wait_all();
                if (item == 0) {
                    convert_rows<Op, D>(Ks, reinterpret_cast<const float*>(Ks), 2 * LD);
                    convert_rows<Op, D>(Vs, reinterpret_cast<const float*>(Vs), 2 * LD);
                }
                convert_rows<Op, D>(Qs, reinterpret_cast<const float*>(Qs), 2 * LD);
                convert_rows<Op, D>(dOs, reinterpret_cast<const float*>(dOs), 2 * LD);
                __syncthreads();  // rounded rows tiles complete
                if constexpr (!Op::kTransFromRows) {
                    transpose_rows_to_cols<D>(Qt, Qs);
                    transpose_rows_to_cols<D>(dOt, dOs);
                }
            } else {
                stage_rows<Op, D>(Qs, q + off, q_stride, len - q0);
                stage_rows<Op, D>(dOs, dout + off, q_stride, len - q0);
                if constexpr (!Op::kTransFromRows) {
                    stage_cols<Op, D>(Qt, q + off, q_stride, len - q0);
                    stage_cols<Op, D>(dOt, dout + off, q_stride, len - q0);
                }
            }
            if (threadIdx.x < kTile) {
                const int i = threadIdx.x;
                const bool valid = q0 + i < len;
                if constexpr (kPipe) {  // the copies this thread made, scaled in place
                    lse_c[i] = valid ? lse_c[i] * kLog2e : INFINITY;
                } else {
                    const int64_t idx = (int64_t)(start + q0 + i) * n_q_heads + hq;
                    lse_c[i] = valid ? lse[idx] * kLog2e : INFINITY;
                    dsum_c[i] = valid ? dsum[idx] : 0.f;
                }
            }
            __syncthreads();

            // P^T (16 keys of this warp x 64 queries)
            float pt[8][4];
            zero(pt);
            warp_abT<Op, D>(Ks, warp * 16, Qc, pt);
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int j = k0 + warp * 16 + g + 8 * (c >> 1);  // key (sequence position)
                    const int i = nb * 8 + 2 * t + (c & 1);           // query within the tile
                    const bool valid = q0 + i < len && j <= q0 + i;
                    pt[nb][c] = valid ? exp2f(pt[nb][c] * scale_log2 - lse_c[i]) : 0.f;
                }

            float dpt[8][4];
            zero(dpt);
            warp_abT<Op, D>(Vs, warp * 16, dOc, dpt);

            if constexpr (ASYNC && !Op::kTransFromRows) {
                // tf32: the rows tiles Qs, dOs are done with (the two products left read Q^T, dO^T):
                // prefetch the next item's Q, dO into them, overlapping dV += P^T dO and dK += dS^T Q.
                if (item + 1 < n_items) {
                    const int hq1 = h_begin + (item + 1) / n_qt;
                    const int q1 = (kt + (item + 1) % n_qt) * kTile;
                    const int64_t off1 = (int64_t)(start + q1) * q_stride + (int64_t)hq1 * D;
                    __syncthreads();  // every warp is done reading Qs, dOs
                    async_rows<D>(reinterpret_cast<float*>(Qs), 2 * LD, q + off1, q_stride, len - q1);
                    async_rows<D>(reinterpret_cast<float*>(dOs), 2 * LD, dout + off1, q_stride, len - q1);
                }
            }

            warp_pB<Op, D>(pt, Op::kTransFromRows ? dOc : dOt, dv_acc);  // dV += P^T dO

#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int i = nb * 8 + 2 * t + (c & 1);
                    dpt[nb][c] = pt[nb][c] * (dpt[nb][c] - dsum_c[i]);  // dS^T
                }
            warp_pB<Op, D>(dpt, Op::kTransFromRows ? Qc : Qt, dk_acc);  // dK += dS^T Q
        }

        float* dk_dst = split == 0 ? dk : slabs(2 * (split - 1));
        float* dv_dst = split == 0 ? dv : slabs(2 * (split - 1) + 1);
        const float one[2] = {1.f, 1.f}, sc[2] = {scale, scale};
        store_acc<D>(dk_dst + kv_off, kv_stride, dk_acc, warp * 16, len - k0, sc);
        store_acc<D>(dv_dst + kv_off, kv_stride, dv_acc, warp * 16, len - k0, one);
    }
}

// Backward 2b (only when splits > 1) is attention_reduce_kernel (cuda/attention_shared.cuh).

// Backward 3: dQ of one 64-query tile of query head blockIdx.x.
// Grid (n_q_heads, n_seqs, n_qtiles), 128 threads. Shared: Q, dO, K, V "rows"; (tf32) K^T "cols".
// Register cap: bf16 fits 3 blocks per SM in shared memory (<= 168 registers), tf32 at most 2.
// ASYNC: tf32: cp.async into the rows tiles, rounded in place, K^T transposed in shared memory from
// the rounded K rows instead of a second global read, the next K, V prefetched during dQ += dS K;
// bf16 (staging mode 2): through an fp32 landing tile, the next K prefetched. In = std::uint16_t
// (bf16 q, k, v, dO; ASYNC): tiles staged by copy, the K, V tiles double-buffered with cp.async as
// in the forward (2 blocks per SM).
template <class Op, int D, bool ASYNC = false, class In = float>
__global__ void __launch_bounds__(kThreads, Op::kTransFromRows && !ASYNC ? 3 : 2)
attention_mma_dq_kernel(const In* __restrict__ q, const In* __restrict__ k, const In* __restrict__ v,
                        const In* __restrict__ dout, const float* __restrict__ lse,
                        const float* __restrict__ dsum, float* __restrict__ dq,
                        const int32_t* __restrict__ cu_seqlens, int n_q_heads, int n_kv_heads, float scale,
                        float scale_log2) {
    using Pair = typename Op::Pair;
    static_assert(std::is_same_v<In, float> || (ASYNC && Op::kTransFromRows), "bf16 inputs: Bf16Op, ASYNC");
    constexpr bool kPipe = std::is_same_v<In, std::uint16_t>;  // K, V double-buffered
    constexpr int LD = ld_rows<D>();
    extern __shared__ uint4 smem_u4[];
    Pair* Qs = reinterpret_cast<Pair*>(smem_u4);
    Pair* dOs = Qs + kTile * LD;
    Pair* Ks = dOs + kTile * LD;
    Pair* Vs = Ks + kTile * LD;
    Pair* Kt = Vs + kTile * LD;  // tf32 only (cols); bf16 reads Ks with ldmatrix.trans
    constexpr bool kAsync = ASYNC && !Op::kTransFromRows;
    // ASYNC, bf16: fp32 landing tile [64][D] after Vs (bf16 has no Kt); the next K tile is prefetched
    // into it during the current products. 2 blocks per SM instead of 3.
    constexpr bool kLand = ASYNC && Op::kTransFromRows && !kPipe;
    float* land = reinterpret_cast<float*>(Vs + kTile * LD);

    const int h = blockIdx.x;
    const int seq = blockIdx.y;
    const int start = cu_seqlens[seq];
    const int len = cu_seqlens[seq + 1] - start;
    const int n_tiles = (len + kTile - 1) / kTile;
    const int kvh = h / (n_q_heads / n_kv_heads);
    const int64_t q_stride = (int64_t)n_q_heads * D;
    const int64_t kv_stride = (int64_t)n_kv_heads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const In* k_head = k + (int64_t)start * kv_stride + (int64_t)kvh * D;
    const In* v_head = v + (int64_t)start * kv_stride + (int64_t)kvh * D;

    for (int qt = (int)gridDim.z - 1 - (int)blockIdx.z; qt < n_tiles; qt += gridDim.z) {
        const int q0 = qt * kTile;
        const int64_t q_off = (int64_t)(start + q0) * q_stride + (int64_t)h * D;
        __syncthreads();  // a previous iteration's readers of shared memory are done
        if constexpr (kPipe) {  // Q, dO and K, V of key tile 0 (buffer 0) in one group
            async_rows_bf16<D, kThreads>(Qs, q + q_off, q_stride, len - q0);
            async_rows_bf16<D, kThreads>(dOs, dout + q_off, q_stride, len - q0);
            async_rows_bf16<D, kThreads>(Ks, k_head, kv_stride, len);
            async_rows_bf16<D, kThreads>(Vs, v_head, kv_stride, len);
            cp_async_commit();
        } else if constexpr (kAsync) {  // waited for (and rounded) with the first K, V tiles
            async_rows<D>(reinterpret_cast<float*>(Qs), 2 * LD, q + q_off, q_stride, len - q0);
            async_rows<D>(reinterpret_cast<float*>(dOs), 2 * LD, dout + q_off, q_stride, len - q0);
        } else if constexpr (kLand) {
            async_rows<D>(land, D, q + q_off, q_stride, len - q0);
            cp_async_wait_all();
            convert_rows<Op, D>(Qs, land, D);
            async_rows<D>(land, D, dout + q_off, q_stride, len - q0);
            cp_async_wait_all();
            convert_rows<Op, D>(dOs, land, D);
            async_rows<D>(land, D, k_head, kv_stride, len);  // K of key tile 0
        } else {
            stage_rows<Op, D>(Qs, q + q_off, q_stride, len - q0);
            stage_rows<Op, D>(dOs, dout + q_off, q_stride, len - q0);
        }

        float lse2[2], dsv[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = q0 + warp * 16 + g + 8 * hh;
            const int64_t idx = (int64_t)(start + r) * n_q_heads + h;
            lse2[hh] = r < len ? lse[idx] * kLog2e : INFINITY;  // rows past the end: P = 0
            dsv[hh] = r < len ? dsum[idx] : 0.f;
        }

        float dq_acc[D / 8][4];
        zero(dq_acc);

        for (int kt = 0; kt <= qt; ++kt) {
            const int k0 = kt * kTile;
            if (kt > 0) __syncthreads();  // everyone is done with K, V, K^T of the previous tile
            const Pair* Kc = Ks;  // this tile's K, V
            const Pair* Vc = Vs;
            if constexpr (kPipe) {
                Kc = kv_tile_bf16<D, kThreads>(Ks, k_head, v_head, kv_stride, len, kt, qt);
                Vc = Kc + kTile * LD;
            } else if constexpr (kAsync) {
                if (kt == 0) {  // later K, V tiles were prefetched by the previous iteration (below)
                    async_rows<D>(reinterpret_cast<float*>(Ks), 2 * LD, k_head, kv_stride, len);
                    async_rows<D>(reinterpret_cast<float*>(Vs), 2 * LD, v_head, kv_stride, len);
                }
                cp_async_wait_all();
                if (kt == 0) {
                    convert_rows<Op, D>(Qs, reinterpret_cast<const float*>(Qs), 2 * LD);
                    convert_rows<Op, D>(dOs, reinterpret_cast<const float*>(dOs), 2 * LD);
                }
                convert_rows<Op, D>(Ks, reinterpret_cast<const float*>(Ks), 2 * LD);
                convert_rows<Op, D>(Vs, reinterpret_cast<const float*>(Vs), 2 * LD);
                __syncthreads();  // rounded K complete
                transpose_rows_to_cols<D>(reinterpret_cast<uint2*>(Kt), reinterpret_cast<const uint2*>(Ks));
            } else if constexpr (kLand) {
                cp_async_wait_all();  // K of this tile (prefetched)
                convert_rows<Op, D>(Ks, land, D);
                async_rows<D>(land, D, v_head + (int64_t)k0 * kv_stride, kv_stride, len - k0);
                cp_async_wait_all();
                convert_rows<Op, D>(Vs, land, D);
                if (kt < qt)  // prefetch the next K tile, overlapping this tile's products
                    async_rows<D>(land, D, k_head + (int64_t)(k0 + kTile) * kv_stride, kv_stride, len - k0 - kTile);
            } else {
                stage_rows<Op, D>(Ks, k_head + (int64_t)k0 * kv_stride, kv_stride, len - k0);
                if constexpr (!Op::kTransFromRows)
                    stage_cols<Op, D>(Kt, k_head + (int64_t)k0 * kv_stride, kv_stride, len - k0);
                stage_rows<Op, D>(Vs, v_head + (int64_t)k0 * kv_stride, kv_stride, len - k0);
            }
            __syncthreads();

            float s[8][4];
            zero(s);
            warp_abT<Op, D>(Qs, warp * 16, Kc, s);
            const bool diag = kt == qt;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int row = warp * 16 + g + 8 * (c >> 1);
                    const int key = nb * 8 + 2 * t + (c & 1);
                    const bool valid = !diag || key <= row;
                    s[nb][c] = valid ? exp2f(s[nb][c] * scale_log2 - lse2[c >> 1]) : 0.f;
                }

            float dp[8][4];
            zero(dp);
            warp_abT<Op, D>(dOs, warp * 16, Vc, dp);
            if constexpr (kAsync) {
                // The rows tiles Ks, Vs are done with (dQ += dS K reads K^T): prefetch the next K, V
                // tiles into them, overlapping the last product.
                if (kt < qt) {
                    const int k1 = k0 + kTile;
                    __syncthreads();  // every warp is done reading Ks, Vs
                    async_rows<D>(reinterpret_cast<float*>(Ks), 2 * LD, k_head + (int64_t)k1 * kv_stride, kv_stride,
                                  len - k1);
                    async_rows<D>(reinterpret_cast<float*>(Vs), 2 * LD, v_head + (int64_t)k1 * kv_stride, kv_stride,
                                  len - k1);
                }
            }
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int c = 0; c < 4; ++c) dp[nb][c] = s[nb][c] * (dp[nb][c] - dsv[c >> 1]);  // dS

            warp_pB<Op, D>(dp, Op::kTransFromRows ? Kc : Kt, dq_acc);  // dQ += dS K
        }

        const float sc[2] = {scale, scale};
        store_acc<D>(dq + q_off, q_stride, dq_acc, warp * 16, len - q0, sc);
    }
}

#ifdef CUDABLOCKS_ATTN_MMA_EMULATION
}  // namespace
#else
// ---------------------------------------------------------------------------------------------
// Host side.

template <class Op>
constexpr size_t pair_bytes() { return sizeof(typename Op::Pair); }

template <class Op, int D, int HPB, class In = float>
size_t forward_smem() {
    const int buffers = std::is_same_v<In, std::uint16_t> ? 2 : 1;  // bf16 inputs: double-buffered K, V
    return pair_bytes<Op>() * (size_t)(HPB * kTile * ld_rows<D>() + buffers * (kTile * ld_rows<D>() + pb_pairs<Op, D>()));
}
template <class Op, int D, bool ASYNC = false, class In = float>
size_t dkdv_smem() {
    // bf16 inputs: Q, dO, lse and D double-buffered
    const int tiles = std::is_same_v<In, std::uint16_t> ? 6 : 4, stats = std::is_same_v<In, std::uint16_t> ? 4 : 2;
    return pair_bytes<Op>() * (size_t)(tiles * kTile * ld_rows<D>() + 2 * cols_pairs<Op, D>()) +
           stats * kTile * sizeof(float) + (ASYNC && Op::kTransFromRows ? (size_t)kTile * D * sizeof(float) : 0);
}
template <class Op, int D, bool ASYNC = false, class In = float>
size_t dq_smem() {
    if constexpr (std::is_same_v<In, std::uint16_t>)  // Q, dO, two K, V buffers
        return pair_bytes<Op>() * (size_t)(6 * kTile * ld_rows<D>());
    return pair_bytes<Op>() * (size_t)(4 * kTile * ld_rows<D>() + cols_pairs<Op, D>()) +
           (ASYNC && Op::kTransFromRows ? (size_t)kTile * D * sizeof(float) : 0);
}

struct Shape {
    int n_seqs, max_seqlen;
    int64_t total_tokens;
    int n_q_heads, n_kv_heads, head_dim;
};

[[noreturn]] void fail(const std::string& msg) { throw InvalidArgumentError("attention (cuda, mma): " + msg); }

void check_aligned(const void* p, const char* name) {
    if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 != 0)
        fail(std::string(name) + " must be a non-null, 16-byte aligned device pointer");
}
// The pointer checks of the forward and the backward entry points (fp32 and bf16 tensors alike).
void check_forward_args(const void* q, const void* k, const void* v, const void* out, const float* lse) {
    for (const auto& [p, name] : {std::pair<const void*, const char*>{q, "q"}, {k, "k"}, {v, "v"}, {out, "out"}})
        check_aligned(p, name);
    if (lse == nullptr) fail("lse is null");
}
void check_backward_args(const void* q, const void* k, const void* v, const void* out, const void* dout,
                         const float* lse, const float* dq, const float* dk, const float* dv, const float* workspace) {
    check_forward_args(q, k, v, out, lse);
    for (const auto& [p, name] : {std::pair<const void*, const char*>{dout, "dout"}, {dq, "dq"}, {dk, "dk"},
                                  {dv, "dv"}, {workspace, "workspace"}})
        check_aligned(p, name);
}

// Validates the host-visible arguments. Returns false when there is nothing to compute.
bool check_shape(const Shape& s, const int32_t* cu_seqlens) {
    if (s.n_seqs < 0) fail("n_seqs must be >= 0, got " + std::to_string(s.n_seqs));
    if (s.total_tokens < 0) fail("total_tokens must be >= 0");
    if (s.n_q_heads <= 0 || s.n_kv_heads <= 0 || s.n_q_heads % s.n_kv_heads != 0)
        fail("n_q_heads (" + std::to_string(s.n_q_heads) + ") must be a positive multiple of n_kv_heads (" +
             std::to_string(s.n_kv_heads) + ")");
    if (s.head_dim != 64 && s.head_dim != 128) fail("head_dim must be 64 or 128, got " + std::to_string(s.head_dim));
    if (s.n_seqs > 65535) fail("at most 65535 sequences per call, got " + std::to_string(s.n_seqs));
    if (s.total_tokens > INT32_MAX) fail("total_tokens must fit in int32 (cu_seqlens is int32)");
    if (s.n_q_heads > 65535) fail("at most 65535 query heads");
    if (s.n_seqs == 0 || s.total_tokens == 0) return false;
    if (cu_seqlens == nullptr) fail("cu_seqlens is null");
    return true;
}

unsigned tiles_for(const Shape& s) {
    int64_t m = s.max_seqlen < 1 ? 1 : s.max_seqlen;
    if (m > s.total_tokens) m = s.total_tokens;
    const int64_t t = (m + kTile - 1) / kTile;
    return (unsigned)(t > 65535 ? 65535 : t);
}

// Whether this GPU gives a block enough shared memory for the tensor-core kernels of (Op, D); when
// not (tf32 at D = 128 on A100: the backward needs 213 KB), the fp32 kernels run instead.
template <class Op, int D, class In = float>
bool mma_fits_forward(const Shape& s) {
    const bool hpb2 = (s.n_q_heads / s.n_kv_heads) % 2 == 0;
    return (hpb2 ? forward_smem<Op, D, 2, In>() : forward_smem<Op, D, 1, In>()) <= shared_memory_optin();
}
template <class Op, int D, bool ASYNC, bool DQ_ASYNC, class In = float>
bool mma_fits_backward() {
    return std::max(dkdv_smem<Op, D, ASYNC, In>(), dq_smem<Op, D, DQ_ASYNC, In>()) <= shared_memory_optin();
}

template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes) {
    require_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes, "attention (cuda, mma):");
}

template <class Op, int D, int HPB, class In>
void launch_forward_hpb(const In* q, const In* k, const In* v, In* out, float* lse,
                        const int32_t* cu_seqlens, const Shape& s, float scale, cudaStream_t stream) {
    const size_t smem = forward_smem<Op, D, HPB, In>();
    prepare_smem(attention_mma_forward_kernel<Op, D, HPB, In>, smem);
    const dim3 grid((unsigned)(s.n_q_heads / HPB), (unsigned)s.n_seqs, tiles_for(s));
    attention_mma_forward_kernel<Op, D, HPB, In><<<grid, kThreads * HPB, smem, stream>>>(
        q, k, v, out, lse, cu_seqlens, s.n_q_heads, s.n_kv_heads, scale * kLog2e);
    CUDABLOCKS_CHECK_LAUNCH("attention_mma_forward_kernel");
}

// Two query heads per block when the GQA group allows it (they share the kv head), else one.
template <class Op, int D, class In>
void launch_forward(const In* q, const In* k, const In* v, In* out, float* lse,
                    const int32_t* cu_seqlens, const Shape& s, float scale, cudaStream_t stream) {
    if ((s.n_q_heads / s.n_kv_heads) % 2 == 0)
        launch_forward_hpb<Op, D, 2>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
    else
        launch_forward_hpb<Op, D, 1>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
}

// Number of blocks the query heads of a GQA group are split over in the dK/dV pass (as in
// attention.cu): one block per (kv head, key tile) sums the whole group, but when there are few
// key tiles per resident block slot (one long sequence: 1 x 2048 gives 256 blocks for 264 slots,
// the busiest walking 4 heads x 32 query tiles, twice the average) the busiest block dominates.
// Pick the smallest divisor of the group for which the busiest block carries no more than ~1.25x
// the average work per resident block, estimated as if every sequence were max_seqlen long.
template <typename Kernel>
int choose_splits(Kernel kernel, size_t smem, const Shape& s) {
    const int group = s.n_q_heads / s.n_kv_heads;
    if (group == 1) return 1;
    const int sms = multiprocessor_count();
    const int per_sm = max_active_blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads, smem);
    const double slots = (double)(sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
    const double nt = (double)tiles_for(s);
    const double seqs = std::max(1.0, (double)s.total_tokens / (nt * kTile));
    const double items_per_slot = s.n_q_heads * seqs * nt * (nt + 1) / 2 / slots;
    for (int sp = 1; sp < group; ++sp)
        if (group % sp == 0 && (double)(group / sp) * nt <= 1.25 * items_per_slot) return sp;
    return group;
}

// Staging mode of the backward (see the top of the file): 0, 1 (the default) or 2; -1 (initial) =
// from the environment variable CUDABLOCKS_ATTN_MMA_ASYNC ("0", "1" or "2").
std::atomic<int> g_async_mode{-1};

int staging_mode() {
    int m = g_async_mode.load(std::memory_order_relaxed);
    if (m < 0) {
        const char* e = std::getenv("CUDABLOCKS_ATTN_MMA_ASYNC");
        // Default 1: on an H200 (2026-11-27) cp.async staging took the tf32 backward from 1.75 to
        // 1.23 ms at 8x512 (2.67 -> 2.00 ms at 1x2048) and bf16 from 0.571 to 0.542 ms; mode 2
        // measured no better than 1.
        m = (e != nullptr && e[0] >= '0' && e[0] <= '2' && e[1] == '\0') ? e[0] - '0' : 1;
        g_async_mode.store(m, std::memory_order_relaxed);
    }
    return m;
}

template <class Op, int D, bool ASYNC, bool DQ_ASYNC, class In>
void launch_backward(const In* q, const In* k, const In* v, const In* out, const In* dout,
                     const float* lse, float* dq, float* dk, float* dv, float* workspace,
                     const int32_t* cu_seqlens, const Shape& s, float scale, int kv_splits,
                     cudaStream_t stream) {
    const int64_t rows = s.total_tokens * s.n_q_heads;
    float* dsum = workspace;
    const float scale_log2 = scale * kLog2e;
    const unsigned tiles = tiles_for(s);
    const int group = s.n_q_heads / s.n_kv_heads;
    const Slabs slabs{dq, workspace + ((rows + 63) / 64) * 64, group, s.total_tokens * s.n_kv_heads * D};
    const size_t dkdv_bytes = dkdv_smem<Op, D, ASYNC, In>();
    prepare_smem(attention_mma_dkdv_kernel<Op, D, ASYNC, In>, dkdv_bytes);
    const int splits =
        kv_splits > 0 ? kv_splits : choose_splits(attention_mma_dkdv_kernel<Op, D, ASYNC, In>, dkdv_bytes, s);
    {
        const int warps_per_block = 256 / 32;
        int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
        if (blocks > 65535 * 8) blocks = 65535 * 8;
        attention_rowdot_kernel<<<(unsigned)blocks, 256, 0, stream>>>(out, dout, dsum, rows, D);
        CUDABLOCKS_CHECK_LAUNCH("attention_rowdot_kernel");
    }
    // The wgmma kernels: tf32 on fp32 inputs, bf16 on bf16 inputs (head_dim 128).
    constexpr bool kWgmmaTf32 = !Op::kTransFromRows && D == 128 && std::is_same_v<In, float>;
    constexpr bool kWgmmaBf16 = Op::kTransFromRows && D == 128 && std::is_same_v<In, std::uint16_t>;
    bool wgmma = false;
    if constexpr (kWgmmaTf32 || kWgmmaBf16) {
        wgmma = attention_wgmma_supported(D, s.n_q_heads, s.n_kv_heads);
        if (wgmma) {
            if constexpr (kWgmmaTf32)
                attention_dkdv_wgmma_tf32(q, k, v, dout, lse, dsum, dk, dv, slabs.first, slabs.rest, slabs.n_first,
                                          slabs.size, cu_seqlens, s.n_seqs, tiles, s.n_q_heads, s.n_kv_heads, splits,
                                          scale, stream);
            else
                attention_dkdv_wgmma_bf16(q, k, v, dout, lse, dsum, dk, dv, slabs.first, slabs.rest, slabs.n_first,
                                          slabs.size, cu_seqlens, s.n_seqs, tiles, s.n_q_heads, s.n_kv_heads, splits,
                                          scale, stream);
        }
    }
    if (!wgmma) {
        const dim3 grid((unsigned)(s.n_kv_heads * splits), (unsigned)s.n_seqs, tiles);
        attention_mma_dkdv_kernel<Op, D, ASYNC, In><<<grid, kThreads, dkdv_bytes, stream>>>(
            q, k, v, dout, lse, dsum, dk, dv, slabs, cu_seqlens, s.n_q_heads, s.n_kv_heads, splits, scale,
            scale_log2);
        CUDABLOCKS_CHECK_LAUNCH("attention_mma_dkdv_kernel");
    }
    if (splits > 1) {
        int64_t blocks = (slabs.size / 4 + 255) / 256;
        if (blocks > 65535 * 8) blocks = 65535 * 8;
        attention_reduce_kernel<<<(unsigned)blocks, 256, 0, stream>>>(dk, dv, slabs, splits);
        CUDABLOCKS_CHECK_LAUNCH("attention_reduce_kernel");
    }
    if constexpr (kWgmmaTf32 || kWgmmaBf16) {
        if (wgmma) {
            if constexpr (kWgmmaTf32)
                attention_dq_wgmma_tf32(q, k, v, dout, lse, dsum, dq, cu_seqlens, s.n_seqs, tiles, s.n_q_heads,
                                        s.n_kv_heads, scale, stream);
            else
                attention_dq_wgmma_bf16(q, k, v, dout, lse, dsum, dq, cu_seqlens, s.n_seqs, tiles, s.n_q_heads,
                                        s.n_kv_heads, scale, stream);
            return;
        }
    }
    {
        const size_t smem = dq_smem<Op, D, DQ_ASYNC, In>();
        prepare_smem(attention_mma_dq_kernel<Op, D, DQ_ASYNC, In>, smem);
        const dim3 grid((unsigned)s.n_q_heads, (unsigned)s.n_seqs, tiles);
        attention_mma_dq_kernel<Op, D, DQ_ASYNC, In><<<grid, kThreads, smem, stream>>>(
            q, k, v, dout, lse, dsum, dq, cu_seqlens, s.n_q_heads, s.n_kv_heads, scale, scale_log2);
        CUDABLOCKS_CHECK_LAUNCH("attention_mma_dq_kernel");
    }
}

// Runs the backward on tensor cores (async staging when switched on and it fits, else synchronous);
// false when neither variant fits this GPU's shared memory (the caller runs the fp32 kernels).
template <class Op, int D>
bool try_backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
                  const float* lse, float* dq, float* dk, float* dv, float* workspace, const int32_t* cu_seqlens,
                  const Shape& s, float scale, int kv_splits, cudaStream_t stream) {
    constexpr bool kTf32 = !Op::kTransFromRows;
    const int mode = staging_mode();
    if (mode == 2 && mma_fits_backward<Op, D, true, true>()) {
        launch_backward<Op, D, true, true>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                           kv_splits, stream);
        return true;
    }
    if (mode >= 1 && mma_fits_backward<Op, D, true, kTf32>()) {
        launch_backward<Op, D, true, kTf32>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                            kv_splits, stream);
        return true;
    }
    if (!mma_fits_backward<Op, D, false, false>()) return false;
    launch_backward<Op, D, false, false>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                         kv_splits, stream);
    return true;
}

}  // namespace

bool attention_mma_supported(int head_dim, Precision precision) {
    return precision != Precision::FP32 && (head_dim == 64 || head_dim == 128);
}

void attention_forward_mma(const float* q, const float* k, const float* v, float* out, float* lse,
                           const int32_t* cu_seqlens, int n_seqs, int max_seqlen, int64_t total_tokens,
                           int n_q_heads, int n_kv_heads, int head_dim, float scale, Precision precision,
                           cudaStream_t stream) {
    if (!attention_mma_supported(head_dim, precision)) {
        attention_forward(q, k, v, out, lse, cu_seqlens, n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads,
                          head_dim, scale, stream);
        return;
    }
    const Shape s{n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim};
    if (!check_shape(s, cu_seqlens)) return;
    check_forward_args(q, k, v, out, lse);
    const bool bf16 = precision == Precision::BF16;
    if (!bf16 && attention_wgmma_supported(head_dim, n_q_heads, n_kv_heads)) {
        attention_forward_wgmma_tf32(q, k, v, out, lse, cu_seqlens, n_seqs, tiles_for(s), n_q_heads, n_kv_heads,
                                     scale, stream);
        return;
    }
    const bool fits = head_dim == 128 ? (bf16 ? mma_fits_forward<Bf16Op, 128>(s) : mma_fits_forward<Tf32Op, 128>(s))
                                      : (bf16 ? mma_fits_forward<Bf16Op, 64>(s) : mma_fits_forward<Tf32Op, 64>(s));
    if (!fits) {
        attention_forward(q, k, v, out, lse, cu_seqlens, n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads,
                          head_dim, scale, stream);
        return;
    }
    if (head_dim == 128) {
        if (bf16) launch_forward<Bf16Op, 128>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
        else launch_forward<Tf32Op, 128>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
    } else {
        if (bf16) launch_forward<Bf16Op, 64>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
        else launch_forward<Tf32Op, 64>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
    }
}

// ---- bf16 q, k, v, out, dout (bf16 mode's blocks keep them so) ----

namespace {

// fp32 copies of the bf16 tensors in per-stream scratch, for the head dims without tensor-core
// kernels: q, k, v and out (the forward's fp32 out lands there), and dout for the backward (given
// dout16; else no room is taken for it).
struct Widened {
    ScratchLease scratch;
    float *q, *k, *v, *out, *dout;
    Widened(const std::uint16_t* q16, const std::uint16_t* k16, const std::uint16_t* v16, const std::uint16_t* out16,
            const std::uint16_t* dout16, const Shape& s, cudaStream_t stream)
        : scratch(sizeof(float) * (size_t)(s.total_tokens *
                                           ((dout16 != nullptr ? 3 : 2) * s.n_q_heads + 2 * s.n_kv_heads) *
                                           s.head_dim),
                  stream) {
        const int64_t nq = s.total_tokens * s.n_q_heads * s.head_dim, nkv = s.total_tokens * s.n_kv_heads * s.head_dim;
        q = scratch.get<float>();
        k = q + nq;
        v = k + nkv;
        out = v + nkv;
        dout = dout16 != nullptr ? out + nq : nullptr;
        from_bf16(q16, q, nq, stream);
        from_bf16(k16, k, nkv, stream);
        from_bf16(v16, v, nkv, stream);
        if (out16 != nullptr) from_bf16(out16, out, nq, stream);
        if (dout16 != nullptr) from_bf16(dout16, dout, nq, stream);
    }
};

// The bf16 I/O kernels: the forward, the dK/dV pass and the dQ pass (all double-buffered).
template <int D>
bool bf16_io_fits(const Shape& s) {
    using U = std::uint16_t;
    return mma_fits_forward<Bf16Op, D, U>(s) && mma_fits_backward<Bf16Op, D, false, true, U>();
}

}  // namespace

void attention_forward_mma(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v, std::uint16_t* out,
                           float* lse, const int32_t* cu_seqlens, int n_seqs, int max_seqlen, int64_t total_tokens,
                           int n_q_heads, int n_kv_heads, int head_dim, float scale, cudaStream_t stream) {
    const Shape s{n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim};
    const bool mma = attention_mma_supported(head_dim, Precision::BF16);
    if (mma && !check_shape(s, cu_seqlens)) return;
    if (!mma || !(head_dim == 128 ? bf16_io_fits<128>(s) : bf16_io_fits<64>(s))) {
        const Widened w(q, k, v, nullptr, nullptr, s, stream);
        attention_forward_mma(w.q, w.k, w.v, w.out, lse, cu_seqlens, n_seqs, max_seqlen, total_tokens, n_q_heads,
                              n_kv_heads, head_dim, scale, Precision::BF16, stream);
        to_bf16(w.out, out, total_tokens * n_q_heads * head_dim, stream);
        return;
    }
    check_forward_args(q, k, v, out, lse);
    if (attention_wgmma_supported(head_dim, n_q_heads, n_kv_heads)) {
        attention_forward_wgmma_bf16(q, k, v, out, lse, cu_seqlens, n_seqs, tiles_for(s), n_q_heads, n_kv_heads, scale,
                                     stream);
        return;
    }
    if (head_dim == 128) launch_forward<Bf16Op, 128>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
    else launch_forward<Bf16Op, 64>(q, k, v, out, lse, cu_seqlens, s, scale, stream);
}

void attention_backward_mma(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                            const std::uint16_t* out, const std::uint16_t* dout, const float* lse, float* dq, float* dk,
                            float* dv, float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                            int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim, float scale,
                            cudaStream_t stream) {
    const Shape s{n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim};
    const bool mma = attention_mma_supported(head_dim, Precision::BF16);
    if (mma && !check_shape(s, cu_seqlens)) return;
    if (!mma || !(head_dim == 128 ? bf16_io_fits<128>(s) : bf16_io_fits<64>(s))) {
        const Widened w(q, k, v, out, dout, s, stream);
        attention_backward_mma(w.q, w.k, w.v, w.out, w.dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs, max_seqlen,
                               total_tokens, n_q_heads, n_kv_heads, head_dim, scale, Precision::BF16, stream);
        return;
    }
    check_backward_args(q, k, v, out, dout, lse, dq, dk, dv, workspace);
    // The bf16 tiles are copies (half the bytes, no conversion, no landing tiles), double-buffered
    // with cp.async: the dK/dV pass's Q, dO and the dQ pass's K, V (DQ_ASYNC).
    if (head_dim == 128)
        launch_backward<Bf16Op, 128, false, true>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                                  0, stream);
    else
        launch_backward<Bf16Op, 64, false, true>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                                 0, stream);
}

namespace detail {
void set_attention_mma_async_staging(int mode) { g_async_mode.store(mode < 0 ? -1 : mode > 2 ? 2 : mode); }

void attention_backward_mma_with_splits(const float* q, const float* k, const float* v, const float* out,
                                        const float* dout, const float* lse, float* dq, float* dk, float* dv,
                                        float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                                        int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim,
                                        float scale, Precision precision, int kv_splits, cudaStream_t stream) {
    if (!attention_mma_supported(head_dim, precision)) {
        attention_backward(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs, max_seqlen,
                           total_tokens, n_q_heads, n_kv_heads, head_dim, scale, stream);
        return;
    }
    const Shape s{n_seqs, max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim};
    if (!check_shape(s, cu_seqlens)) return;
    check_backward_args(q, k, v, out, dout, lse, dq, dk, dv, workspace);
    const int group = n_q_heads / n_kv_heads;
    if (kv_splits < 0 || kv_splits > group)
        fail("kv_splits must be in [0, " + std::to_string(group) + "], got " + std::to_string(kv_splits));
    const bool bf16 = precision == Precision::BF16;
    const bool ran =
        head_dim == 128
            ? (bf16 ? try_backward<Bf16Op, 128>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                                kv_splits, stream)
                    : try_backward<Tf32Op, 128>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                                kv_splits, stream))
            : (bf16 ? try_backward<Bf16Op, 64>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                               kv_splits, stream)
                    : try_backward<Tf32Op, 64>(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, s, scale,
                                               kv_splits, stream));
    if (!ran) {
        detail::attention_backward_with_splits(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs,
                                               max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim, scale,
                                               kv_splits, stream);
        return;
    }
}
}  // namespace detail

void attention_backward_mma(const float* q, const float* k, const float* v, const float* out,
                            const float* dout, const float* lse, float* dq, float* dk, float* dv,
                            float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                            int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim, float scale,
                            Precision precision, cudaStream_t stream) {
    detail::attention_backward_mma_with_splits(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs,
                                               max_seqlen, total_tokens, n_q_heads, n_kv_heads, head_dim, scale,
                                               precision, 0, stream);
}

#endif  // CUDABLOCKS_ATTN_MMA_EMULATION

}  // namespace cudablocks::cuda
