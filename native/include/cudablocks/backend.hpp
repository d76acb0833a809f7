// The op interface. Every op has a CPU reference implementation (native/src/cpu/) and a CUDA
// one (native/src/cuda/) at the same relative path; a Backend routes to one set of them. Blocks
// and the pipeline are written once against this interface.
//
// Ops take raw pointers into buffers of the backend's device, explicit sizes and a stream, and
// do no validation: callers (the Buffer-level functions in ops.hpp, the blocks) check first.
// Matrices are row-major.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cudablocks/device.hpp"
#include "cudablocks/dtype.hpp"
#include "cudablocks/optimizer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

// How gemm computes: IEEE fp32, tf32 tensor cores, or (BF16) fp32 buffers multiplied as bf16 with
// fp32 accumulation (cuBLAS's FAST_16BF, no faster than tf32: blocks in bf16 mode call gemm_bf16
// on genuine bf16 operands instead). The CPU backend's gemm always computes in fp32.
enum class Precision { FP32, TF32, BF16 };

// How a sequence's token rows become one row for a sequence classifier: its last token (as
// transformers' *ForSequenceClassification models pool), or the mean of its tokens.
enum class PoolMode { Last, Mean };

// One frozen NF4 weight's rows as the fused NF4 GEMM reads them: packed [rows * k / 2] bytes in
// bitsandbytes' layout and absmax [rows * k / 64] fp32 (blocks of 64 along each row of k).
struct Nf4Rows {
  const std::uint8_t* packed;
  const float* absmax;
  std::int64_t rows;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Sets `count` elements of `element_size` bytes (1, 2 or 4) to the bit pattern `bits`.
  virtual void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits,
                    const Stream& stream) const = 0;

  // RMSNorm over the rows of x [rows, cols]:
  //   y[r, :] = x[r, :] * rstd[r] * w,  rstd[r] = 1 / sqrt(mean(x[r, :]^2) + eps).
  // rstd may be nullptr; when given, it receives the per-row factor (saved for the backward).
  virtual void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd,
                               std::int64_t rows, std::int64_t cols, float eps,
                               const Stream& stream) const = 0;
  // The same with y written as bf16 (bit patterns, rounded from the fp32 result): the operand of a
  // bf16 GEMM without an fp32 copy.
  virtual void rmsnorm_forward_bf16(const float* x, const float* w, std::uint16_t* y, float* rstd,
                                    std::int64_t rows, std::int64_t cols, float eps,
                                    const Stream& stream) const = 0;
  // y^T [cols, rows]: rmsnorm_forward's y recomputed from its rstd [rows] and written transposed,
  // y^T[c, r] = w[c] * (x[r, c] * rstd[r]) (the same bits): a tf32 weight gradient's k-major
  // operand without a row-major copy and a transpose pass (see transpose).
  virtual void rmsnorm_forward_transposed(const float* x, const float* w, const float* rstd, float* y_t,
                                          std::int64_t rows, std::int64_t cols, const Stream& stream) const = 0;

  // dx = residual + d/dx of rmsnorm_forward given dy, with rstd saved by the forward. residual:
  // nullptr (dx is written), dx itself (added to dx), or another [rows, cols] buffer: the residual
  // path's gradient joins in the same pass, with no copy. dx16 (nullptr: none) receives dx rounded to
  // bf16 as well (a bf16 product's operand, without a conversion pass over dx). dw[c] += sum_r
  // dy[r, c] * x[r, c] * rstd[r]; dw == nullptr skips it (a frozen norm).
  virtual void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd,
                                const float* residual, float* dx, std::uint16_t* dx16, float* dw, std::int64_t rows,
                                std::int64_t cols, const Stream& stream) const = 0;

  // C[M, N] = alpha * op(A) op(B) + beta * C, row-major and contiguous. op(A) is A [M, K], or
  // A^T for A [K, M] when trans_a; op(B) is B [K, N], or B^T for B [N, K] when trans_b.
  // With beta = 0, C is not read (may hold NaN).
  virtual void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                    const float* a, const float* b, float beta, float* c, Precision precision,
                    const Stream& stream) const = 0;

  // The same product with bf16 operands: a and b hold bf16 bit patterns (the layouts of gemm),
  // accumulation is fp32 and C is fp32 (beta as in gemm; beta = 1 accumulates weight gradients).
  // On tensor cores on CUDA; the CPU computes the exact bf16 x bf16 products in fp32 (a product of
  // two bf16 values is exact in fp32), so both differ only in the order of the fp32 sums.
  virtual void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                         const std::uint16_t* a, const std::uint16_t* b, float beta, float* c,
                         const Stream& stream) const = 0;
  // c = alpha op(a) op(b) + addend: gemm / gemm_bf16 with C read from addend [M, N], which may be c
  // itself or another buffer (not partly overlapping c). A residual joins the product in its
  // epilogue (CUDA: cuBLASLt, whose C and D may differ) instead of a pass of its own.
  virtual void gemm_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                        const float* a, const float* b, const float* addend, float* c, Precision precision,
                        const Stream& stream) const = 0;
  virtual void gemm_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                             const std::uint16_t* a, const std::uint16_t* b, const float* addend, float* c,
                             const Stream& stream) const = 0;
  // c = alpha op(a) op(b) as gemm_bf16 computes it (beta 0), written as bf16: a product whose
  // result is only read as bf16 (bf16 mode's gate_up, q and k). The CPU rounds the fp32 sum to
  // nearest even; cuBLAS converts its fp32 accumulator (the tests allow one bf16 ulp between them).
  virtual void gemm_bf16_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                                 float alpha, const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c,
                                 const Stream& stream) const = 0;
  // c = alpha op(a) op(b) + c, c in bf16 on both sides. The CPU adds c to the fp32 sum and rounds
  // once; CUDA is cuBLAS's epilogue with beta 1, which may round the product to bf16 before adding c
  // (as a sum of two bf16 outputs does). A bf16 LoRA term written into c first joins the product
  // so, without an fp32 result of its own.
  virtual void gemm_bf16_to_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                                     float alpha, const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c,
                                     const Stream& stream) const = 0;
  // The LoRA term of a product joined to its fp32 result c [rows, cols] in one pass:
  //   out[t, n] = c[t, n] + bias[n] + sum_{j < rank} u[t, j] * v[n * v_row + j * v_col]
  // c may be nullptr (read as zeros: the term alone, for a product to add itself onto with
  // gemm_bf16_to_bf16_add or gemm_bf16_add).
  // u [rows, rank] and v in bf16 (bit patterns: v is B [cols, rank] with v_row = rank, v_col = 1, or
  // A [rank, cols] with v_row = 1, v_col = cols); bias may be nullptr. The products of bf16 values
  // are exact and summed in fp32: by the CPU in that order, by CUDA's tensor cores in an order of
  // their own (a few fp32 ulps apart). out is fp32 (may be c) or bf16, rounded once to nearest even.
  virtual void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                            std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                            float* out, const Stream& stream) const = 0;
  virtual void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                            std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                            std::uint16_t* out, const Stream& stream) const = 0;
  // y[i] = bf16(x[i]) over n elements, rounded to nearest even (y holds bf16 bit patterns).
  virtual void to_bf16(const float* x, std::uint16_t* y, std::int64_t n, const Stream& stream) const = 0;
  // y[i] = the bf16 value x[i] as fp32 (exact) over n elements.
  virtual void from_bf16(const std::uint16_t* x, float* y, std::int64_t n, const Stream& stream) const = 0;

  // y[j, i] = x[i, j] for x [rows, cols] whose rows are ld_x floats apart; y is [cols, rows], dense
  // (the k-major operands of a tf32 weight gradient: see the fp32 block's backward). ld_x >= cols;
  // y must not overlap x.
  virtual void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y,
                         const Stream& stream) const = 0;

  // y[r, :] += bias for y [rows, cols].
  virtual void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols,
                        const Stream& stream) const = 0;
  // dbias[c] += sum_r dy[r, c].
  virtual void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols,
                             const Stream& stream) const = 0;

  // LoRA dropout (inverted, PEFT's lora_dropout) over n elements: out[i] = x[i] * scale(p) for the
  // elements kept under `key`, 0 for the dropped ones; with accumulate, out[i] += x[i] * scale(p)
  // for the kept ones and dropped ones leave out as it is. The mask is a hash of (key, i), p in
  // [0, 1) (src/core/dropout_hash.hpp: the same bits on every backend). out may alias x.
  virtual void dropout(const float* x, float* out, std::int64_t n, double p, std::uint64_t key, bool accumulate,
                       const Stream& stream) const = 0;

  // Per-head RMSNorm (optional) then rotary embedding, for q or k laid out [T, n_heads * d]:
  //   h = w == nullptr ? x : x_head * rstd * w   (rstd per (token, head), eps as for RMSNorm)
  //   y = rope(h): pairs (i, i + d/2) rotated by the fp32 angle positions[t] * inv_freq[i].
  // inv_freq [d/2] (TransformerConfig::rope_inv_freq(), on the backend's device) carries theta and
  // any RoPE scaling. rstd [T * n_heads] receives the norm factors when w != nullptr (saved for the backward).
  virtual void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd,
                                    const std::int32_t* positions, std::int64_t tokens, int n_heads,
                                    int head_dim, float eps, const float* inv_freq, const Stream& stream) const = 0;
  // The backward of qk_norm_rope_forward: dx written; dw[i] += its gradient (when w != nullptr;
  // dw == nullptr skips it: a frozen norm).
  virtual void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd,
                                     float* dx, float* dw, const std::int32_t* positions, std::int64_t tokens,
                                     int n_heads, int head_dim, const float* inv_freq, const Stream& stream) const = 0;
  // The backward with x in bf16 (bit patterns, widened exactly): bf16-mode blocks keep q and k
  // before the norm in bf16, as their products write them.
  virtual void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd,
                                     float* dx, float* dw, const std::int32_t* positions, std::int64_t tokens,
                                     int n_heads, int head_dim, const float* inv_freq, const Stream& stream) const = 0;
  // The forward with x and y in bf16 (x widened exactly, y rounded to nearest even from the same
  // fp32 result): bf16 mode's attention reads q and k so.
  virtual void qk_norm_rope_forward(const std::uint16_t* x, const float* w, std::uint16_t* y, float* rstd,
                                    const std::int32_t* positions, std::int64_t tokens, int n_heads,
                                    int head_dim, float eps, const float* inv_freq, const Stream& stream) const = 0;
  // The backward with dx in bf16 too (rounded likewise): bf16 mode without q/k biases, where dq and
  // dk only feed bf16 products.
  virtual void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd,
                                     std::uint16_t* dx, float* dw, const std::int32_t* positions,
                                     std::int64_t tokens, int n_heads, int head_dim, const float* inv_freq,
                                     const Stream& stream) const = 0;

  // SwiGLU on gate_up [rows, 2 * cols] (gate in columns [0, cols), up in [cols, 2 * cols)):
  //   out[r, c] = silu(gate[r, c]) * up[r, c],  out [rows, cols],
  // and its backward: d_gate_up [rows, 2 * cols] from dout [rows, cols] and the forward's gate_up.
  // gate_up and the result are each fp32 (float) or bf16 (std::uint16_t bit patterns): bf16-mode
  // blocks keep gate_up in bf16 (half the bytes saved for the backward) and write a result that
  // only feeds a bf16 GEMM in bf16 (rounded to nearest even from the fp32 value, with no fp32
  // round trip through memory). The backward's dout is fp32 with fp32 gate_up, bf16 with bf16 gate_up
  // (bf16 mode: the down projection's input gradient as its product writes it). The arithmetic is
  // fp32 in every case.
  virtual void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                              const Stream& stream) const = 0;
  virtual void swiglu_forward(const std::uint16_t* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                              const Stream& stream) const = 0;
  virtual void swiglu_forward(const std::uint16_t* gate_up, std::uint16_t* out, std::int64_t rows,
                              std::int64_t cols, const Stream& stream) const = 0;
  // out^T [cols, rows]: the fp32 swiglu_forward's out written transposed (the same bits; as
  // rmsnorm_forward_transposed).
  virtual void swiglu_forward_transposed(const float* gate_up, float* out_t, std::int64_t rows, std::int64_t cols,
                                         const Stream& stream) const = 0;
  virtual void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows,
                               std::int64_t cols, const Stream& stream) const = 0;
  virtual void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, float* d_gate_up,
                               std::int64_t rows, std::int64_t cols, const Stream& stream) const = 0;
  virtual void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, std::uint16_t* d_gate_up,
                               std::int64_t rows, std::int64_t cols, const Stream& stream) const = 0;

  // Causal grouped-query attention over packed sequences; see src/cpu/attention.hpp for the
  // layout. cu_seqlens [n_seqs + 1] lives on the backend's device; lse [T, n_q_heads] is saved
  // for the backward, which overwrites dq, dk, dv and needs attention_workspace_floats() scratch.
  // precision: FP32 computes the products in IEEE fp32; TF32 / BF16 use tensor cores (operands
  // rounded to tf32 / bf16, fp32 accumulation, softmax in fp32) where the backend has such kernels
  // (CUDA: head_dim 64 and 128; other head dims fall back to fp32). The CPU backend ignores it.
  virtual void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                                 const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                                 std::int64_t tokens, int n_q_heads, int n_kv_heads, int head_dim,
                                 float scale, Precision precision, const Stream& stream) const = 0;
  virtual std::int64_t attention_workspace_floats(std::int64_t tokens, int n_q_heads, int n_kv_heads,
                                                  int head_dim) const = 0;
  virtual void attention_backward(const float* q, const float* k, const float* v, const float* out,
                                  const float* dout, const float* lse, float* dq, float* dk, float* dv,
                                  float* workspace, const std::int32_t* cu_seqlens, int n_seqs,
                                  int max_seqlen, std::int64_t tokens, int n_q_heads, int n_kv_heads,
                                  int head_dim, float scale, Precision precision,
                                  const Stream& stream) const = 0;
  // The same two with q, k, v, out and dout in bf16 (bit patterns): bf16 mode's blocks keep them so
  // (their producers round them once, as the BF16 kernels would on staging; out is the o
  // projection's bf16 operand, dout the bf16 output of the product before), so the kernels read
  // them as they are: half the bytes, no conversion. out is rounded once to bf16; BF16 precision;
  // the CPU computes on their values.
  virtual void attention_forward(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                                 std::uint16_t* out, float* lse, const std::int32_t* cu_seqlens, int n_seqs,
                                 int max_seqlen, std::int64_t tokens, int n_q_heads, int n_kv_heads, int head_dim,
                                 float scale, const Stream& stream) const = 0;
  virtual void attention_backward(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                                  const std::uint16_t* out, const std::uint16_t* dout, const float* lse, float* dq,
                                  float* dk, float* dv, float* workspace, const std::int32_t* cu_seqlens, int n_seqs,
                                  int max_seqlen, std::int64_t tokens, int n_q_heads, int n_kv_heads, int head_dim,
                                  float scale, const Stream& stream) const = 0;

  // One AdamW step over n elements in place (cudablocks/optimizer.hpp). grad_sum_squares: nullptr,
  // or a device float holding the squared global gradient norm, for clipping and the skip of a
  // step whose norm is not finite. param_bf16: nullptr, or n bf16 values (8-byte aligned) that
  // receive bf16(param) after the update in the same pass (a bf16 copy of the weights for
  // gemm_bf16); a skipped step writes neither.
  virtual void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                          const AdamWHyper& hyper, const float* grad_sum_squares, std::uint16_t* param_bf16,
                          const Stream& stream) const = 0;
  // *out = sum of x[i]^2 (or *out += it when accumulate), summed in double; out is a device float.
  virtual void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate,
                           const Stream& stream) const = 0;

  // The classification head.
  // out[t, :] = float(table[ids[t], :]) for t < tokens, table [vocab, hidden] of table_dtype
  // Float32 or BFloat16 (bit patterns). An id outside [0, vocab) gives a zero row on CUDA (no
  // memory fault); the CPU backend throws InvalidArgumentError instead, before writing anything.
  virtual void embedding_forward(const std::int32_t* ids, const void* table, DType table_dtype, float* out,
                                 std::int64_t tokens, std::int64_t vocab, std::int64_t hidden,
                                 const Stream& stream) const = 0;
  // Deterministic scatter-add of the embedding gradient, grouped by row on the host
  // (rows distinct, offsets [unique_rows + 1] ascending from 0, order [order_len] token indices):
  //   grad_table[rows[u], :] += sum over j in [offsets[u], offsets[u + 1]) of grad_out[order[j], :],
  // summed in fp32 in that order, so both backends give the same bits. Out-of-range rows, offsets
  // or token indices are skipped on CUDA; the CPU throws InvalidArgumentError for them and for a
  // repeated row, before writing.
  virtual void embedding_backward(const float* grad_out, const std::int32_t* rows, const std::int32_t* offsets,
                                  const std::int32_t* order, float* grad_table, std::int64_t unique_rows,
                                  std::int64_t order_len, std::int64_t tokens, std::int64_t vocab,
                                  std::int64_t hidden, const Stream& stream) const = 0;
  // Pooling of packed sequences x [tokens, hidden] with cu_seqlens [n_seqs + 1] (on the device;
  // cu_seqlens[0] = 0, strictly increasing, cu_seqlens[n_seqs] = tokens): out [n_seqs, hidden]
  // is row cu_seqlens[b + 1] - 1 of x (Last) or the mean of rows [cu_seqlens[b], cu_seqlens[b + 1])
  // (Mean). pool_backward writes all of dx [tokens, hidden]: dout[b] into the pooled row and zeros
  // elsewhere (Last), dout[b] / len_b into every row of sequence b (Mean). Invalid cu_seqlens give
  // zero rows on CUDA and InvalidArgumentError on the CPU.
  virtual void pool_forward(const float* x, const std::int32_t* cu_seqlens, float* out, std::int64_t n_seqs,
                            std::int64_t tokens, std::int64_t hidden, PoolMode mode, const Stream& stream) const = 0;
  virtual void pool_backward(const float* dout, const std::int32_t* cu_seqlens, float* dx, std::int64_t n_seqs,
                             std::int64_t tokens, std::int64_t hidden, PoolMode mode, const Stream& stream) const = 0;
  // Weighted cross-entropy of logits [batch, classes] against labels [batch] in [0, classes), with
  // w = class_weights [classes] (nullptr: ones). In fp32 with max subtraction:
  //   *loss_sum += sum_i w[y_i] * (logsumexp(logits_i) - logits_i[y_i])   (one fixed-order sum)
  //   dlogits_i  = grad_scale * w[y_i] * (softmax(logits_i) - onehot(y_i))  (when dlogits != nullptr)
  //   probs_i    = softmax(logits_i)                                      (when probs != nullptr)
  // A label out of range: the row contributes nothing on CUDA (zero loss and dlogits); the CPU
  // throws InvalidArgumentError, before writing.
  virtual void cross_entropy(const float* logits, const std::int32_t* labels, const float* class_weights,
                             float* loss_sum, float* dlogits, float* probs, float grad_scale, std::int64_t batch,
                             std::int64_t classes, const Stream& stream) const = 0;

  // NF4
  // bitsandbytes' NF4 format bit for bit (src/core/nf4_format.hpp, semantics in src/cpu/nf4.hpp).
  // x: n elements of dtype Float32/BFloat16/Float16; packed [(n + 1) / 2] (element 2j in the high
  // nibble of byte j); absmax [ceil(n / blocksize)] fp32; blocksize a power of two in [32, 4096].
  virtual void nf4_quantize(const void* x, DType dtype, std::int64_t n, int blocksize, std::uint8_t* packed,
                            float* absmax, const Stream& stream) const = 0;
  // out [n] of out_dtype = code[nibble] * absmax[i / blocksize] in fp32, rounded once.
  virtual void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize,
                              void* out, DType out_dtype, const Stream& stream) const = 0;
  // Double quantization of absmax [n]: *offset (one device float) = mean(absmax); then qabsmax [n]
  // = 8-bit codes under `code` (256 sorted device floats) of absmax - *offset in blocks of 256,
  // absmax2 [ceil(n / 256)] their fp32 scales; and the inverse, absmax = code[q] * absmax2 + *offset.
  virtual void nf4_absmax_mean(const float* absmax, std::int64_t n, float* offset, const Stream& stream) const = 0;
  virtual void nf4_double_quantize(const float* absmax, std::int64_t n, const float* offset, const float* code,
                                   std::uint8_t* qabsmax, float* absmax2, const Stream& stream) const = 0;
  virtual void nf4_double_dequantize(const std::uint8_t* qabsmax, const float* absmax2, const float* offset,
                                     const float* code, std::int64_t n, float* absmax,
                                     const Stream& stream) const = 0;

  // The fused NF4 GEMM: c[m, n] = a[m, k] W^T where W [n, k] stacks the rows of `parts` NF4
  // weights (n = the sum of their rows), each element decoded as nf4_dequantize decodes it to bf16;
  // a holds bf16 [m, k]; the products are exact and summed in fp32. transposed (the input
  // gradient): c[m, k] = a[m, n] W instead, n a multiple of 8. c is fp32 with the addend added
  // (nullptr, c itself, or another buffer of c's shape), or, when c16 is given, the sum (plus c16's
  // own values when add_c16) is written as bf16 instead, rounded once (c and addend unused). CUDA
  // decodes inside the kernel (no bf16 copy of W in memory); the CPU dequantizes and multiplies as
  // gemm_bf16 does. nf4_gemm_fused says whether it runs for W's columns k and block size on the
  // stream's device (CUDA: a build for sm_90a on a compute capability 9.0 device; both: k % 64 == 0,
  // blocks of 64).
  virtual bool nf4_gemm_fused(std::int64_t k, int blocksize, const Stream& stream) const = 0;
  virtual void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                             bool transposed, const float* addend, float* c, std::uint16_t* c16, bool add_c16,
                             const Stream& stream) const = 0;
};

// The backend that runs work on `device`. Throws DeviceError for CUDA when it was not built.
const Backend& backend_for(const Device& device);

}  // namespace cudablocks
