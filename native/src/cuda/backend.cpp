// The CUDA backend: forwards each op to its kernels in this folder, on the stream's handle.
#include <cuda_runtime.h>

#include "core/backends.hpp"
#include "cuda/adamw.cuh"
#include "cuda/attention.cuh"
#include "cuda/attention_mma.cuh"
#include "cuda/bias.cuh"
#include "cuda/cross_entropy.cuh"
#include "cuda/dropout.cuh"
#include "cuda/embedding.cuh"
#include "cuda/fill.cuh"
#include "cuda/gemm.cuh"
#include "cuda/low_rank.cuh"
#include "cuda/nf4.cuh"
#include "cuda/nf4_gemm.cuh"
#include "cuda/pool.cuh"
#include "cuda/qk_norm_rope.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/swiglu.cuh"
#include "cuda/to_bf16.cuh"
#include "cuda/transpose.cuh"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

cudaStream_t native(const Stream& stream) { return static_cast<cudaStream_t>(stream.handle()); }

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits,
            const Stream& stream) const override {
    cuda::fill(data, count, element_size, bits, native(stream));
  }

  void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                       std::int64_t cols, float eps, const Stream& stream) const override {
    cuda::rmsnorm_forward(x, w, y, rstd, rows, cols, eps, native(stream));
  }

  void rmsnorm_forward_bf16(const float* x, const float* w, std::uint16_t* y, float* rstd, std::int64_t rows,
                            std::int64_t cols, float eps, const Stream& stream) const override {
    cuda::rmsnorm_forward_bf16(x, w, y, rstd, rows, cols, eps, native(stream));
  }

  void rmsnorm_forward_transposed(const float* x, const float* w, const float* rstd, float* y_t, std::int64_t rows,
                                  std::int64_t cols, const Stream& stream) const override {
    cuda::rmsnorm_forward_transposed(x, w, rstd, y_t, rows, cols, native(stream));
  }

  void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, const float* residual,
                        float* dx, std::uint16_t* dx16, float* dw, std::int64_t rows, std::int64_t cols,
                        const Stream& stream) const override {
    cuda::rmsnorm_backward(dy, x, w, rstd, residual, dx, dx16, dw, rows, cols, native(stream));
  }

  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
            const float* b, float beta, float* c, Precision precision, const Stream& stream) const override {
    cuda::gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, precision, native(stream));
  }

  void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                 const std::uint16_t* a, const std::uint16_t* b, float beta, float* c,
                 const Stream& stream) const override {
    cuda::gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, native(stream));
  }

  void gemm_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                const float* a, const float* b, const float* addend, float* c, Precision precision,
                const Stream& stream) const override {
    cuda::gemm_add(trans_a, trans_b, m, n, k, alpha, a, b, addend, c, precision, native(stream));
  }
  void gemm_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                     const std::uint16_t* a, const std::uint16_t* b, const float* addend, float* c,
                     const Stream& stream) const override {
    cuda::gemm_bf16_add(trans_a, trans_b, m, n, k, alpha, a, b, addend, c, native(stream));
  }

  void gemm_bf16_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                         const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c,
                         const Stream& stream) const override {
    cuda::gemm_bf16_to_bf16(trans_a, trans_b, m, n, k, alpha, a, b, c, native(stream));
  }
  void gemm_bf16_to_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                             const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c,
                             const Stream& stream) const override {
    cuda::gemm_bf16_to_bf16_add(trans_a, trans_b, m, n, k, alpha, a, b, c, native(stream));
  }
  void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                    std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, float* out,
                    const Stream& stream) const override {
    cuda::add_low_rank(c, bias, u, v, v_row, v_col, rows, cols, rank, out, native(stream));
  }
  void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                    std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                    std::uint16_t* out, const Stream& stream) const override {
    cuda::add_low_rank(c, bias, u, v, v_row, v_col, rows, cols, rank, out, native(stream));
  }
  void to_bf16(const float* x, std::uint16_t* y, std::int64_t n, const Stream& stream) const override {
    cuda::to_bf16(x, y, n, native(stream));
  }
  void from_bf16(const std::uint16_t* x, float* y, std::int64_t n, const Stream& stream) const override {
    cuda::from_bf16(x, y, n, native(stream));
  }
  void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y,
                 const Stream& stream) const override {
    cuda::transpose(x, rows, cols, ld_x, y, native(stream));
  }

  void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols,
                const Stream& stream) const override {
    cuda::add_bias(y, bias, rows, cols, native(stream));
  }

  void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols,
                     const Stream& stream) const override {
    cuda::bias_backward(dy, dbias, rows, cols, native(stream));
  }

  void dropout(const float* x, float* out, std::int64_t n, double p, std::uint64_t key, bool accumulate,
               const Stream& stream) const override {
    cuda::dropout(x, out, n, p, key, accumulate, native(stream));
  }

  void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                            std::int64_t tokens, int n_heads, int head_dim, float eps, const float* inv_freq,
                            const Stream& stream) const override {
    cuda::qk_norm_rope_forward(x, w, y, rstd, positions, tokens, n_heads, head_dim, eps, inv_freq, native(stream));
  }

  void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                             const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim,
                             const float* inv_freq, const Stream& stream) const override {
    cuda::qk_norm_rope_backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq, native(stream));
  }
  void qk_norm_rope_forward(const std::uint16_t* x, const float* w, std::uint16_t* y, float* rstd,
                            const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, float eps,
                            const float* inv_freq, const Stream& stream) const override {
    cuda::qk_norm_rope_forward(x, w, y, rstd, positions, tokens, n_heads, head_dim, eps, inv_freq, native(stream));
  }
  void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd, float* dx,
                             float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim,
                             const float* inv_freq, const Stream& stream) const override {
    cuda::qk_norm_rope_backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq, native(stream));
  }
  void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd,
                             std::uint16_t* dx, float* dw, const std::int32_t* positions, std::int64_t tokens,
                             int n_heads, int head_dim, const float* inv_freq, const Stream& stream) const override {
    cuda::qk_norm_rope_backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq, native(stream));
  }

  void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                      const Stream& stream) const override {
    cuda::swiglu_forward(gate_up, out, rows, cols, native(stream));
  }
  void swiglu_forward(const std::uint16_t* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                      const Stream& stream) const override {
    cuda::swiglu_forward(gate_up, out, rows, cols, native(stream));
  }
  void swiglu_forward_transposed(const float* gate_up, float* out_t, std::int64_t rows, std::int64_t cols,
                                 const Stream& stream) const override {
    cuda::swiglu_forward_transposed(gate_up, out_t, rows, cols, native(stream));
  }
  void swiglu_forward(const std::uint16_t* gate_up, std::uint16_t* out, std::int64_t rows, std::int64_t cols,
                      const Stream& stream) const override {
    cuda::swiglu_forward(gate_up, out, rows, cols, native(stream));
  }

  void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows, std::int64_t cols,
                       const Stream& stream) const override {
    cuda::swiglu_backward(dout, gate_up, d_gate_up, rows, cols, native(stream));
  }
  void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, float* d_gate_up, std::int64_t rows,
                       std::int64_t cols, const Stream& stream) const override {
    cuda::swiglu_backward(dout, gate_up, d_gate_up, rows, cols, native(stream));
  }
  void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, std::uint16_t* d_gate_up,
                       std::int64_t rows, std::int64_t cols, const Stream& stream) const override {
    cuda::swiglu_backward(dout, gate_up, d_gate_up, rows, cols, native(stream));
  }

  void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                         const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                         int n_q_heads, int n_kv_heads, int head_dim, float scale, Precision precision,
                         const Stream& stream) const override {
    cuda::attention_forward_mma(q, k, v, out, lse, cu_seqlens, n_seqs, max_seqlen, tokens, n_q_heads,
                                n_kv_heads, head_dim, scale, precision, native(stream));
  }

  std::int64_t attention_workspace_floats(std::int64_t tokens, int n_q_heads, int n_kv_heads,
                                          int head_dim) const override {
    return cuda::attention_backward_workspace_floats(tokens, n_q_heads, n_kv_heads, head_dim);
  }

  void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
                          const float* lse, float* dq, float* dk, float* dv, float* workspace,
                          const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                          int n_q_heads, int n_kv_heads, int head_dim, float scale, Precision precision,
                          const Stream& stream) const override {
    cuda::attention_backward_mma(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs, max_seqlen,
                                 tokens, n_q_heads, n_kv_heads, head_dim, scale, precision, native(stream));
  }

  void attention_forward(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v, std::uint16_t* out,
                         float* lse, const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                         int n_q_heads, int n_kv_heads, int head_dim, float scale,
                         const Stream& stream) const override {
    cuda::attention_forward_mma(q, k, v, out, lse, cu_seqlens, n_seqs, max_seqlen, tokens, n_q_heads, n_kv_heads,
                                head_dim, scale, native(stream));
  }
  void attention_backward(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                          const std::uint16_t* out, const std::uint16_t* dout, const float* lse, float* dq, float* dk, float* dv, float* workspace,
                          const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                          int n_q_heads, int n_kv_heads, int head_dim, float scale,
                          const Stream& stream) const override {
    cuda::attention_backward_mma(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs, max_seqlen,
                                 tokens, n_q_heads, n_kv_heads, head_dim, scale, native(stream));
  }

  void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                  const AdamWHyper& hyper, const float* grad_sum_squares, std::uint16_t* param_bf16,
                  const Stream& stream) const override {
    cuda::adamw_step(param, grad, exp_avg, exp_avg_sq, n, hyper, grad_sum_squares, param_bf16, native(stream));
  }

  void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate, const Stream& stream) const override {
    cuda::sum_squares(x, n, out, accumulate, native(stream));
  }

  // The classification head
  void embedding_forward(const std::int32_t* ids, const void* table, DType table_dtype, float* out,
                         std::int64_t tokens, std::int64_t vocab, std::int64_t hidden,
                         const Stream& stream) const override {
    cuda::embedding_forward(ids, table, table_dtype, out, tokens, vocab, hidden, native(stream));
  }

  void embedding_backward(const float* grad_out, const std::int32_t* rows, const std::int32_t* offsets,
                          const std::int32_t* order, float* grad_table, std::int64_t unique_rows,
                          std::int64_t order_len, std::int64_t tokens, std::int64_t vocab, std::int64_t hidden,
                          const Stream& stream) const override {
    cuda::embedding_backward(grad_out, rows, offsets, order, grad_table, unique_rows, order_len, tokens, vocab, hidden,
                             native(stream));
  }

  void pool_forward(const float* x, const std::int32_t* cu_seqlens, float* out, std::int64_t n_seqs,
                    std::int64_t tokens, std::int64_t hidden, PoolMode mode, const Stream& stream) const override {
    cuda::pool_forward(x, cu_seqlens, out, n_seqs, tokens, hidden, mode, native(stream));
  }

  void pool_backward(const float* dout, const std::int32_t* cu_seqlens, float* dx, std::int64_t n_seqs,
                     std::int64_t tokens, std::int64_t hidden, PoolMode mode, const Stream& stream) const override {
    cuda::pool_backward(dout, cu_seqlens, dx, n_seqs, tokens, hidden, mode, native(stream));
  }

  void cross_entropy(const float* logits, const std::int32_t* labels, const float* class_weights, float* loss_sum,
                     float* dlogits, float* probs, float grad_scale, std::int64_t batch, std::int64_t classes,
                     const Stream& stream) const override {
    cuda::cross_entropy(logits, labels, class_weights, loss_sum, dlogits, probs, grad_scale, batch, classes,
                        native(stream));
  }

  // NF4
  void nf4_quantize(const void* x, DType dtype, std::int64_t n, int blocksize, std::uint8_t* packed, float* absmax,
                    const Stream& stream) const override {
    cuda::nf4_quantize(x, dtype, n, blocksize, packed, absmax, native(stream));
  }

  void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize, void* out,
                      DType out_dtype, const Stream& stream) const override {
    cuda::nf4_dequantize(packed, absmax, n, blocksize, out, out_dtype, native(stream));
  }

  void nf4_absmax_mean(const float* absmax, std::int64_t n, float* offset, const Stream& stream) const override {
    cuda::nf4_absmax_mean(absmax, n, offset, native(stream));
  }

  void nf4_double_quantize(const float* absmax, std::int64_t n, const float* offset, const float* code,
                           std::uint8_t* qabsmax, float* absmax2, const Stream& stream) const override {
    cuda::nf4_double_quantize(absmax, n, offset, code, qabsmax, absmax2, native(stream));
  }

  void nf4_double_dequantize(const std::uint8_t* qabsmax, const float* absmax2, const float* offset,
                             const float* code, std::int64_t n, float* absmax, const Stream& stream) const override {
    cuda::nf4_double_dequantize(qabsmax, absmax2, offset, code, n, absmax, native(stream));
  }

  bool nf4_gemm_fused(std::int64_t k, int blocksize, const Stream&) const override {
    return cuda::nf4_gemm_supported(k, blocksize);
  }
  void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                     bool transposed, const float* addend, float* c, std::uint16_t* c16, bool add_c16,
                     const Stream& stream) const override {
    cuda::nf4_gemm_bf16(a, w, parts, m, k, transposed, addend, c, c16, add_c16, native(stream));
  }
};

}  // namespace

const Backend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace cudablocks
