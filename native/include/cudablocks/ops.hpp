// Buffer-level ops: validate shapes, dtypes and devices, then run on the buffers' backend.
// These are what Python calls directly; blocks call the Backend on raw pointers.
#pragma once

#include "cudablocks/backend.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/optimizer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

// y = rmsnorm(x) * w for x, y [rows, cols] and w [cols], all float32 on the stream's device.
// rstd (optional, float32 [rows]) receives the per-row factors that rmsnorm_backward needs.
void rmsnorm_forward(const Buffer& x, const Buffer& w, Buffer& y, float eps, const Stream& stream,
                     Buffer* rstd = nullptr);

// The backward of rmsnorm_forward (Backend::rmsnorm_backward) with rstd [rows] from the forward:
// dx [rows, cols] written (added to when accumulate_dx); dw [cols] is always ADDED to.
void rmsnorm_backward(const Buffer& dy, const Buffer& x, const Buffer& w, const Buffer& rstd, Buffer& dx, Buffer& dw,
                      bool accumulate_dx, const Stream& stream);

// out [M, N] = op(a) op(b) + beta * out, op(a) = a [M, K] or, with trans_a, a^T for a [K, M];
// op(b) = b [K, N] or, with trans_b, b^T for b [N, K]. a and b float32 (Backend::gemm in
// `precision`) or both bfloat16 (Backend::gemm_bf16; precision must then be BF16); out float32, or
// bfloat16 with bfloat16 operands (Backend::gemm_bf16_to_bf16, or gemm_bf16_to_bf16_add with
// beta 1; beta must be 0 or 1); all on the stream's device.
void gemm(const Buffer& a, const Buffer& b, Buffer& out, bool trans_a, bool trans_b, float beta, Precision precision,
          const Stream& stream);

// LoRA dropout (Backend::dropout) of float32 x into out, both of the same shape on the stream's
// device (out may be x itself): the kept elements times 1 / (1 - p), the dropped ones 0; with
// accumulate, out += that. The mask is the hash of `key` and the flat element index
// (src/core/dropout_hash.hpp). InvalidArgumentError for p outside [0, 1).
void dropout(const Buffer& x, Buffer& out, double p, std::uint64_t key, bool accumulate, const Stream& stream);

// The classification head (Backend documents the math and what out-of-range values do).
// out float32 [T, H] = table [V, H] (float32 or bfloat16) at ids int32 [T].
void embedding_forward(const Buffer& ids, const Buffer& table, Buffer& out, const Stream& stream);
// grad_table float32 [V, H] += grad_out float32 [T, H] scattered by rows int32 [U], offsets int32
// [U + 1] and order int32 [T'] (cudablocks.ops.embedding_backward_index makes them).
void embedding_backward(const Buffer& grad_out, const Buffer& rows, const Buffer& offsets, const Buffer& order,
                        Buffer& grad_table, const Stream& stream);
// out float32 [B, H] pooled from x float32 [T, H] with cu_seqlens int32 [B + 1].
void pool_forward(const Buffer& x, const Buffer& cu_seqlens, Buffer& out, PoolMode mode, const Stream& stream);
// dx float32 [T, H] (all written) from dout float32 [B, H].
void pool_backward(const Buffer& dout, const Buffer& cu_seqlens, Buffer& dx, PoolMode mode, const Stream& stream);
// loss_sum float32 [1] += the weighted loss of logits float32 [B, C] against labels int32 [B];
// dlogits and probs float32 [B, C] optional outputs, class_weights float32 [C] optional.
void cross_entropy(const Buffer& logits, const Buffer& labels, Buffer& loss_sum, Buffer* dlogits, Buffer* probs,
                   const Buffer* class_weights, float grad_scale, const Stream& stream);

// One AdamW step (cudablocks/optimizer.hpp) in place over float32 buffers of equal element count,
// each starting on a 16-byte boundary. grad_sum_squares: nullptr, or a float32 [1] buffer holding
// the squared global gradient norm (GradNorm::sum_squares()), for clipping to
// hyper.max_grad_norm and the skip of a step whose norm is not finite.
void adamw_step(Buffer& param, const Buffer& grad, Buffer& exp_avg, Buffer& exp_avg_sq, const AdamWHyper& hyper,
                const Buffer* grad_sum_squares, const Stream& stream);

}  // namespace cudablocks
