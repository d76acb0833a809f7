// The CPU backend: forwards each op to its reference implementation in this folder.
#include "core/backends.hpp"
#include "cpu/adamw.hpp"
#include "cpu/attention.hpp"
#include "cpu/bias.hpp"
#include "cpu/elementwise.hpp"
#include "cpu/fill.hpp"
#include "cpu/gemm.hpp"
#include "cpu/qk_norm_rope.hpp"
#include "cpu/rmsnorm.hpp"
#include "cpu/swiglu.hpp"

namespace cudablocks {

namespace {

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

  void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                        float* dw, std::int64_t rows, std::int64_t cols, bool accumulate_dx,
                        const Stream&) const override {
    cpu::rmsnorm_backward(dy, x, w, rstd, dx, dw, rows, cols, accumulate_dx);
  }

  // The CPU computes every precision in fp32.
  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
            const float* a, const float* b, float beta, float* c, Precision, const Stream&) const override {
    cpu::gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
  }

  void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols, const Stream&) const override {
    cpu::add_bias(y, bias, rows, cols);
  }

  void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols,
                     const Stream&) const override {
    cpu::bias_backward(dy, dbias, rows, cols);
  }

  void add(const float* a, const float* b, float* out, std::int64_t n, const Stream&) const override {
    cpu::add(a, b, out, n);
  }

  void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                            std::int64_t tokens, int n_heads, int head_dim, float eps, float theta,
                            const Stream&) const override {
    cpu::qk_norm_rope_forward(x, w, y, rstd, positions, tokens, n_heads, head_dim, eps, theta);
  }

  void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                             float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads,
                             int head_dim, float theta, const Stream&) const override {
    cpu::qk_norm_rope_backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, theta);
  }

  void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                      const Stream&) const override {
    cpu::swiglu_forward(gate_up, out, rows, cols);
  }

  void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows,
                       std::int64_t cols, const Stream&) const override {
    cpu::swiglu_backward(dout, gate_up, d_gate_up, rows, cols);
  }

  void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                         const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                         int n_q_heads, int n_kv_heads, int head_dim, float scale, const Stream&) const override {
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
                          int n_q_heads, int n_kv_heads, int head_dim, float scale,
                          const Stream&) const override {
    cpu::attention_backward(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs, max_seqlen,
                            tokens, n_q_heads, n_kv_heads, head_dim, scale);
  }

  void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                  const AdamWHyper& hyper, const float* grad_sum_squares, const Stream&) const override {
    cpu::adamw_step(param, grad, exp_avg, exp_avg_sq, n, hyper, grad_sum_squares);
  }

  void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate, const Stream&) const override {
    cpu::sum_squares(x, n, out, accumulate);
  }
};

}  // namespace

const Backend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

}  // namespace cudablocks
