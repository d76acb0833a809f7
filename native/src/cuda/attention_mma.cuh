// Causal GQA attention over packed variable-length sequences on tensor cores (mma.sync), for the
// block's "bf16" and "tf32" precision modes. Same fp32-in / fp32-out contract as the fp32 kernels
// (native/src/cuda/attention.cuh, layout in native/src/cpu/attention.hpp): q, k, v, out, dout, lse
// fp32 in global memory; dq, dk, dv overwritten; the same workspace
// (attention_backward_workspace_floats: D = rowsum(dout * out), and, when the dK/dV pass splits a
// GQA group over several blocks, partial dK/dV slabs laid out as in attention.cu).
//
// precision:
//   FP32  the fp32 SIMT kernels of attention.cu, unchanged (bitwise-deterministic, IEEE fp32).
//   BF16  operands rounded to bf16 (round to nearest even) as tiles are staged into shared memory,
//         mma.sync m16n8k16 bf16 -> fp32; P (and dS) rounded to bf16 for the P V (dS K, ...)
//         products; softmax, lse, D = rowsum(dout * out) and all accumulation in fp32.
//   TF32  the same with tf32 operands (cvt.rna.tf32.f32) and mma.sync m16n8k8 tf32 -> fp32; at
//         head_dim 128 with an even GQA group on an sm_90a build and device, the wgmma kernels of
//         attention_wgmma.cu instead (same rounding, same math; attention_wgmma_supported), and so
//         do the bf16-input overloads below with attention_wgmma_bf16.cu's.
// head_dim 64 and 128 run on tensor cores; any other head_dim falls back to the fp32 kernels
// (attention_mma_supported), and so does a call whose kernels need more shared memory per block
// than the GPU grants (tf32 at head_dim 128: backward 213 KB, fine on H100/H200's 227 KB, too much
// for A100's 163 KB, where the tf32 backward runs the fp32 kernels). Results of BF16/TF32 are deterministic too (no atomics: dQ is a
// separate pass; dK/dV of a GQA group are summed inside one block).
// Errors: InvalidArgumentError for arguments that cannot be served, CudaError
// (CudaError via check.hpp) for CUDA failures.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cudablocks/backend.hpp"

namespace cudablocks::cuda {

// True when attention_*_mma runs tensor-core kernels for this head_dim and precision.
bool attention_mma_supported(int head_dim, Precision precision);

void attention_forward_mma(const float* q, const float* k, const float* v, float* out, float* lse,
                           const int32_t* cu_seqlens, int n_seqs, int max_seqlen, int64_t total_tokens,
                           int n_q_heads, int n_kv_heads, int head_dim, float scale,
                           Precision precision, cudaStream_t stream);

void attention_backward_mma(const float* q, const float* k, const float* v, const float* out,
                            const float* dout, const float* lse, float* dq, float* dk, float* dv,
                            float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                            int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim,
                            float scale, Precision precision, cudaStream_t stream);

// The same with q, k, v, out and dout in bf16 (bit patterns; bf16 mode's blocks keep them so): the
// BF16 products on operands staged by copy, exactly what the fp32-input kernels compute on those
// values, with out rounded once to bf16 (lse stays fp32); where attention_wgmma_supported, the wgmma
// kernels: the same products and roundings, summed in another order. Head dims without tensor-core
// kernels run the fp32 kernels on fp32 copies in per-stream scratch.
void attention_forward_mma(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v, std::uint16_t* out,
                           float* lse, const int32_t* cu_seqlens, int n_seqs, int max_seqlen, int64_t total_tokens,
                           int n_q_heads, int n_kv_heads, int head_dim, float scale, cudaStream_t stream);
void attention_backward_mma(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                            const std::uint16_t* out, const std::uint16_t* dout, const float* lse, float* dq, float* dk,
                            float* dv, float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                            int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim, float scale,
                            cudaStream_t stream);

namespace detail {
// attention_backward_mma with the number of query-head splits of the dK/dV pass forced
// (1 .. n_q_heads/n_kv_heads; 0 = the heuristic). For tests and benchmarks.
void attention_backward_mma_with_splits(const float* q, const float* k, const float* v, const float* out,
                                        const float* dout, const float* lse, float* dq, float* dk, float* dv,
                                        float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                                        int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim,
                                        float scale, Precision precision, int kv_splits, cudaStream_t stream);

// Staging of the backward's tiles: 0 = synchronous loads + conversion in registers,
// 1 (the default) = cp.async into shared memory, converted there (bf16 dK/dV pass: through an fp32 landing tile,
// the next Q tile prefetched; tf32 dK/dV and dQ passes: rounded in place, transposed tiles built in
// shared memory, the next tiles prefetched), 2 = 1 and the bf16 dQ pass through a landing tile too
// (2 blocks per SM instead of 3), -1 = from the environment (CUDABLOCKS_ATTN_MMA_ASYNC=0, 1 or 2; unset: 1).
// Same results bit for bit in every mode (same rounding of the same operands, same products).
// Process-wide; for tests and benchmarks.
void set_attention_mma_async_staging(int mode);
}  // namespace detail

}  // namespace cudablocks::cuda
