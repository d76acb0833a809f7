// The CPU backend: forwards each op to its reference implementation in this folder.
#include <algorithm>
#include <vector>

#include "core/backends.hpp"
#include "cpu/adamw.hpp"
#include "cpu/attention.hpp"
#include "cpu/bias.hpp"
#include "cpu/cross_entropy.hpp"
#include "cpu/dropout.hpp"
#include "cpu/embedding.hpp"
#include "cpu/fill.hpp"
#include "cpu/gemm.hpp"
#include "cpu/low_rank.hpp"
#include "cpu/nf4.hpp"
#include "cpu/nf4_gemm.hpp"
#include "cpu/pool.hpp"
#include "cpu/qk_norm_rope.hpp"
#include "cpu/rmsnorm.hpp"
#include "cpu/swiglu.hpp"
#include "cpu/to_bf16.hpp"
#include "cpu/transpose.hpp"

namespace cudablocks {

namespace {

std::vector<float> widened(const std::uint16_t* x, std::int64_t n) {
  std::vector<float> y(static_cast<std::size_t>(n));
  cpu::from_bf16(x, y.data(), n);
  return y;
}

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }

  void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits,
            const Stream&) const override {
    cpu::fill(data, count, element_size, bits);
  }

  void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                       std::int64_t cols, float eps, const Stream&) const override {
    cpu::rmsnorm_forward(x, w, y, rstd, rows, cols, eps);
  }

  void rmsnorm_forward_bf16(const float* x, const float* w, std::uint16_t* y, float* rstd, std::int64_t rows,
                            std::int64_t cols, float eps, const Stream&) const override {
    std::vector<float> tmp(static_cast<std::size_t>(rows * cols));
    cpu::rmsnorm_forward(x, w, tmp.data(), rstd, rows, cols, eps);
    cpu::to_bf16(tmp.data(), y, rows * cols);
  }

  void rmsnorm_forward_transposed(const float* x, const float* w, const float* rstd, float* y_t, std::int64_t rows,
                                  std::int64_t cols, const Stream&) const override {
    cpu::rmsnorm_forward_transposed(x, w, rstd, y_t, rows, cols);
  }

  void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, const float* residual,
                        float* dx, std::uint16_t* dx16, float* dw, std::int64_t rows, std::int64_t cols,
                        const Stream&) const override {
    cpu::rmsnorm_backward(dy, x, w, rstd, residual, dx, dw, rows, cols);
    if (dx16 != nullptr) cpu::to_bf16(dx, dx16, rows * cols);
  }

  // The CPU computes every precision in fp32.
  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
            const float* a, const float* b, float beta, float* c, Precision, const Stream&) const override {
    cpu::gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
  }

  void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                 const std::uint16_t* a, const std::uint16_t* b, float beta, float* c, const Stream&) const override {
    cpu::gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
  }

  // The addend is copied into c and the product accumulated onto it (beta 1): one rounding of
  // alpha * sum + addend, as cuBLAS's epilogue does it.
  void gemm_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                const float* a, const float* b, const float* addend, float* c, Precision,
                const Stream&) const override {
    if (addend != c) std::copy(addend, addend + m * n, c);
    cpu::gemm(trans_a, trans_b, m, n, k, alpha, a, b, 1.0f, c);
  }
  void gemm_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                     const std::uint16_t* a, const std::uint16_t* b, const float* addend, float* c,
                     const Stream&) const override {
    if (addend != c) std::copy(addend, addend + m * n, c);
    cpu::gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, b, 1.0f, c);
  }

  void gemm_bf16_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                         const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c,
                         const Stream&) const override {
    product_to_bf16(trans_a, trans_b, m, n, k, alpha, a, b, false, c);
  }
  void gemm_bf16_to_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                             const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c,
                             const Stream&) const override {
    product_to_bf16(trans_a, trans_b, m, n, k, alpha, a, b, true, c);
  }
  void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                    std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, float* out,
                    const Stream&) const override {
    cpu::add_low_rank(c, bias, u, v, v_row, v_col, rows, cols, rank, out);
  }
  void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                    std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                    std::uint16_t* out, const Stream&) const override {
    cpu::add_low_rank(c, bias, u, v, v_row, v_col, rows, cols, rank, out);
  }
  void to_bf16(const float* x, std::uint16_t* y, std::int64_t n, const Stream&) const override {
    cpu::to_bf16(x, y, n);
  }
  void from_bf16(const std::uint16_t* x, float* y, std::int64_t n, const Stream&) const override {
    cpu::from_bf16(x, y, n);
  }
  void transpose(const float* x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x, float* y,
                 const Stream&) const override {
    cpu::transpose(x, rows, cols, ld_x, y);
  }

  void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols, const Stream&) const override {
    cpu::add_bias(y, bias, rows, cols);
  }

  void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols,
                     const Stream&) const override {
    cpu::bias_backward(dy, dbias, rows, cols);
  }

  void dropout(const float* x, float* out, std::int64_t n, double p, std::uint64_t key, bool accumulate,
               const Stream&) const override {
    cpu::dropout(x, out, n, p, key, accumulate);
  }

  void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                            std::int64_t tokens, int n_heads, int head_dim, float eps, const float* inv_freq,
                            const Stream&) const override {
    cpu::qk_norm_rope_forward(x, w, y, rstd, positions, tokens, n_heads, head_dim, eps, inv_freq);
  }

  void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                             float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads,
                             int head_dim, const float* inv_freq, const Stream&) const override {
    cpu::qk_norm_rope_backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq);
  }
  void qk_norm_rope_forward(const std::uint16_t* x, const float* w, std::uint16_t* y, float* rstd,
                            const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, float eps,
                            const float* inv_freq, const Stream&) const override {
    const std::vector<float> x32 = widened(x, tokens * n_heads * head_dim);
    std::vector<float> y32(x32.size());
    cpu::qk_norm_rope_forward(x32.data(), w, y32.data(), rstd, positions, tokens, n_heads, head_dim, eps, inv_freq);
    cpu::to_bf16(y32.data(), y, tokens * n_heads * head_dim);
  }
  void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd, float* dx,
                             float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim,
                             const float* inv_freq, const Stream&) const override {
    const std::vector<float> x32 = widened(x, tokens * n_heads * head_dim);
    cpu::qk_norm_rope_backward(dy, x32.data(), w, rstd, dx, dw, positions, tokens, n_heads, head_dim, inv_freq);
  }
  void qk_norm_rope_backward(const float* dy, const std::uint16_t* x, const float* w, const float* rstd,
                             std::uint16_t* dx, float* dw, const std::int32_t* positions, std::int64_t tokens,
                             int n_heads, int head_dim, const float* inv_freq, const Stream& stream) const override {
    std::vector<float> dx32(static_cast<std::size_t>(tokens * n_heads * head_dim));
    qk_norm_rope_backward(dy, x, w, rstd, dx32.data(), dw, positions, tokens, n_heads, head_dim, inv_freq, stream);
    cpu::to_bf16(dx32.data(), dx, tokens * n_heads * head_dim);
  }

  void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                      const Stream&) const override {
    cpu::swiglu_forward(gate_up, out, rows, cols);
  }
  void swiglu_forward_transposed(const float* gate_up, float* out_t, std::int64_t rows, std::int64_t cols,
                                 const Stream&) const override {
    cpu::swiglu_forward_transposed(gate_up, out_t, rows, cols);
  }

  void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows,
                       std::int64_t cols, const Stream&) const override {
    cpu::swiglu_backward(dout, gate_up, d_gate_up, rows, cols);
  }

  // bf16 gate_up or results: widened (exact) or rounded around the fp32 op (the CPU is the
  // reference, not the fast path).
  void swiglu_forward(const std::uint16_t* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                      const Stream&) const override {
    const std::vector<float> gu = widened(gate_up, rows * 2 * cols);
    cpu::swiglu_forward(gu.data(), out, rows, cols);
  }
  void swiglu_forward(const std::uint16_t* gate_up, std::uint16_t* out, std::int64_t rows, std::int64_t cols,
                      const Stream& stream) const override {
    std::vector<float> tmp(static_cast<std::size_t>(rows * cols));
    swiglu_forward(gate_up, tmp.data(), rows, cols, stream);
    cpu::to_bf16(tmp.data(), out, rows * cols);
  }
  void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, float* d_gate_up, std::int64_t rows,
                       std::int64_t cols, const Stream&) const override {
    const std::vector<float> d = widened(dout, rows * cols), gu = widened(gate_up, rows * 2 * cols);
    cpu::swiglu_backward(d.data(), gu.data(), d_gate_up, rows, cols);
  }
  void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, std::uint16_t* d_gate_up,
                       std::int64_t rows, std::int64_t cols, const Stream& stream) const override {
    std::vector<float> tmp(static_cast<std::size_t>(rows * 2 * cols));
    swiglu_backward(dout, gate_up, tmp.data(), rows, cols, stream);
    cpu::to_bf16(tmp.data(), d_gate_up, rows * 2 * cols);
  }

  void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                         const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                         int n_q_heads, int n_kv_heads, int head_dim, float scale, Precision,
                         const Stream&) const override {
    cpu::attention_forward(q, k, v, out, lse, cu_seqlens, n_seqs, max_seqlen, tokens, n_q_heads, n_kv_heads,
                           head_dim, scale);
  }

  std::int64_t attention_workspace_floats(std::int64_t tokens, int n_q_heads, int n_kv_heads,
                                          int head_dim) const override {
    return cpu::attention_backward_workspace_floats(tokens, n_q_heads, n_kv_heads, head_dim);
  }

  void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
                          const float* lse, float* dq, float* dk, float* dv, float* workspace,
                          const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                          int n_q_heads, int n_kv_heads, int head_dim, float scale, Precision,
                          const Stream&) const override {
    cpu::attention_backward(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs, max_seqlen,
                            tokens, n_q_heads, n_kv_heads, head_dim, scale);
  }

  void attention_forward(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v, std::uint16_t* out,
                         float* lse, const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                         int n_q_heads, int n_kv_heads, int head_dim, float scale, const Stream&) const override {
    const std::int64_t nq = tokens * n_q_heads * head_dim, nkv = tokens * n_kv_heads * head_dim;
    const std::vector<float> q32 = widened(q, nq), k32 = widened(k, nkv), v32 = widened(v, nkv);
    std::vector<float> out32(static_cast<std::size_t>(nq));
    cpu::attention_forward(q32.data(), k32.data(), v32.data(), out32.data(), lse, cu_seqlens, n_seqs, max_seqlen,
                           tokens, n_q_heads, n_kv_heads, head_dim, scale);
    cpu::to_bf16(out32.data(), out, nq);
  }
  void attention_backward(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                          const std::uint16_t* out, const std::uint16_t* dout, const float* lse, float* dq, float* dk,
                          float* dv, float* workspace, const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen,
                          std::int64_t tokens, int n_q_heads, int n_kv_heads, int head_dim, float scale,
                          const Stream&) const override {
    const std::int64_t nq = tokens * n_q_heads * head_dim, nkv = tokens * n_kv_heads * head_dim;
    const std::vector<float> q32 = widened(q, nq), k32 = widened(k, nkv), v32 = widened(v, nkv);
    const std::vector<float> out32 = widened(out, nq), dout32 = widened(dout, nq);
    cpu::attention_backward(q32.data(), k32.data(), v32.data(), out32.data(), dout32.data(), lse, dq, dk, dv,
                            workspace, cu_seqlens, n_seqs, max_seqlen, tokens, n_q_heads, n_kv_heads, head_dim, scale);
  }

  void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                  const AdamWHyper& hyper, const float* grad_sum_squares, std::uint16_t* param_bf16,
                  const Stream&) const override {
    cpu::adamw_step(param, grad, exp_avg, exp_avg_sq, n, hyper, grad_sum_squares, param_bf16);
  }

  void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate, const Stream&) const override {
    cpu::sum_squares(x, n, out, accumulate);
  }

  // The classification head
  void embedding_forward(const std::int32_t* ids, const void* table, DType table_dtype, float* out,
                         std::int64_t tokens, std::int64_t vocab, std::int64_t hidden, const Stream&) const override {
    cpu::embedding_forward(ids, table, table_dtype, out, tokens, vocab, hidden);
  }

  void embedding_backward(const float* grad_out, const std::int32_t* rows, const std::int32_t* offsets,
                          const std::int32_t* order, float* grad_table, std::int64_t unique_rows,
                          std::int64_t order_len, std::int64_t tokens, std::int64_t vocab, std::int64_t hidden,
                          const Stream&) const override {
    cpu::embedding_backward(grad_out, rows, offsets, order, grad_table, unique_rows, order_len, tokens, vocab, hidden);
  }

  void pool_forward(const float* x, const std::int32_t* cu_seqlens, float* out, std::int64_t n_seqs,
                    std::int64_t tokens, std::int64_t hidden, PoolMode mode, const Stream&) const override {
    cpu::pool_forward(x, cu_seqlens, out, n_seqs, tokens, hidden, mode);
  }

  void pool_backward(const float* dout, const std::int32_t* cu_seqlens, float* dx, std::int64_t n_seqs,
                     std::int64_t tokens, std::int64_t hidden, PoolMode mode, const Stream&) const override {
    cpu::pool_backward(dout, cu_seqlens, dx, n_seqs, tokens, hidden, mode);
  }

  void cross_entropy(const float* logits, const std::int32_t* labels, const float* class_weights, float* loss_sum,
                     float* dlogits, float* probs, float grad_scale, std::int64_t batch, std::int64_t classes,
                     const Stream&) const override {
    cpu::cross_entropy(logits, labels, class_weights, loss_sum, dlogits, probs, grad_scale, batch, classes);
  }

  // NF4
  void nf4_quantize(const void* x, DType dtype, std::int64_t n, int blocksize, std::uint8_t* packed, float* absmax,
                    const Stream&) const override {
    cpu::nf4_quantize(x, dtype, n, blocksize, packed, absmax);
  }

  void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, int blocksize, void* out,
                      DType out_dtype, const Stream&) const override {
    cpu::nf4_dequantize(packed, absmax, n, blocksize, out, out_dtype);
  }

  void nf4_absmax_mean(const float* absmax, std::int64_t n, float* offset, const Stream&) const override {
    cpu::nf4_absmax_mean(absmax, n, offset);
  }

  void nf4_double_quantize(const float* absmax, std::int64_t n, const float* offset, const float* code,
                           std::uint8_t* qabsmax, float* absmax2, const Stream&) const override {
    cpu::nf4_double_quantize(absmax, n, offset, code, qabsmax, absmax2);
  }

  void nf4_double_dequantize(const std::uint8_t* qabsmax, const float* absmax2, const float* offset,
                             const float* code, std::int64_t n, float* absmax, const Stream&) const override {
    cpu::nf4_double_dequantize(qabsmax, absmax2, offset, code, n, absmax);
  }

  bool nf4_gemm_fused(std::int64_t k, int blocksize, const Stream&) const override {
    return cpu::nf4_gemm_fused(k, blocksize);
  }
  void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                     bool transposed, const float* addend, float* c, std::uint16_t* c16, bool add_c16,
                     const Stream&) const override {
    cpu::nf4_gemm_bf16(a, w, parts, m, k, transposed, addend, c, c16, add_c16);
  }

 private:
  // c = bf16(alpha op(a) op(b) (+ c's values when add)): the fp32 sum, rounded once.
  static void product_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                              const std::uint16_t* a, const std::uint16_t* b, bool add, std::uint16_t* c) {
    std::vector<float> tmp(static_cast<std::size_t>(m * n));
    if (add) cpu::from_bf16(c, tmp.data(), m * n);
    cpu::gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, b, add ? 1.0f : 0.0f, tmp.data());
    cpu::to_bf16(tmp.data(), c, m * n);
  }
};

}  // namespace

const Backend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

}  // namespace cudablocks
