// Causal GQA attention on wgmma (sm_90a), tf32, head_dim 128: the forward, the backward's dK/dV
// pass and its dQ pass. Contract: attention_wgmma.cuh.
//
// Why: tf32 on mma.sync (attention_mma.cu) runs at a quarter of its bf16 rate there (half the
// instruction rate, plus transposed tiles built by the threads); wgmma's tf32 rate is half of its
// bf16 one, and a warpgroup issues 64-row products that read B straight from shared memory.
//
// Forward: one block = one 64-query tile of two query heads of a GQA group (256 threads, warpgroup
// w owns head 2 * blockIdx.x + w); both share every staged K/V tile. Per 64-key tile, warpgroup w:
//   S  [64 x 64]  = Q K^T          wgmma m64n64k8, A = Q and B = K from shared memory
//   online softmax on S in registers (exp2 domain), P = exp2(S - m) kept in registers
//   O [64 x 128] += P V            wgmma m64n128k8, A = P from registers, B = V^T from shared memory
// Diagonal tiles are computed in full and masked; tiles right of the diagonal are skipped. The
// backward's passes (their kernels below say how they split the work) recompute P from lse:
//   dK/dV  S^T = K Q^T, dP^T = V dO^T; dV += P^T dO, dK += dS^T Q   (64 keys per block, 32-query items)
//   dQ     S = Q K^T, dP = dO V^T; dQ += dS K                      (64 queries per block, 32-key tiles)
// with dS = P (dP - D), D = rowsum(dO * O) from attention_mma.cu's row-dot kernel.
//
// Layouts. wgmma's tf32 operands in shared memory are K-major (no transposed form): Q, K, V, dO
// as [rows][d] tiles, and the threads build V^T, K^T, Q^T, dO^T [d][rows] while staging. A
// K-major tile of R rows x 128 values is 4 column chunks of R x 32 values (128-byte rows), in the
// 128-byte swizzle (16-byte unit u of row r stored at u ^ (r % 8); chunks 1 KB aligned); a k-step
// (8 values) starts 32 bytes further along the row, the next chunk R * 128 bytes further. A
// transposed tile [128][64] is 2 chunks, [128][32] one. The accumulator registers of P (dS) hold
// columns 2t and 2t + 1 of each 8-column block, where the A fragment wants k = t and t + 4; so the
// transposed tiles store row 8i + 2j at column 8i + j and row 8i + 2j + 1 at 8i + 4 + j (vt_col):
// the product over each 8-wide step is unchanged. Operands are rounded to tf32 (cvt.rna) as they
// are staged, P and dS as they become A fragments.
//
// Forward pipeline (one block per SM: 193 KB of shared memory): K and V^T are double-buffered.
// While tile kt's products run, every thread loads its share of tile kt + 1 from global memory into
// registers (issued after the S product, stored after the P V product is issued), rounds it to
// tf32 and stores it into the other buffer; one barrier per tile.
//
// Cost per query head (n tokens, pairs = n(n+1)/2, diagonal tiles in full): forward 4 * pairs *
// 128 FLOPs, backward 14 * pairs * 128 (dK/dV 4 products, dQ 3).
//
// Measured (H200, 2026-11-28, CudaAttentionTiming, Qwen3-4B heads 32/8; TFLOP/s on the useful
// 2 * n_q * d * sum(L^2) forward, 2.5x that backward), against the mma.sync kernels:
//   8 x 512   forward 0.201 ms (86 TFLOP/s; mma.sync 0.318), backward 0.791 ms (54; 1.224)
//   1 x 2048  forward 0.275 ms (125; 0.436), backward 1.241 ms (69; 1.995)
// Forming P while dP's products run and issuing dV before dS is formed (both backward passes) then
// took the backward from 0.800 to 0.791 ms at 8 x 512 and from 1.249 to 1.237 ms at 1 x 2048 (one
// run, same day).
// In the profiler (a block's step, 8 x 512 / 1 x 2048) the dK/dV pass took 0.52 / 0.81 ms and the
// dQ pass 0.29 / 0.42 (mma.sync 0.70 / 1.15 and 0.57 / 0.84). The forward's and the dQ
// pass's results equalled the mma.sync kernels' bit for bit (the same products summed in the same
// order), dK and dV within 1.1e-6 relative (warpgroup 1's items are summed apart). Still far from
// wgmma's tf32 rate: one block per SM; in the forward and the dQ pass the two warpgroups run the
// same phases in lockstep (a barrier per tile), so the tensor cores idle during the softmax and
// the staging stores, and each block's first tiles are staged synchronously. Staging by a
// producer warp (rounding and transposing included) with the two warpgroups in ping-pong, as the
// dK/dV pass's independent warpgroups begin to do, is the next step.
#include "cuda/attention_wgmma.cuh"
#include "cuda/attention_shared.cuh"
#include "cuda/attention_wgmma_shared.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "cuda/cp_async.cuh"
#ifndef CUDABLOCKS_ATTN_MMA_EMULATION  // the host emulation (tests/emu) supplies its own primitives
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/mma_sync.cuh"
#include "cuda/wgmma.cuh"
#endif

namespace cudablocks::cuda {

namespace {

constexpr int kTileBytes = kTile * kD * 4;  // a Q or K tile, and V^T: 32 KB each
constexpr int kOffK = 2 * kTileBytes;        // after the two heads' Q tiles
constexpr int kOffVt = kOffK + 2 * kTileBytes;
constexpr int kSmemBytes = kOffVt + 2 * kTileBytes + 1024;  // + 1 KB to align the tiles

// The dQ pass (see attention_wgmma_dq_kernel): Q and dO of both heads, K and V of two 32-key
// stages, K^T of two stages.
constexpr int kKvBytes = kKeys * kD * 4;     // a K, V or K^T tile of the dQ pass: 16 KB
constexpr int kDqOffKv = 4 * kTileBytes;     // stage s: K at + 2 s kKvBytes, V after it
constexpr int kDqOffKt = kDqOffKv + 4 * kKvBytes;
constexpr int kDqSmemBytes = kDqOffKt + 2 * kKvBytes + 1024;  // 225 KB

// The dK/dV pass (see attention_wgmma_dkdv_kernel): K and V of the block's 64 keys, then for each
// warpgroup the stage of its 32-query item (Q, dO, Q^T, dO^T) and the item's lse and D.
constexpr int kDkvOffStage = 2 * kTileBytes;
constexpr int kDkvStageBytes = 4 * kKvBytes;
constexpr int kDkvOffStats = kDkvOffStage + 2 * kDkvStageBytes;
constexpr int kDkvSmemBytes = kDkvOffStats + 2 * 2 * kKeys * 4 + 1024;  // 193 KB

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kPerThread = kTile * kD / 4 / kThreads;  // float4 of a 64 x 128 tile per thread: 8

// Byte offset of element (r, c) in a K-major tile of `rows` rows in the 128-byte swizzle.
__device__ __forceinline__ std::uint32_t swz(int rows, int r, int c) {
  return static_cast<std::uint32_t>((c >> 5) * rows * 128 + r * 128 + ((((c >> 2) & 7) ^ (r & 7)) << 4) + (c & 3) * 4);
}

// V^T's column for key j of the tile (see the top of the file).
__device__ __forceinline__ int vt_col(int j) { return (j & ~7) | ((j & 7) >> 1) | ((j & 1) << 2); }

// Columns 8j .. 8j + 7 of an accumulator (acc[4j + c], the mma order), rounded to tf32, as k-step
// j's A fragment: {(g, 2t), (g + 8, 2t), (g, 2t + 1), (g + 8, 2t + 1)} at k = t, t, t + 4, t + 4, so
// the B tile's rows follow vt_col's order.
template <int S>
__device__ __forceinline__ void tf32_fragments(std::uint32_t (&a)[S][4], const float (&acc)[4 * S]) {
#pragma unroll
  for (int j = 0; j < S; ++j) {
    a[j][0] = to_tf32(acc[4 * j]);
    a[j][1] = to_tf32(acc[4 * j + 2]);
    a[j][2] = to_tf32(acc[4 * j + 1]);
    a[j][3] = to_tf32(acc[4 * j + 3]);
  }
}

__device__ __forceinline__ uint4 tf32x4(const float4& x) {
  return make_uint4(to_tf32(x.x), to_tf32(x.y), to_tf32(x.z), to_tf32(x.w));
}

// This thread's share of rows [0, 64) of a [*, stride] fp32 matrix's 128 columns at src (rows at
// or past `valid` read as zeros): float4 i of the tile is row i / 32, columns 4 (i % 32).. for K/Q
// (a warp reads one row), and key i % 64, columns 4 (i / 64).. for V (a warp reads 32 keys).
__device__ __forceinline__ void load_rows(float4 (&x)[kPerThread], const float* src, std::int64_t stride, int valid) {
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads, r = i >> 5, c4 = i & 31;
    x[u] = r < valid ? __ldg(reinterpret_cast<const float4*>(src + r * stride) + c4) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}
__device__ __forceinline__ void load_keys(float4 (&x)[kPerThread], const float* src, std::int64_t stride, int valid) {
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads, r = i & 63, c4 = i >> 6;
    x[u] = r < valid ? __ldg(reinterpret_cast<const float4*>(src + r * stride) + c4) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}
// ... rounded to tf32 into a K-major tile (load_rows' share) or into V^T (load_keys' share).
__device__ __forceinline__ void store_rows(unsigned char* tile, const float4 (&x)[kPerThread]) {
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads, r = i >> 5, c4 = i & 31;
    *reinterpret_cast<uint4*>(tile + swz(kTile, r, 4 * c4)) = tf32x4(x[u]);
  }
}
__device__ __forceinline__ void store_vt(unsigned char* vt, const float4 (&x)[kPerThread]) {
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads, key = i & 63, d0 = 4 * (i >> 6), col = vt_col(key);
    const uint4 y = tf32x4(x[u]);
    *reinterpret_cast<std::uint32_t*>(vt + swz(kD, d0, col)) = y.x;
    *reinterpret_cast<std::uint32_t*>(vt + swz(kD, d0 + 1, col)) = y.y;
    *reinterpret_cast<std::uint32_t*>(vt + swz(kD, d0 + 2, col)) = y.z;
    *reinterpret_cast<std::uint32_t*>(vt + swz(kD, d0 + 3, col)) = y.w;
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Grid (n_q_heads / 2, n_seqs, q_tiles), 256 threads, kSmemBytes of dynamic shared memory.
__global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma_forward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                   const float* __restrict__ v, float* __restrict__ out, float* __restrict__ lse,
                                   const std::int32_t* __restrict__ cu_seqlens, int n_q_heads, int n_kv_heads,
                                   float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* const smem = aligned_smem();
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));

  const HeadPairBlock blk(cu_seqlens, n_q_heads, n_kv_heads);
  const int start = blk.start, len = blk.len, h0 = blk.h0;
  const std::int64_t q_stride = blk.q_stride, kv_stride = blk.kv_stride;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3;
  const int h = h0 + wg;  // this warpgroup's query head
  const float* k_head = blk.kv_head(k);
  const float* v_head = blk.kv_head(v);
  const std::uint32_t q_tile = base + wg * kTileBytes;
  auto k_tile = [&](int b) { return base + kOffK + b * kTileBytes; };
  auto vt_tile = [&](int b) { return base + kOffVt + b * kTileBytes; };

  // No barrier before the staging: the previous tile's last key tile ended with one.
  for (int qt = static_cast<int>(gridDim.z) - 1 - static_cast<int>(blockIdx.z); qt < blk.n_tiles;
       qt += gridDim.z) {
    const int q0 = qt * kTile;
    {
      float4 x[kPerThread];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        load_rows(x, q + static_cast<std::int64_t>(start + q0) * q_stride + (h0 + hh) * kD, q_stride, len - q0);
        store_rows(smem + hh * kTileBytes, x);
      }
      load_rows(x, k_head, kv_stride, len);
      store_rows(smem + kOffK, x);
      load_keys(x, v_head, kv_stride, len);
      store_vt(smem + kOffVt, x);
    }
    fence_proxy_async();
    __syncthreads();

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this thread's partial row sums

    for (int kt = 0; kt <= qt; ++kt) {
      const int b = kt & 1;
      const bool more = kt < qt;
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      fence_operands(s);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 8; ++ks) {
        const std::uint32_t at = (ks >> 2) * kTile * 128 + (ks & 3) * 32;
        wgmma_ss_tf32(s, smem_desc(q_tile + at), smem_desc(k_tile(b) + at));
      }
      wgmma_commit();
      // Tile kt + 1 into registers while the products run.
      float4 kx[kPerThread], vx[kPerThread];
      if (more) {
        const int k1 = (kt + 1) * kTile;
        load_rows(kx, k_head + static_cast<std::int64_t>(k1) * kv_stride, kv_stride, len - k1);
        load_keys(vx, v_head + static_cast<std::int64_t>(k1) * kv_stride, kv_stride, len - k1);
      }
      wgmma_wait<0>();
      fence_operands(s);

      // s[4j + c], o[4nb + c]: the mma accumulator order online_softmax_tile takes.
      online_softmax_tile<16>([&](int j, int c) -> float& { return s[4 * j + c]; },
                              [&](int nb, int c) -> float& { return o[4 * nb + c]; }, m, l, warp * 16, kt == qt,
                              scale_log2);

      // P as the A operand: k-step j covers keys 8j .. 8j + 7 in vt_col's order.
      std::uint32_t a[8][4];
      tf32_fragments(a, s);
      fence_operands(o);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        wgmma_rs_tf32(o, a[j], smem_desc(vt_tile(b) + (j >> 2) * kD * 128 + (j & 3) * 32));
      }
      wgmma_commit();
      if (more) {
        store_rows(smem + kOffK + (b ^ 1) * kTileBytes, kx);
        store_vt(smem + kOffVt + (b ^ 1) * kTileBytes, vx);
      }
      wgmma_wait<0>();
      fence_operands(o);
      hold(a);
      fence_proxy_async();
      __syncthreads();  // tile kt + 1 is staged; nobody reads buffer b any more
    }

    float inv[2];
    finish_rows(m, l, q0 + warp * 16, len, lse + static_cast<std::int64_t>(start) * n_q_heads + h, n_q_heads, inv);
    store_tile_rows(out + static_cast<std::int64_t>(start + q0) * q_stride + h * kD, q_stride, o, warp * 16, len - q0,
                    inv);
  }
#else
  __trap();  // launched only where attention_wgmma_supported (an sm_90a build on a 9.0 device)
#endif
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kDqOffDo = 2 * kTileBytes;                 // dO tiles after the two heads' Q tiles

// The chunks of a 32-row tile (K or V of the dQ pass, Q or dO of the dK/dV pass) that thread `th`
// of the NT sharing it copies: chunk i is row i % 32, columns 4 (i / 32).. (a warp takes 32 rows of
// one column group, so that its transposed stores hit 32 banks). By cp.async into a K-major tile,
// raw fp32, rows at or past `valid` (>= 1) zero-filled ...
template <int NT>
__device__ __forceinline__ void copy_rows32(unsigned char* tile, const float* src, std::int64_t stride, int valid,
                                            int th) {
#pragma unroll
  for (int u = 0; u < kKeys * kD / 4 / NT; ++u) {
    const int i = th + u * NT, r = i & (kKeys - 1), c4 = i / kKeys;
    cp_async16(tile + swz(kKeys, r, 4 * c4), src + static_cast<std::int64_t>(r < valid ? r : 0) * stride + 4 * c4,
               r < valid);
  }
}
// ... once landed: rounded to tf32 in place by the same thread (no barrier in between) and, when
// `tt` is given, transposed into tt [128 head dims][32 rows] (columns in vt_col's order).
template <int NT>
__device__ __forceinline__ void round_rows32(unsigned char* tile, unsigned char* tt, int th) {
#pragma unroll
  for (int u = 0; u < kKeys * kD / 4 / NT; ++u) {
    const int i = th + u * NT, r = i & (kKeys - 1), c4 = i / kKeys;
    uint4* p = reinterpret_cast<uint4*>(tile + swz(kKeys, r, 4 * c4));
    const uint4 y = tf32x4(*reinterpret_cast<const float4*>(p));
    *p = y;
    if (tt != nullptr) {
      const int col = vt_col(r);
      *reinterpret_cast<std::uint32_t*>(tt + swz(kD, 4 * c4, col)) = y.x;
      *reinterpret_cast<std::uint32_t*>(tt + swz(kD, 4 * c4 + 1, col)) = y.y;
      *reinterpret_cast<std::uint32_t*>(tt + swz(kD, 4 * c4 + 2, col)) = y.z;
      *reinterpret_cast<std::uint32_t*>(tt + swz(kD, 4 * c4 + 3, col)) = y.w;
    }
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The backward's dQ pass: dQ = scale * dS K with dS = P (dP - D), P = exp(S * scale - lse),
// S = Q K^T, dP = dO V^T; D = rowsum(dO * O) comes from attention_rowdot_kernel. Grid
// (n_q_heads / 2, n_seqs, q_tiles), 256 threads, kDqSmemBytes of dynamic shared memory. A block
// takes a 64-query tile of two query heads (warpgroup w: head 2 blockIdx.x + w; Q and dO staged
// once, rounded) and walks its causal 32-key tiles: S and dP by wgmma m64n32k8 from shared memory,
// P and dS in registers, dQ += dS K by wgmma m64n128k8 with dS from registers and K^T from shared
// memory. K and V come by cp.async into the stage the previous tile freed, one tile ahead; each
// thread rounds the chunks it copied in place and writes their K^T entries, so one barrier per
// tile suffices (K^T is double-buffered as well: the other warpgroup may still be reading the
// previous tile's).
__global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma_dq_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                              const float* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ dsum, float* __restrict__ dq,
                              const std::int32_t* __restrict__ cu_seqlens, int n_q_heads, int n_kv_heads, float scale,
                              float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* const smem = aligned_smem();
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));

  const HeadPairBlock blk(cu_seqlens, n_q_heads, n_kv_heads);
  const int start = blk.start, len = blk.len, h0 = blk.h0;
  const std::int64_t q_stride = blk.q_stride, kv_stride = blk.kv_stride;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2;
  const int h = h0 + wg;
  const float* k_head = blk.kv_head(k);
  const float* v_head = blk.kv_head(v);
  auto k_tile = [&](int b) { return smem + kDqOffKv + 2 * b * kKvBytes; };
  auto v_tile = [&](int b) { return smem + kDqOffKv + (2 * b + 1) * kKvBytes; };
  auto kt_tile = [&](int b) { return smem + kDqOffKt + b * kKvBytes; };
  auto addr = [&](const unsigned char* p) { return base + static_cast<std::uint32_t>(p - smem); };
  const std::uint32_t q_tile = base + wg * kTileBytes, do_tile = base + kDqOffDo + wg * kTileBytes;

  for (int qt = static_cast<int>(gridDim.z) - 1 - static_cast<int>(blockIdx.z); qt < blk.n_tiles;
       qt += gridDim.z) {
    const int q0 = qt * kTile;
    const std::int64_t q_off = static_cast<std::int64_t>(start + q0) * q_stride;
    __syncthreads();  // a previous tile's readers of shared memory are done
    copy_rows32<kThreads>(k_tile(0), k_head, kv_stride, len, tid);
    copy_rows32<kThreads>(v_tile(0), v_head, kv_stride, len, tid);
    cp_async_commit();
    {
      float4 x[kPerThread];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        load_rows(x, q + q_off + (h0 + hh) * kD, q_stride, len - q0);
        store_rows(smem + hh * kTileBytes, x);
        load_rows(x, dout + q_off + (h0 + hh) * kD, q_stride, len - q0);
        store_rows(smem + kDqOffDo + hh * kTileBytes, x);
      }
    }
    float lse2[2], dsv[2];
    const std::int64_t head_rows = static_cast<std::int64_t>(start) * n_q_heads + h;
    dq_row_stats(lse + head_rows, dsum + head_rows, n_q_heads, q0 + warp * 16 + g, len, lse2, dsv);
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;

    // Key tiles at or left of the diagonal that hold keys of the sequence.
    const int n_kt = min(2 * qt + 2, (len + kKeys - 1) / kKeys);
    for (int kt = 0; kt < n_kt; ++kt) {
      const int b = kt & 1;
      cp_async_wait_group<0>();
      round_rows32<kThreads>(k_tile(b), kt_tile(b), tid);
      round_rows32<kThreads>(v_tile(b), nullptr, tid);
      fence_proxy_async();
      __syncthreads();  // tile kt complete in stage b and K^T b; stage 1 - b is free
      if (kt + 1 < n_kt) {
        const int k1 = (kt + 1) * kKeys;
        copy_rows32<kThreads>(k_tile(b ^ 1), k_head + static_cast<std::int64_t>(k1) * kv_stride, kv_stride,
                              len - k1, tid);
        copy_rows32<kThreads>(v_tile(b ^ 1), v_head + static_cast<std::int64_t>(k1) * kv_stride, kv_stride,
                              len - k1, tid);
      }
      cp_async_commit();

      float s[16], dp[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) s[i] = dp[i] = 0.f;
      fence_operands(s);
      fence_operands(dp);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 8; ++ks) {
        const std::uint32_t at64 = (ks >> 2) * kTile * 128 + (ks & 3) * 32;
        const std::uint32_t at32 = (ks >> 2) * kKeys * 128 + (ks & 3) * 32;
        wgmma_ss_tf32(s, smem_desc(q_tile + at64), smem_desc(addr(k_tile(b)) + at32));
      }
      wgmma_commit();
#pragma unroll
      for (int ks = 0; ks < kD / 8; ++ks) {
        const std::uint32_t at64 = (ks >> 2) * kTile * 128 + (ks & 3) * 32;
        const std::uint32_t at32 = (ks >> 2) * kKeys * 128 + (ks & 3) * 32;
        wgmma_ss_tf32(dp, smem_desc(do_tile + at64), smem_desc(addr(v_tile(b)) + at32));
      }
      wgmma_commit();
      wgmma_wait<1>();  // S is done (groups retire in order); P while dP's products run
      fence_operands(s);

      rows_to_p<4>(s, kt * kKeys, q0 + warp * 16 + g, lse2, scale_log2);  // P into s
      wgmma_wait<0>();
      fence_operands(dp);
      rows_to_ds<4>(dp, s, dsv);
      std::uint32_t a[4][4];
      tf32_fragments(a, dp);
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs_tf32(acc, a[j], smem_desc(addr(kt_tile(b)) + j * 32));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc);
      hold(a);
    }

    const float mul[2] = {scale, scale};
    store_tile_rows(dq + q_off + h * kD, q_stride, acc, warp * 16, len - q0, mul);
  }
#else
  __trap();  // launched only where attention_wgmma_supported
#endif
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The dK/dV pass's copies: this thread's chunks of a 64-row K or V tile (all 256 threads; as
// load_rows), raw fp32 by cp.async (rows at or past `valid` >= 1 zero-filled), rounded in place
// once landed ...
__device__ __forceinline__ void copy_rows64(unsigned char* tile, const float* src, std::int64_t stride, int valid) {
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads, r = i >> 5, c4 = i & 31;
    cp_async16(tile + swz(kTile, r, 4 * c4), src + static_cast<std::int64_t>(r < valid ? r : 0) * stride + 4 * c4,
               r < valid);
  }
}
__device__ __forceinline__ void round_rows64(unsigned char* tile) {
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads, r = i >> 5, c4 = i & 31;
    uint4* p = reinterpret_cast<uint4*>(tile + swz(kTile, r, 4 * c4));
    *p = tf32x4(*reinterpret_cast<const float4*>(p));
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The backward's dK/dV pass: for the block's 64 keys, dV = sum P^T dO and dK = scale * sum dS^T Q
// over the query heads [h_begin, h_end) of its GQA group (all of them when splits == 1; split s > 0
// writes its slabs, which attention_reduce_kernel adds) and the queries at or after the keys.
// Grid (n_kv_heads * splits, n_seqs, k_tiles), 256 threads, kDkvSmemBytes of dynamic shared memory.
// K and V (64 keys: wgmma's M) are staged once for both warpgroups; the items (a query head and
// 32 queries) alternate between them, each warpgroup running independently on its own stage (Q,
// dO, Q^T, dO^T; its own barrier) so that one's copies overlap the other's products. A thread
// rounds the chunks it copied in place and writes their Q^T, dO^T entries. Per item: S^T = K Q^T
// and dP^T = V dO^T by wgmma m64n32k8 from shared memory; P^T, dS^T = P^T (dP^T - D) in registers;
// dV += P^T dO and dK += dS^T Q by wgmma m64n128k8 with P^T, dS^T from registers and dO^T, Q^T from
// shared memory. At the end warpgroup 1 hands its sums to warpgroup 0 through shared memory, which
// adds them to its own (a fixed order: deterministic) and stores.
__global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma_dkdv_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                const float* __restrict__ dout, const float* __restrict__ lse,
                                const float* __restrict__ dsum, float* __restrict__ dk, float* __restrict__ dv,
                                Slabs slabs, const std::int32_t* __restrict__ cu_seqlens, int n_q_heads,
                                int n_kv_heads, int splits, float scale, float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* const smem = aligned_smem();
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  auto addr = [&](const unsigned char* p) { return base + static_cast<std::uint32_t>(p - smem); };

  const DkvBlock blk(cu_seqlens, n_q_heads, n_kv_heads, splits);
  const int kvh = blk.kvh, split = blk.split, start = blk.start, len = blk.len;
  const int h_begin = blk.h_begin, h_end = blk.h_end;
  const int n_tiles = (len + kTile - 1) / kTile;
  const int n_q32 = (len + kKeys - 1) / kKeys;
  const std::int64_t q_stride = static_cast<std::int64_t>(n_q_heads) * kD;
  const std::int64_t kv_stride = static_cast<std::int64_t>(n_kv_heads) * kD;
  const int tid = threadIdx.x, wg = tid >> 7, wt = tid & 127, warp = wt >> 5, lane = tid & 31;
  const int g = lane >> 2;
  // This warpgroup's stage: Q [32][128], dO [32][128], Q^T [128][32], dO^T [128][32]; lse, D.
  unsigned char* const stage = smem + kDkvOffStage + wg * kDkvStageBytes;
  float* const lse_s = reinterpret_cast<float*>(smem + kDkvOffStats) + wg * 2 * kKeys;
  float* const dsum_s = lse_s + kKeys;

  // Item `it` of key tile kt (per_head 32-query tiles per head) into this warpgroup's stage.
  auto copy_item = [&](int it, int per_head, int kt) {
    const int hq = h_begin + it / per_head, q0 = (2 * kt + it % per_head) * kKeys;
    const std::int64_t off = static_cast<std::int64_t>(start + q0) * q_stride + hq * kD;
    copy_rows32<128>(stage, q + off, q_stride, len - q0, wt);
    copy_rows32<128>(stage + kKvBytes, dout + off, q_stride, len - q0, wt);
    if (wt < kKeys) {  // rows past the end zero-filled: their P is masked to 0 where it is formed
      const bool valid = q0 + wt < len;
      const std::int64_t idx = valid ? static_cast<std::int64_t>(start + q0 + wt) * n_q_heads + hq : 0;
      cp_async4(lse_s + wt, lse + idx, valid);
      cp_async4(dsum_s + wt, dsum + idx, valid);
    }
  };

  for (int kt = blockIdx.z; kt < n_tiles; kt += gridDim.z) {
    const int k0 = kt * kTile;
    const std::int64_t kv_off = static_cast<std::int64_t>(start + k0) * kv_stride + kvh * kD;
    const int per_head = n_q32 - 2 * kt;  // 32-query tiles at or after the key tile
    const int n_items = (h_end - h_begin) * per_head;
    __syncthreads();  // a previous tile's readers of shared memory are done
    copy_rows64(smem, k + kv_off, kv_stride, len - k0);
    copy_rows64(smem + kTileBytes, v + kv_off, kv_stride, len - k0);
    if (wg < n_items) copy_item(wg, per_head, kt);
    cp_async_commit();
    cp_async_wait_group<0>();
    round_rows64(smem);
    round_rows64(smem + kTileBytes);
    fence_proxy_async();
    __syncthreads();  // K and V complete

    float dk_acc[64], dv_acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;

    for (int it = wg; it < n_items; it += 2) {
      const int q0 = (2 * kt + it % per_head) * kKeys;
      cp_async_wait_group<0>();
      round_rows32<128>(stage, stage + 2 * kKvBytes, wt);
      round_rows32<128>(stage + kKvBytes, stage + 3 * kKvBytes, wt);
      fence_proxy_async();
      warpgroup_barrier(wg);  // item it complete in this warpgroup's stage

      float st[16], dpt[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) st[i] = dpt[i] = 0.f;
      fence_operands(st);
      fence_operands(dpt);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 8; ++ks) {
        const std::uint32_t at64 = (ks >> 2) * kTile * 128 + (ks & 3) * 32;
        const std::uint32_t at32 = (ks >> 2) * kKeys * 128 + (ks & 3) * 32;
        wgmma_ss_tf32(st, smem_desc(base + at64), smem_desc(addr(stage) + at32));
      }
      wgmma_commit();
#pragma unroll
      for (int ks = 0; ks < kD / 8; ++ks) {
        const std::uint32_t at64 = (ks >> 2) * kTile * 128 + (ks & 3) * 32;
        const std::uint32_t at32 = (ks >> 2) * kKeys * 128 + (ks & 3) * 32;
        wgmma_ss_tf32(dpt, smem_desc(base + kTileBytes + at64), smem_desc(addr(stage + kKvBytes) + at32));
      }
      wgmma_commit();
      // Each half as soon as its operands are ready (groups retire in order): P^T while dP^T's
      // products run, dV += P^T dO issued before dS^T is formed, dK += dS^T Q last.
      wgmma_wait<1>();
      fence_operands(st);
      cols_to_p<4>(st, k0 + warp * 16 + g, q0, len, lse_s, scale_log2);  // P^T into st
      std::uint32_t ap[4][4], ads[4][4];
      tf32_fragments(ap, st);
      fence_operands(dv_acc);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs_tf32(dv_acc, ap[j], smem_desc(addr(stage + 3 * kKvBytes) + j * 32));
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(dpt);
      cols_to_ds<4>(dpt, st, dsum_s);  // dS^T into dpt
      tf32_fragments(ads, dpt);
      fence_operands(dk_acc);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs_tf32(dk_acc, ads[j], smem_desc(addr(stage + 2 * kKvBytes) + j * 32));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(dv_acc);
      fence_operands(dk_acc);
      hold(ap);
      hold(ads);
      warpgroup_barrier(wg);  // every warp of the warpgroup is done with the stage
      if (it + 2 < n_items) copy_item(it + 2, per_head, kt);
      cp_async_commit();
    }

    // Warpgroup 1's sums through its stage (free now; 64 KB: both accumulators), each thread's
    // values in a slot that the thread of warpgroup 0 with the same accumulator layout reads.
    float* hand = reinterpret_cast<float*>(smem + kDkvOffStage + kDkvStageBytes);
    if (wg == 1) {
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        hand[i * 128 + wt] = dk_acc[i];
        hand[(64 + i) * 128 + wt] = dv_acc[i];
      }
    }
    __syncthreads();
    if (wg == 0) {
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        dk_acc[i] += hand[i * 128 + wt];
        dv_acc[i] += hand[(64 + i) * 128 + wt];
      }
      float* dk_dst = split == 0 ? dk : slabs(2 * (split - 1));
      float* dv_dst = split == 0 ? dv : slabs(2 * (split - 1) + 1);
      const float sc[2] = {scale, scale}, one[2] = {1.f, 1.f};
      store_tile_rows(dk_dst + kv_off, kv_stride, dk_acc, warp * 16, len - k0, sc);
      store_tile_rows(dv_dst + kv_off, kv_stride, dv_acc, warp * 16, len - k0, one);
    }
  }
#else
  __trap();  // launched only where attention_wgmma_supported
#endif
}

#ifndef CUDABLOCKS_ATTN_MMA_EMULATION
std::atomic<int> g_mode{-1};

#if defined(CUDABLOCKS_SM90A)
bool enabled() {
  int mode = g_mode.load(std::memory_order_relaxed);
  if (mode < 0) {
    const char* e = std::getenv("CUDABLOCKS_ATTN_WGMMA");
    mode = (e != nullptr && e[0] == '0' && e[1] == '\0') ? 0 : 1;
    g_mode.store(mode, std::memory_order_relaxed);
  }
  return mode == 1;
}
#endif

}  // namespace

bool attention_wgmma_supported(int head_dim, int n_q_heads, int n_kv_heads) {
#if defined(CUDABLOCKS_SM90A)
  return enabled() && head_dim == kD && n_kv_heads > 0 && (n_q_heads / n_kv_heads) % 2 == 0 &&
         compute_capability() == 90 &&
         static_cast<std::size_t>(std::max({kSmemBytes, kDqSmemBytes, kDkvSmemBytes})) <= shared_memory_optin();
#else
  (void)head_dim;
  (void)n_q_heads;
  (void)n_kv_heads;
  return false;
#endif
}

void attention_forward_wgmma_tf32(const float* q, const float* k, const float* v, float* out, float* lse,
                                  const int32_t* cu_seqlens, int n_seqs, unsigned q_tiles, int n_q_heads,
                                  int n_kv_heads, float scale, cudaStream_t stream) {
  require_dynamic_smem(reinterpret_cast<const void*>(attention_wgmma_forward_kernel), kSmemBytes,
                       "attention (cuda, wgmma):");
  const dim3 grid(static_cast<unsigned>(n_q_heads / 2), static_cast<unsigned>(n_seqs), q_tiles);
  attention_wgmma_forward_kernel<<<grid, kThreads, kSmemBytes, stream>>>(q, k, v, out, lse, cu_seqlens, n_q_heads,
                                                                        n_kv_heads, scale * kLog2e);
  CUDABLOCKS_CHECK_LAUNCH("attention_wgmma_forward_kernel");
}

void attention_dq_wgmma_tf32(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                             const float* dsum, float* dq, const int32_t* cu_seqlens, int n_seqs, unsigned q_tiles,
                             int n_q_heads, int n_kv_heads, float scale, cudaStream_t stream) {
  require_dynamic_smem(reinterpret_cast<const void*>(attention_wgmma_dq_kernel), kDqSmemBytes,
                       "attention (cuda, wgmma):");
  const dim3 grid(static_cast<unsigned>(n_q_heads / 2), static_cast<unsigned>(n_seqs), q_tiles);
  attention_wgmma_dq_kernel<<<grid, kThreads, kDqSmemBytes, stream>>>(q, k, v, dout, lse, dsum, dq, cu_seqlens,
                                                                     n_q_heads, n_kv_heads, scale, scale * kLog2e);
  CUDABLOCKS_CHECK_LAUNCH("attention_wgmma_dq_kernel");
}

void attention_dkdv_wgmma_tf32(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                               const float* dsum, float* dk, float* dv, float* slab_first, float* slab_rest,
                               int slab_n_first, std::int64_t slab_size, const int32_t* cu_seqlens, int n_seqs,
                               unsigned k_tiles, int n_q_heads, int n_kv_heads, int splits, float scale,
                               cudaStream_t stream) {
  require_dynamic_smem(reinterpret_cast<const void*>(attention_wgmma_dkdv_kernel), kDkvSmemBytes,
                       "attention (cuda, wgmma):");
  const dim3 grid(static_cast<unsigned>(n_kv_heads * splits), static_cast<unsigned>(n_seqs), k_tiles);
  attention_wgmma_dkdv_kernel<<<grid, kThreads, kDkvSmemBytes, stream>>>(
      q, k, v, dout, lse, dsum, dk, dv, Slabs{slab_first, slab_rest, slab_n_first, slab_size}, cu_seqlens, n_q_heads,
      n_kv_heads, splits, scale, scale * kLog2e);
  CUDABLOCKS_CHECK_LAUNCH("attention_wgmma_dkdv_kernel");
}

namespace detail {
void set_attention_wgmma(int mode) { g_mode.store(mode < 0 ? -1 : (mode > 0 ? 1 : 0), std::memory_order_relaxed); }
}  // namespace detail
#else
}  // namespace
#endif  // CUDABLOCKS_ATTN_MMA_EMULATION

}  // namespace cudablocks::cuda
