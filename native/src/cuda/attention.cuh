// Causal grouped-query attention over packed variable-length sequences: CUDA, fp32.
//
// Same contract as the CPU reference (native/src/cpu/attention.hpp), plus a trailing stream:
//   Packed tokens: T = cu_seqlens[n_seqs]; sequence s occupies rows [cu_seqlens[s], cu_seqlens[s+1]).
//   q [T, n_q_heads*head_dim], k/v [T, n_kv_heads*head_dim], out [T, n_q_heads*head_dim], lse [T, n_q_heads]
//   (row-major fp32; lse is the natural-log log-sum-exp of each query row's scaled, masked scores).
//   kv head of q head h = h / (n_q_heads / n_kv_heads).
//
// All pointers, cu_seqlens included, are device pointers; float pointers must be 16-byte aligned.
// max_seqlen (host) only sizes the grid: results are correct for any value >= 1 (blocks loop over
// tiles beyond the grid), but the kernels are fastest when it is the true longest sequence.
// head_dim: any multiple of 4 up to 128 (64 and 128 are the tuned cases). Arguments that cannot
// be served throw InvalidArgumentError; CUDA errors throw CudaError. cu_seqlens is not
// validated (it lives on the device): the caller checks it on the host.
//
// Every output element is written (rows of empty sequences do not exist); nothing accumulates.
// Results are deterministic: no atomics, fixed reduction orders.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace cudablocks::cuda {

// Scratch floats attention_backward needs in `workspace`, for any batch of up to total_tokens tokens:
// rowsum(dout*out) per (token, q head), plus, for GQA groups larger than 2, part of the partial
// dK/dV slabs of the split dK/dV pass (used when there are too few kv tiles to fill the GPU; dq,
// which is written last, holds the other slabs meanwhile; see attention.cu).
// Qwen3-4B (32/8 heads, d 128) at 4096 tokens: 8.5M floats (34 MB).
int64_t attention_backward_workspace_floats(int64_t total_tokens, int n_q_heads, int n_kv_heads,
                                            int head_dim);

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                       const int32_t* cu_seqlens, int n_seqs, int max_seqlen, int64_t total_tokens,
                       int n_q_heads, int n_kv_heads, int head_dim, float scale,
                       cudaStream_t stream = nullptr);

// Given dout (and out, lse from the forward), overwrite dq, dk, dv (three distinct buffers, none
// aliasing an input; dq is also used as scratch before its final values are written).
void attention_backward(const float* q, const float* k, const float* v, const float* out,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv,
                        float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                        int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim,
                        float scale, cudaStream_t stream = nullptr);

namespace detail {
// attention_backward with the number of query-head splits of the dK/dV pass forced
// (1 .. n_q_heads/n_kv_heads; 0 = the heuristic attention_backward uses). For tests and benchmarks.
void attention_backward_with_splits(const float* q, const float* k, const float* v,
                                    const float* out, const float* dout, const float* lse, float* dq,
                                    float* dk, float* dv, float* workspace,
                                    const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                                    int64_t total_tokens, int n_q_heads, int n_kv_heads,
                                    int head_dim, float scale, int kv_splits, cudaStream_t stream);
}  // namespace detail

}  // namespace cudablocks::cuda
