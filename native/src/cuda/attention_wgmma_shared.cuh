// Pieces shared by the tf32 (attention_wgmma.cu) and bf16 (attention_wgmma_bf16.cu) wgmma attention
// kernels: their geometry, the aligned shared-memory base, a forward or dQ block's heads and
// sequence, the backward's P and dS in registers, and the store of a 64 x 128 accumulator.
// Internal to those two files.
#pragma once

#include <cstdint>

#include "cuda/attention_shared.cuh"
#include "cuda/bf16_vec.cuh"

namespace cudablocks::cuda {
namespace {

constexpr int kD = 128;        // head_dim
constexpr int kTile = 64;      // query rows per warpgroup (wgmma's M), keys per forward tile
constexpr int kThreads = 256;  // two warpgroups
constexpr int kKeys = 32;      // keys per tile of the dQ pass, queries per item of the dK/dV pass

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The dynamic shared memory from its first 1 KB boundary (the 128-byte swizzle's pattern repeats
// every 1 KB, and the tiles must start on it); the kernels ask for 1 KB more than they use.
__device__ __forceinline__ unsigned char* aligned_smem() {
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw_addr = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw));
  return smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
}

// What a block of the forward or the dQ pass works on: sequence blockIdx.y, query heads h0 and
// h0 + 1 (h0 = 2 blockIdx.x) and their kv head.
struct HeadPairBlock {
  int start, len, n_tiles, h0, kvh;
  std::int64_t q_stride, kv_stride;
  __device__ __forceinline__ HeadPairBlock(const std::int32_t* cu_seqlens, int n_q_heads, int n_kv_heads)
      : start(cu_seqlens[blockIdx.y]),
        len(cu_seqlens[blockIdx.y + 1] - start),
        n_tiles((len + kTile - 1) / kTile),
        h0(static_cast<int>(blockIdx.x) * 2),
        kvh(h0 / (n_q_heads / n_kv_heads)),
        q_stride(static_cast<std::int64_t>(n_q_heads) * kD),
        kv_stride(static_cast<std::int64_t>(n_kv_heads) * kD) {}
  // The sequence's first row of the kv head in k or v.
  template <class T>
  __device__ __forceinline__ const T* kv_head(const T* x) const {
    return x + static_cast<std::int64_t>(start) * kv_stride + kvh * kD;
  }
};

// Rows row0 + g and row0 + g + 8 of a warp's 16 (g = lane / 4; rows at or past `valid` dropped) of
// a 64 x 128 accumulator, acc[4nb + 2hh + e] = row half hh, column 8nb + 2 (lane % 4) + e, times
// mul[hh], to dst + row * stride (dst: the tile's row 0, its head's column 0), in fp32 or bf16.
template <class Out>
__device__ __forceinline__ void store_tile_rows(Out* dst, std::int64_t stride, const float (&acc)[64], int row0,
                                                int valid, const float (&mul)[2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = row0 + g + 8 * hh;
    if (r >= valid) continue;
    Out* p = dst + r * stride + 2 * t;
#pragma unroll
    for (int nb = 0; nb < 16; ++nb) {
      store_pair(p + 8 * nb, acc[4 * nb + 2 * hh] * mul[hh], acc[4 * nb + 2 * hh + 1] * mul[hh]);
    }
  }
}

// The dQ pass's per-row constants of a thread's rows row_g and row_g + 8 of one query head (lse and
// dsum of the head's sequence rows at lse_head[row * stride], dsum_head[row * stride]): lse2 = lse
// log2(e), INFINITY for rows past the end (their P = 0), and D (0 there).
__device__ __forceinline__ void dq_row_stats(const float* lse_head, const float* dsum_head, int stride, int row_g,
                                             int len, float (&lse2)[2], float (&d)[2]) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = row_g + 8 * hh;
    const std::int64_t idx = static_cast<std::int64_t>(r) * stride;
    lse2[hh] = r < len ? lse_head[idx] * kLog2e : INFINITY;
    d[hh] = r < len ? dsum_head[idx] : 0.f;
  }
}

// The backward's P and dS in a thread's accumulator of J 8-column blocks, in place. Row-major (the
// dQ pass): s[4j + 2hh + e] is the score of row row_g + 8hh, key key0 + 8j + 2t + e (t = lane % 4);
// P = exp2(S scale_log2 - lse2[hh]) (lse2 = lse log2(e), INFINITY for rows past the end), 0 right
// of the diagonal; then dS = P (dP - D[hh]).
template <int J>
__device__ __forceinline__ void rows_to_p(float (&s)[4 * J], int key0, int row_g, const float (&lse2)[2],
                                          float scale_log2) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 4 * j + 2 * hh + e;
        s[i] = key0 + 8 * j + 2 * t + e <= row_g + 8 * hh ? exp2f(s[i] * scale_log2 - lse2[hh]) : 0.f;
      }
}
template <int J>
__device__ __forceinline__ void rows_to_ds(float (&dp)[4 * J], const float (&p)[4 * J], const float (&d)[2]) {
#pragma unroll
  for (int i = 0; i < 4 * J; ++i) dp[i] = p[i] * (dp[i] - d[(i >> 1) & 1]);
}
// Transposed (the dK/dV pass): st[4j + 2hh + e] is the score of key key_g + 8hh, query q0 + 8j +
// 2t + e, with the item's lse (natural log) and D per query in shared memory; queries at or past
// `len` and before the key give P = 0.
template <int J>
__device__ __forceinline__ void cols_to_p(float (&st)[4 * J], int key_g, int q0, int len, const float* lse_s,
                                          float scale_log2) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 4 * j + 2 * hh + e, qi = 8 * j + 2 * t + e, query = q0 + qi;
        st[i] = query < len && key_g + 8 * hh <= query ? exp2f(st[i] * scale_log2 - lse_s[qi] * kLog2e) : 0.f;
      }
}
template <int J>
__device__ __forceinline__ void cols_to_ds(float (&dpt)[4 * J], const float (&pt)[4 * J], const float* dsum_s) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < 4 * J; ++i) dpt[i] = pt[i] * (dpt[i] - dsum_s[8 * (i >> 2) + 2 * t + (i & 1)]);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace
}  // namespace cudablocks::cuda
