// Causal grouped-query attention over packed variable-length sequences: CPU reference.
//
// Layout (shared with the CUDA backend, native/src/cuda/attention.cuh):
//   Packed tokens: T = cu_seqlens[n_seqs]; sequence s occupies rows [cu_seqlens[s], cu_seqlens[s+1]).
//   q    [T, n_q_heads * head_dim]   row-major fp32; head h occupies columns [h*head_dim, (h+1)*head_dim)
//   k, v [T, n_kv_heads * head_dim]
//   out  [T, n_q_heads * head_dim]
//   lse  [T, n_q_heads]   natural-log log-sum-exp of the scaled, masked scores of each query row
//   The kv head of q head h is h / (n_q_heads / n_kv_heads).
//   out = softmax(q k^T * scale + causal mask) v, per sequence; never attends across sequences.
//
// Backward, given dout (and the out, lse saved by the forward):
//   P  = exp(scale * q k^T - lse)            (causal, per sequence)
//   dv = P^T dout
//   dP = dout v^T,  D = rowsum(dout * out),  dS = P * (dP - D)
//   dq = scale * dS k,   dk = scale * dS^T q
// dq, dk, dv are overwritten (not accumulated). For GQA, dk/dv of a kv head sum over its query heads.
//
// This is the reference: plain loops, fp64 accumulation, single-threaded. All pointers are host
// pointers. max_seqlen is accepted for signature parity with CUDA and not needed here.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// Scratch floats attention_backward needs; the CPU backend needs none (returns 0, workspace may be null).
int64_t attention_backward_workspace_floats(int64_t total_tokens, int n_q_heads, int n_kv_heads,
                                            int head_dim);

// Throws InvalidArgumentError on inconsistent arguments (heads not divisible, cu_seqlens not
// starting at 0, decreasing, or not ending at total_tokens, ...).
void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                       const int32_t* cu_seqlens, int n_seqs, int max_seqlen, int64_t total_tokens,
                       int n_q_heads, int n_kv_heads, int head_dim, float scale);

void attention_backward(const float* q, const float* k, const float* v, const float* out,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv,
                        float* workspace, const int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                        int64_t total_tokens, int n_q_heads, int n_kv_heads, int head_dim,
                        float scale);

}  // namespace cudablocks::cpu
