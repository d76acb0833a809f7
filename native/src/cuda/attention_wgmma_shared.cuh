// Pieces shared by the tf32 (attention_wgmma.cu) and bf16 (attention_wgmma_bf16.cu) wgmma attention
// kernels: their geometry, the aligned shared-memory base, a forward or dQ block's heads and
// sequence, and the store of a 64 x 128 fp32 accumulator. Internal to those two files.
#pragma once

#include <cstdint>

namespace cudablocks::cuda {
namespace {

constexpr int kD = 128;        // head_dim
constexpr int kTile = 64;      // query rows per warpgroup (wgmma's M), keys per forward tile
constexpr int kThreads = 256;  // two warpgroups
constexpr int kKeys = 32;      // keys per tile of the dQ pass, queries per item of the dK/dV pass
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;

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
// mul[hh], to dst + row * stride (dst: the tile's row 0, its head's column 0).
__device__ __forceinline__ void store_tile_rows(float* dst, std::int64_t stride, const float (&acc)[64], int row0,
                                                int valid, const float (&mul)[2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = row0 + g + 8 * hh;
    if (r >= valid) continue;
    float* p = dst + r * stride + 2 * t;
#pragma unroll
    for (int nb = 0; nb < 16; ++nb) {
      *reinterpret_cast<float2*>(p + 8 * nb) =
          make_float2(acc[4 * nb + 2 * hh] * mul[hh], acc[4 * nb + 2 * hh + 1] * mul[hh]);
    }
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace
}  // namespace cudablocks::cuda
