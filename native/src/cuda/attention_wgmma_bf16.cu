// Causal GQA attention on wgmma (sm_90a) for bf16 q, k, v, out and dout (the bf16 blocks keep them
// so), head_dim 128: the forward, the backward's dK/dV pass and its dQ pass. Contract:
// attention_wgmma.cuh. The forward and the dQ pass split the work as the tf32 kernels do
// (attention_wgmma.cu: a block takes a 64-query tile of two query heads, one per warpgroup); a
// dK/dV block is one warpgroup on 64 keys, two blocks per SM. What 16-bit operands change against
// tf32:
//   - tiles are copied as they are by cp.async (no rounding), every one double-buffered: the next
//     tile is in flight while the current one's products run;
//   - wgmma reads 16-bit B operands MN-major as well (its transpose flag), so the operands that tf32
//     transposes by hand (V in P V, K in dS K, dO in P^T dO, Q in dS^T Q) are the same [rows][d]
//     tiles read through an MN-major descriptor (smem_desc_mn);
//   - an accumulator's columns 16j .. 16j + 15 are, packed in pairs, the A fragment of k-step j (as
//     with mma.sync m16n8k16), so P and dS become A operands in order.
// Tiles: [rows][128] bf16 as two column chunks of [rows][64] (128-byte rows, the 128-byte swizzle,
// chunks rows * 128 bytes apart); a k-step of 16 values starts 32 bytes further along the row.
// P and dS are rounded to bf16 as A fragments, accumulation is fp32; dq, dk, dv are written in
// fp32, out in bf16. Every product sums in the mma.sync kernels' order: on an H200 the outputs
// equalled theirs bit for bit (CudaAttentionWgmmaBf16).
// Shared memory: forward and dQ pass 97 KB, dK/dV 98 KB. Registers (ptxas, sm_90a): forward 128
// (capped for two blocks per SM; 92 bytes spilled), dQ 128 (two blocks per SM, no spills),
// dK/dV 242 (two blocks of 128 threads per SM).
//
// Measured (H200, 2026-11-28, CudaAttentionTiming, Qwen3-4B heads 32/8; TFLOP/s on the useful
// 2 * n_q * d * sum(L^2) forward, 2.5x that backward), against the mma.sync bf16 I/O kernels:
//   8 x 512   forward 0.078 ms (220 TFLOP/s; mma.sync 0.102), backward 0.271 ms (159; 0.321)
//   1 x 2048  forward 0.097 ms (354; 0.147), backward 0.425 ms (202; 0.505)
// Steps there, each measured in one run: the first version (dK/dV on 64 keys, its warpgroups
// alternating over 32-query items, as tf32) 0.297 / 0.468 ms backward; forming P while dP's
// products run and issuing dV before dS is formed, 0.285 / 0.460; the 128-key dK/dV blocks,
// 0.282 / 0.442 (against 0.286 / 0.459 in that run); one warpgroup per dK/dV block, two blocks per
// SM, unsynchronized, so that one block's softmax overlaps the other's products: 0.271 / 0.425
// (against 0.281 / 0.433 with 128-key blocks in that run). In a QLoRA layer step (8 x 512, profiler,
// first version) the dQ pass took 0.099 ms (mma.sync 0.132) and the dK/dV pass 0.177 (0.175): at
// ~1.3 us per 64 x 32 item and SM, a quarter of the tensor rate, each warpgroup waiting on its own
// products between the two halves of an item; twice the product size per item did not change that
// much. Tried and measured slower: queueing the next item's S^T and dP^T behind dK (everything
// retired before the item loop turns, since ptxas serializes every wgmma of a kernel whose products
// stay in flight across a loop's branch): 0.301 against 0.287 ms at 8 x 512; the forward at one
// block per SM (no spills): 0.091 against 0.079 ms.
#include "cuda/attention_wgmma.cuh"
#include "cuda/attention_shared.cuh"
#include "cuda/attention_wgmma_shared.cuh"

#include "cuda/cp_async.cuh"
#ifndef CUDABLOCKS_ATTN_MMA_EMULATION  // the host emulation (tests/emu) supplies its own primitives
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/wgmma.cuh"
#endif

namespace cudablocks::cuda {
namespace {
namespace bf16io {

constexpr int kTileBytes = kTile * kD * 2;  // a 64-row tile: 16 KB
constexpr int kRowsBytes = kKeys * kD * 2;  // a 32-row tile: 8 KB

// Forward: Q of the two heads, K of two stages, V of two stages.
constexpr int kFwdOffK = 2 * kTileBytes;
constexpr int kFwdOffV = kFwdOffK + 2 * kTileBytes;
constexpr int kFwdSmemBytes = kFwdOffV + 2 * kTileBytes + 1024;  // + 1 KB to align the tiles
// dQ pass: Q of the two heads, dO of the two heads, then K and V (32 keys) of two stages.
constexpr int kDqOffKv = 4 * kTileBytes;  // stage s: K at + 2 s kRowsBytes, V after it
constexpr int kDqSmemBytes = kDqOffKv + 4 * kRowsBytes + 1024;
// dK/dV pass: K and V of the block's keys (warpgroup w's 64 as its own [64][128] tiles: K_w at
// 2 w tiles, V_w after it), then two stages of a 64-query item (Q, dO), then per stage the item's
// lse and D (64 floats each).
constexpr int kDkvWgs = 1;  // warpgroups per dK/dV block, 64 keys each (2 works as well: measured slower)
constexpr int kDkvThreads = 128 * kDkvWgs;
constexpr int kDkvOffStage = 2 * kDkvWgs * kTileBytes;
constexpr int kDkvStageBytes = 2 * kTileBytes;
constexpr int kDkvOffStats = kDkvOffStage + 2 * kDkvStageBytes;
constexpr int kDkvSmemBytes = kDkvOffStats + 2 * 2 * kTile * 4 + 1024;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kDkvKeys = kDkvWgs * kTile;  // keys per dK/dV block

// Byte offset of element (r, c) of a [rows][128] bf16 tile (see the top of the file).
__device__ __forceinline__ std::uint32_t swz16(int rows, int r, int c) {
  return static_cast<std::uint32_t>((c >> 6) * rows * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) +
                                    (c & 7) * 2);
}
// Byte offset of k-step ks (16 values) in a K-major [rows][128] tile.
__device__ __forceinline__ std::uint32_t kstep(int rows, int ks) { return (ks >> 2) * rows * 128 + (ks & 3) * 32; }

// The backward's two score-shaped products of an item, over head_dim: s = A_s B_s^T and dp = A_dp
// B_dp^T, the A tiles [a_rows][128] and the B tiles [b_rows][128] K-major at the given shared
// addresses. Both accumulators zeroed; s's products are one commit group and dp's the next, so
// wgmma_wait<1> retires s while dp's still run.
template <int N>
__device__ __forceinline__ void issue_s_and_dp(float (&s)[N], float (&dp)[N], std::uint32_t s_a, std::uint32_t s_b,
                                               std::uint32_t dp_a, std::uint32_t dp_b, int a_rows, int b_rows) {
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = dp[i] = 0.f;
  fence_operands(s);
  fence_operands(dp);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    wgmma_ss(s, smem_desc(s_a + kstep(a_rows, ks)), smem_desc(s_b + kstep(b_rows, ks)));
  }
  wgmma_commit();
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    wgmma_ss(dp, smem_desc(dp_a + kstep(a_rows, ks)), smem_desc(dp_b + kstep(b_rows, ks)));
  }
  wgmma_commit();
}

// cp.async of rows [0, ROWS) of a [*, stride] bf16 matrix's 128 columns at src into a tile, the
// 16-byte chunks shared by NT threads (th = this thread's index among them); rows at or past
// `valid` zero-filled.
template <int ROWS, int NT>
__device__ __forceinline__ void copy_tile(unsigned char* tile, const std::uint16_t* src, std::int64_t stride,
                                          int valid, int th) {
#pragma unroll
  for (int u = 0; u < ROWS * 16 / NT; ++u) {
    const int i = th + u * NT, r = i >> 4, c8 = i & 15;
    cp_async16(tile + swz16(ROWS, r, 8 * c8), src + static_cast<std::int64_t>(r < valid ? r : 0) * stride + 8 * c8,
               r < valid);
  }
}

// Columns 16j .. 16j + 15 of an accumulator (acc[4nb + c], the mma order) as k-step j's A fragment.
template <int S, int N>
__device__ __forceinline__ void a_fragments(std::uint32_t (&a)[S][4], const float (&acc)[N]) {
#pragma unroll
  for (int j = 0; j < S; ++j) {
    a[j][0] = pack_bf16(acc[8 * j], acc[8 * j + 1]);
    a[j][1] = pack_bf16(acc[8 * j + 2], acc[8 * j + 3]);
    a[j][2] = pack_bf16(acc[8 * j + 4], acc[8 * j + 5]);
    a[j][3] = pack_bf16(acc[8 * j + 6], acc[8 * j + 7]);
  }
}

// Waits for this thread's copies, makes them visible to wgmma (the async proxy); the caller's
// barrier then publishes everyone's.
__device__ __forceinline__ void copies_landed() {
  cp_async_wait_group<0>();
  fence_proxy_async();
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The forward: as attention_wgmma_forward_kernel (tf32), with K and V of tile kt + 1 copied by
// cp.async while tile kt's products and softmax run, and out written in bf16. Grid
// (n_q_heads / 2, n_seqs, q_tiles), 256 threads, kFwdSmemBytes of dynamic shared memory.
__global__ void __launch_bounds__(kThreads, 2)
    attention_wgmma_bf16_forward_kernel(const std::uint16_t* __restrict__ q, const std::uint16_t* __restrict__ k,
                                        const std::uint16_t* __restrict__ v, std::uint16_t* __restrict__ out,
                                        float* __restrict__ lse, const std::int32_t* __restrict__ cu_seqlens,
                                        int n_q_heads, int n_kv_heads, float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* const smem = aligned_smem();
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));

  const HeadPairBlock blk(cu_seqlens, n_q_heads, n_kv_heads);
  const int start = blk.start, len = blk.len, h0 = blk.h0;
  const std::int64_t q_stride = blk.q_stride, kv_stride = blk.kv_stride;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3;
  const int h = h0 + wg;
  const std::uint16_t* k_head = blk.kv_head(k);
  const std::uint16_t* v_head = blk.kv_head(v);
  const std::uint32_t q_tile = base + wg * kTileBytes;
  auto k_tile = [&](int b) { return smem + kFwdOffK + b * kTileBytes; };
  auto v_tile = [&](int b) { return smem + kFwdOffV + b * kTileBytes; };
  auto addr = [&](const unsigned char* p) { return base + static_cast<std::uint32_t>(p - smem); };

  for (int qt = static_cast<int>(gridDim.z) - 1 - static_cast<int>(blockIdx.z); qt < blk.n_tiles;
       qt += gridDim.z) {
    const int q0 = qt * kTile;
    __syncthreads();  // a previous tile's readers of shared memory are done
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      copy_tile<kTile, kThreads>(smem + hh * kTileBytes, q + static_cast<std::int64_t>(start + q0) * q_stride +
                                                             (h0 + hh) * kD, q_stride, len - q0, tid);
    }
    copy_tile<kTile, kThreads>(k_tile(0), k_head, kv_stride, len, tid);
    copy_tile<kTile, kThreads>(v_tile(0), v_head, kv_stride, len, tid);
    cp_async_commit();

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int kt = 0; kt <= qt; ++kt) {
      const int b = kt & 1;
      copies_landed();
      __syncthreads();  // tile kt in stage b for everyone; stage b ^ 1's readers (tile kt - 1) are done
      if (kt < qt) {
        const std::int64_t k1 = static_cast<std::int64_t>(kt + 1) * kTile;
        copy_tile<kTile, kThreads>(k_tile(b ^ 1), k_head + k1 * kv_stride, kv_stride, len - (kt + 1) * kTile, tid);
        copy_tile<kTile, kThreads>(v_tile(b ^ 1), v_head + k1 * kv_stride, kv_stride, len - (kt + 1) * kTile, tid);
      }
      cp_async_commit();

      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      fence_operands(s);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        wgmma_ss(s, smem_desc(q_tile + kstep(kTile, ks)), smem_desc(addr(k_tile(b)) + kstep(kTile, ks)));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s);

      online_softmax_tile<16>([&](int j, int c) -> float& { return s[4 * j + c]; },
                              [&](int nb, int c) -> float& { return o[4 * nb + c]; }, m, l, warp * 16, kt == qt,
                              scale_log2);

      std::uint32_t a[4][4];
      a_fragments(a, s);
      fence_operands(o);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs<1>(o, a[j], smem_desc_mn(addr(v_tile(b)) + j * 2048, kTile * 128));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o);
      hold(a);
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

// The dQ pass: as attention_wgmma_dq_kernel (tf32): 32-key tiles, S and dP by wgmma m64n32k16,
// dQ += dS K by m64n128k16 with dS from registers and K read MN-major. Grid (n_q_heads / 2,
// n_seqs, q_tiles), 256 threads, kDqSmemBytes of dynamic shared memory.
__global__ void __launch_bounds__(kThreads, 2)
    attention_wgmma_bf16_dq_kernel(const std::uint16_t* __restrict__ q, const std::uint16_t* __restrict__ k,
                                   const std::uint16_t* __restrict__ v, const std::uint16_t* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ dsum,
                                   float* __restrict__ dq, const std::int32_t* __restrict__ cu_seqlens,
                                   int n_q_heads, int n_kv_heads, float scale, float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* const smem = aligned_smem();
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));

  const HeadPairBlock blk(cu_seqlens, n_q_heads, n_kv_heads);
  const int start = blk.start, len = blk.len, h0 = blk.h0;
  const std::int64_t q_stride = blk.q_stride, kv_stride = blk.kv_stride;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2;
  const int h = h0 + wg;
  const std::uint16_t* k_head = blk.kv_head(k);
  const std::uint16_t* v_head = blk.kv_head(v);
  auto k_tile = [&](int b) { return smem + kDqOffKv + 2 * b * kRowsBytes; };
  auto v_tile = [&](int b) { return smem + kDqOffKv + (2 * b + 1) * kRowsBytes; };
  auto addr = [&](const unsigned char* p) { return base + static_cast<std::uint32_t>(p - smem); };
  const std::uint32_t q_tile = base + wg * kTileBytes, do_tile = base + (2 + wg) * kTileBytes;

  for (int qt = static_cast<int>(gridDim.z) - 1 - static_cast<int>(blockIdx.z); qt < blk.n_tiles;
       qt += gridDim.z) {
    const int q0 = qt * kTile;
    const std::int64_t q_off = static_cast<std::int64_t>(start + q0) * q_stride;
    __syncthreads();  // a previous tile's readers of shared memory are done
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      copy_tile<kTile, kThreads>(smem + hh * kTileBytes, q + q_off + (h0 + hh) * kD, q_stride, len - q0, tid);
      copy_tile<kTile, kThreads>(smem + (2 + hh) * kTileBytes, dout + q_off + (h0 + hh) * kD, q_stride, len - q0,
                                 tid);
    }
    copy_tile<kKeys, kThreads>(k_tile(0), k_head, kv_stride, len, tid);
    copy_tile<kKeys, kThreads>(v_tile(0), v_head, kv_stride, len, tid);
    cp_async_commit();
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
      copies_landed();
      __syncthreads();  // tile kt in stage b for everyone; stage b ^ 1's readers are done
      if (kt + 1 < n_kt) {
        const int k1 = (kt + 1) * kKeys;
        copy_tile<kKeys, kThreads>(k_tile(b ^ 1), k_head + static_cast<std::int64_t>(k1) * kv_stride, kv_stride,
                                   len - k1, tid);
        copy_tile<kKeys, kThreads>(v_tile(b ^ 1), v_head + static_cast<std::int64_t>(k1) * kv_stride, kv_stride,
                                   len - k1, tid);
      }
      cp_async_commit();

      float s[16], dp[16];
      issue_s_and_dp(s, dp, q_tile, addr(k_tile(b)), do_tile, addr(v_tile(b)), kTile, kKeys);
      wgmma_wait<1>();  // S is done (groups retire in order); P while dP's products run
      fence_operands(s);

      rows_to_p<4>(s, kt * kKeys, q0 + warp * 16 + g, lse2, scale_log2);  // P into s
      wgmma_wait<0>();
      fence_operands(dp);
      rows_to_ds<4>(dp, s, dsv);
      std::uint32_t a[2][4];
      a_fragments(a, dp);
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 2; ++j) wgmma_rs<1>(acc, a[j], smem_desc_mn(addr(k_tile(b)) + j * 2048, kKeys * 128));
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

// The dK/dV pass: for the block's kDkvKeys keys, dV = sum P^T dO and dK = scale * sum dS^T Q over
// the query heads [h_begin, h_end) of its GQA group (all of them when splits == 1; split s > 0
// writes its slabs, which attention_reduce_kernel adds) and the queries at or after the keys.
// Warpgroup w owns keys 64 w .. 64 w + 63 (wgmma's M) and keeps their dK, dV in registers; every
// warpgroup runs every item (a query head and 64 queries, double-buffered, copied by all threads
// one item ahead), each on its own keys: S^T = K_w Q^T and dP^T = V_w dO^T by wgmma m64n64k16,
// P^T and dS^T in registers, dV += P^T dO and dK += dS^T Q by m64n128k16 with dO and Q read
// MN-major. A warpgroup whose keys all follow the item's queries skips it. Grid (n_kv_heads * splits, n_seqs,
// kDkvKeys-key tiles), kDkvThreads threads, kDkvSmemBytes of dynamic shared memory.
__global__ void __launch_bounds__(kDkvThreads, 2 / kDkvWgs)
    attention_wgmma_bf16_dkdv_kernel(const std::uint16_t* __restrict__ q, const std::uint16_t* __restrict__ k,
                                     const std::uint16_t* __restrict__ v, const std::uint16_t* __restrict__ dout,
                                     const float* __restrict__ lse, const float* __restrict__ dsum,
                                     float* __restrict__ dk, float* __restrict__ dv, Slabs slabs,
                                     const std::int32_t* __restrict__ cu_seqlens, int n_q_heads, int n_kv_heads,
                                     int splits, float scale, float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* const smem = aligned_smem();
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  auto addr = [&](const unsigned char* p) { return base + static_cast<std::uint32_t>(p - smem); };

  const DkvBlock blk(cu_seqlens, n_q_heads, n_kv_heads, splits);
  const int kvh = blk.kvh, split = blk.split, start = blk.start, len = blk.len;
  const int h_begin = blk.h_begin, h_end = blk.h_end;
  const int n_tiles = (len + kDkvKeys - 1) / kDkvKeys;
  const int n_q64 = (len + kTile - 1) / kTile;
  const std::int64_t q_stride = static_cast<std::int64_t>(n_q_heads) * kD;
  const std::int64_t kv_stride = static_cast<std::int64_t>(n_kv_heads) * kD;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2;
  const std::uint32_t k_rows = base + 2 * wg * kTileBytes, v_rows = k_rows + kTileBytes;
  auto stage = [&](int sb) { return smem + kDkvOffStage + sb * kDkvStageBytes; };
  auto stats = [&](int sb) { return reinterpret_cast<float*>(smem + kDkvOffStats) + sb * 2 * kTile; };

  // Item `it` of key tile kt (per_head 64-query tiles per head) into stage sb, by all threads.
  auto copy_item = [&](int it, int per_head, int kt, int sb) {
    const int hq = h_begin + it / per_head, q0 = (kDkvWgs * kt + it % per_head) * kTile;
    const std::int64_t off = static_cast<std::int64_t>(start + q0) * q_stride + hq * kD;
    copy_tile<kTile, kDkvThreads>(stage(sb), q + off, q_stride, len - q0, tid);
    copy_tile<kTile, kDkvThreads>(stage(sb) + kTileBytes, dout + off, q_stride, len - q0, tid);
    // lse, then D; rows past the end zero-filled: their P is masked to 0 where it is formed.
    for (int i = tid; i < 2 * kTile; i += kDkvThreads) {
      const int r = i & (kTile - 1);
      const bool valid = q0 + r < len;
      const std::int64_t idx = valid ? static_cast<std::int64_t>(start + q0 + r) * n_q_heads + hq : 0;
      cp_async4(stats(sb) + i, (i < kTile ? lse : dsum) + idx, valid);
    }
  };

  for (int kt = blockIdx.z; kt < n_tiles; kt += gridDim.z) {
    const int k0 = kt * kDkvKeys, kw0 = k0 + wg * kTile;  // the block's and this warpgroup's first key
    const int per_head = n_q64 - kDkvWgs * kt;  // 64-query tiles at or after the key tile
    const int n_items = (h_end - h_begin) * per_head;
    __syncthreads();  // a previous tile's readers of shared memory are done
#pragma unroll
    for (int w = 0; w < kDkvWgs; ++w) {
      const std::int64_t kv_off = static_cast<std::int64_t>(start + k0 + w * kTile) * kv_stride + kvh * kD;
      copy_tile<kTile, kDkvThreads>(smem + 2 * w * kTileBytes, k + kv_off, kv_stride, len - k0 - w * kTile, tid);
      copy_tile<kTile, kDkvThreads>(smem + (2 * w + 1) * kTileBytes, v + kv_off, kv_stride, len - k0 - w * kTile,
                                    tid);
    }
    copy_item(0, per_head, kt, 0);
    cp_async_commit();

    float dk_acc[64], dv_acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;

    for (int it = 0; it < n_items; ++it) {
      const int sb = it & 1;
      const int q0 = (kDkvWgs * kt + it % per_head) * kTile;
      copies_landed();
      __syncthreads();  // item it in stage sb for everyone; stage sb ^ 1's readers (item it - 1) are done
      if (it + 1 < n_items) copy_item(it + 1, per_head, kt, sb ^ 1);
      cp_async_commit();
      if (kw0 >= q0 + kTile || kw0 >= len) continue;  // every key of this warpgroup follows every query

      const std::uint32_t q_rows = addr(stage(sb)), do_rows = q_rows + kTileBytes;
      const float* lse_s = stats(sb);
      const float* dsum_s = lse_s + kTile;
      float st[32], dpt[32];
      issue_s_and_dp(st, dpt, k_rows, q_rows, v_rows, do_rows, kTile, kTile);
      // Each half as soon as its operands are ready (groups retire in order): P^T while dP^T's
      // products run, dV += P^T dO issued before dS^T is formed, dK += dS^T Q after it.
      wgmma_wait<1>();
      fence_operands(st);
      cols_to_p<8>(st, kw0 + warp * 16 + g, q0, len, lse_s, scale_log2);  // P^T into st
      std::uint32_t ap[4][4], ads[4][4];
      a_fragments(ap, st);
      fence_operands(dv_acc);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs<1>(dv_acc, ap[j], smem_desc_mn(do_rows + j * 2048, kTile * 128));
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(dpt);
      cols_to_ds<8>(dpt, st, dsum_s);  // dS^T into dpt
      a_fragments(ads, dpt);
      fence_operands(dk_acc);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs<1>(dk_acc, ads[j], smem_desc_mn(q_rows + j * 2048, kTile * 128));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(dv_acc);
      fence_operands(dk_acc);
      hold(ap);
      hold(ads);
    }

    const std::int64_t kv_off = static_cast<std::int64_t>(start + kw0) * kv_stride + kvh * kD;
    float* dk_dst = split == 0 ? dk : slabs(2 * (split - 1));
    float* dv_dst = split == 0 ? dv : slabs(2 * (split - 1) + 1);
    const float sc[2] = {scale, scale}, one[2] = {1.f, 1.f};
    store_tile_rows(dk_dst + kv_off, kv_stride, dk_acc, warp * 16, len - kw0, sc);
    store_tile_rows(dv_dst + kv_off, kv_stride, dv_acc, warp * 16, len - kw0, one);
  }
#else
  __trap();  // launched only where attention_wgmma_supported
#endif
}

}  // namespace bf16io

#ifndef CUDABLOCKS_ATTN_MMA_EMULATION
}  // namespace

void attention_forward_wgmma_bf16(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                                  std::uint16_t* out, float* lse, const int32_t* cu_seqlens, int n_seqs,
                                  unsigned q_tiles, int n_q_heads, int n_kv_heads, float scale, cudaStream_t stream) {
  using namespace bf16io;
  require_dynamic_smem(reinterpret_cast<const void*>(attention_wgmma_bf16_forward_kernel), kFwdSmemBytes,
                       "attention (cuda, wgmma bf16):");
  const dim3 grid(static_cast<unsigned>(n_q_heads / 2), static_cast<unsigned>(n_seqs), q_tiles);
  attention_wgmma_bf16_forward_kernel<<<grid, kThreads, kFwdSmemBytes, stream>>>(q, k, v, out, lse, cu_seqlens,
                                                                                n_q_heads, n_kv_heads, scale * kLog2e);
  CUDABLOCKS_CHECK_LAUNCH("attention_wgmma_bf16_forward_kernel");
}

void attention_dq_wgmma_bf16(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                             const std::uint16_t* dout, const float* lse, const float* dsum, float* dq,
                             const int32_t* cu_seqlens, int n_seqs, unsigned q_tiles, int n_q_heads, int n_kv_heads,
                             float scale, cudaStream_t stream) {
  using namespace bf16io;
  require_dynamic_smem(reinterpret_cast<const void*>(attention_wgmma_bf16_dq_kernel), kDqSmemBytes,
                       "attention (cuda, wgmma bf16):");
  const dim3 grid(static_cast<unsigned>(n_q_heads / 2), static_cast<unsigned>(n_seqs), q_tiles);
  attention_wgmma_bf16_dq_kernel<<<grid, kThreads, kDqSmemBytes, stream>>>(q, k, v, dout, lse, dsum, dq, cu_seqlens,
                                                                          n_q_heads, n_kv_heads, scale,
                                                                          scale * kLog2e);
  CUDABLOCKS_CHECK_LAUNCH("attention_wgmma_bf16_dq_kernel");
}

void attention_dkdv_wgmma_bf16(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                               const std::uint16_t* dout, const float* lse, const float* dsum, float* dk, float* dv,
                               float* slab_first, float* slab_rest, int slab_n_first, std::int64_t slab_size,
                               const int32_t* cu_seqlens, int n_seqs, unsigned k_tiles, int n_q_heads,
                               int n_kv_heads, int splits, float scale, cudaStream_t stream) {
  using namespace bf16io;
  require_dynamic_smem(reinterpret_cast<const void*>(attention_wgmma_bf16_dkdv_kernel), kDkvSmemBytes,
                       "attention (cuda, wgmma bf16):");
  // k_tiles counts 64-key tiles; a block takes kDkvWgs of them.
  const dim3 grid(static_cast<unsigned>(n_kv_heads * splits), static_cast<unsigned>(n_seqs),
                  (k_tiles + kDkvWgs - 1) / kDkvWgs);
  attention_wgmma_bf16_dkdv_kernel<<<grid, kDkvThreads, kDkvSmemBytes, stream>>>(
      q, k, v, dout, lse, dsum, dk, dv, Slabs{slab_first, slab_rest, slab_n_first, slab_size}, cu_seqlens, n_q_heads,
      n_kv_heads, splits, scale, scale * kLog2e);
  CUDABLOCKS_CHECK_LAUNCH("attention_wgmma_bf16_dkdv_kernel");
}
#else
}  // namespace
#endif  // CUDABLOCKS_ATTN_MMA_EMULATION

}  // namespace cudablocks::cuda
