// Causal GQA attention on Hopper's warpgroup tensor cores (wgmma, sm_90a), head_dim 128: the
// kernels that attention_mma.cu runs where they are supported, for Precision::TF32 (fp32 q, k, v,
// out, dout; operands rounded to tf32 by cvt.rna; attention_wgmma.cu) and for bf16 q, k, v, out,
// dout (attention_wgmma_bf16.cu). Same contract as attention_forward_mma / attention_backward_mma
// (layout in native/src/cpu/attention.hpp): lse in natural log, softmax and accumulation in fp32,
// dq, dk, dv in fp32, deterministic. The caller validates the arguments.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace cudablocks::cuda {

// True when the wgmma kernels (the forwards and backward passes below, tf32 and bf16) run here: an
// sm_90a build on a compute capability 9.0 device, head_dim 128, an even GQA group (two query
// heads per block share each K/V tile; callers have checked that n_q_heads is a positive multiple
// of n_kv_heads), enough shared memory (the tf32 kernels need the most), and not switched off
// (detail::set_attention_wgmma).
bool attention_wgmma_supported(int head_dim, int n_q_heads, int n_kv_heads);

// The forward over the grid (n_q_heads / 2, n_seqs, q_tiles): q_tiles 64-query tiles per sequence
// (tiles beyond a sequence's end exit; with fewer tiles than the longest sequence needs, blocks
// loop over the rest).
void attention_forward_wgmma_tf32(const float* q, const float* k, const float* v, float* out, float* lse,
                                  const int32_t* cu_seqlens, int n_seqs, unsigned q_tiles, int n_q_heads,
                                  int n_kv_heads, float scale, cudaStream_t stream);

// The backward's dQ pass (attention_mma.cu runs the row dots, dsum = rowsum(dout * out), and the
// dK/dV pass): dq = scale * dS K over the same grid as the forward; dq is overwritten.
void attention_dq_wgmma_tf32(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                             const float* dsum, float* dq, const int32_t* cu_seqlens, int n_seqs, unsigned q_tiles,
                             int n_q_heads, int n_kv_heads, float scale, cudaStream_t stream);

// The backward's dK/dV pass over the grid (n_kv_heads * splits, n_seqs, k_tiles): with splits > 1,
// split s > 0 of a GQA group writes its partial dK, dV to slabs 2 (s - 1) and 2 (s - 1) + 1 (slab i
// at slab_first + i * slab_size for i < slab_n_first, else in slab_rest), which the caller adds
// (attention_reduce_kernel); split 0 and splits == 1 overwrite dk, dv.
void attention_dkdv_wgmma_tf32(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                               const float* dsum, float* dk, float* dv, float* slab_first, float* slab_rest,
                               int slab_n_first, std::int64_t slab_size, const int32_t* cu_seqlens, int n_seqs,
                               unsigned k_tiles, int n_q_heads, int n_kv_heads, int splits, float scale,
                               cudaStream_t stream);

// The same three for bf16 q, k, v, out, dout (out written in bf16; P and dS rounded to bf16;
// k_tiles counts 64-key tiles as above, which the dK/dV pass takes two at a time).
void attention_forward_wgmma_bf16(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                                  std::uint16_t* out, float* lse, const int32_t* cu_seqlens, int n_seqs,
                                  unsigned q_tiles, int n_q_heads, int n_kv_heads, float scale, cudaStream_t stream);
void attention_dq_wgmma_bf16(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                             const std::uint16_t* dout, const float* lse, const float* dsum, float* dq,
                             const int32_t* cu_seqlens, int n_seqs, unsigned q_tiles, int n_q_heads, int n_kv_heads,
                             float scale, cudaStream_t stream);
void attention_dkdv_wgmma_bf16(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                               const std::uint16_t* dout, const float* lse, const float* dsum, float* dk, float* dv,
                               float* slab_first, float* slab_rest, int slab_n_first, std::int64_t slab_size,
                               const int32_t* cu_seqlens, int n_seqs, unsigned k_tiles, int n_q_heads,
                               int n_kv_heads, int splits, float scale, cudaStream_t stream);

namespace detail {
// 1: use the wgmma kernels where supported (the default); 0: the mma.sync kernels everywhere;
// -1: from the environment (CUDABLOCKS_ATTN_WGMMA=0 switches them off; unset or any other value:
// on). Process-wide; for tests and benchmarks.
void set_attention_wgmma(int mode);
}  // namespace detail

}  // namespace cudablocks::cuda
